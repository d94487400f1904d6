"""Plant each mutant of tests/mutation/mutants.py in a scratch copy of the repository, run the tests that should
catch it, and print killed/survived. Exits 1 if any mutant survives or a patch no longer applies.

    python tests/mutation/run.py [--only NAME ...] [--baseline] [--timeout S]

--baseline first runs every mutant's tests on the unmutated copy (they must pass, or "killed" would mean nothing).
Not collected by pytest (no test_ file names); it takes tens of minutes on two cores.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mutants import MUTANTS  # noqa: E402


def scratch_copy():
    """The files git tracks or would track (not ignored), copied to a temporary folder."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dest = tempfile.mkdtemp(prefix="mutation-")
    for f in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    return dest


def check_patches(mutants, root):
    for name, path, old, new, _ in mutants:
        with open(os.path.join(root, path)) as f:
            found = f.read().count(old)
        if found != 1 or old == new:
            sys.exit(f"mutant {name}: its old text occurs {found} times in {path} (must be once); update the mutant")


def run_tests(root, tests, timeout):
    """(outcome, seconds, first failure line): outcome is pytest's exit code, or 'timeout'."""
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode, time.time() - start, (failed[0] if failed else proc.stdout.strip()[-200:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=None, help="mutant names to run (default: all)")
    parser.add_argument("--baseline", action="store_true", help="first check that the tests pass unmutated")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant's test run")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only is None or m[0] in args.only]
    unknown = set(args.only or []) - {m[0] for m in MUTANTS}
    if unknown:
        sys.exit(f"unknown mutant(s) {sorted(unknown)}; known: {[m[0] for m in MUTANTS]}")
    start, root = time.time(), scratch_copy()
    try:
        check_patches(mutants, root)
        if args.baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m[4]))
            code, seconds, detail = run_tests(root, tests, args.timeout * 4)
            print(f"baseline: pytest exit {code} in {seconds:.0f}s {detail if code else ''}", flush=True)
            if code != 0:
                sys.exit("the tests fail without any mutant; fix them first")
        killed = []
        for name, path, old, new, tests in mutants:
            target = os.path.join(root, path)
            with open(target) as f:
                original = f.read()
            with open(target, "w") as f:
                f.write(original.replace(old, new))
            try:
                code, seconds, detail = run_tests(root, tests, args.timeout)
            finally:
                with open(target, "w") as f:
                    f.write(original)
            if code in (4, 5):  # usage error or nothing collected: the test list is wrong, not the mutant caught
                sys.exit(f"mutant {name}: pytest exit {code} (no such test?): {detail}")
            outcome = "survived" if code == 0 else "killed"
            killed += [name] if code != 0 else []
            print(f"{outcome:8s} {name:36s} {seconds:5.0f}s  {detail if code != 0 else ', '.join(tests)}", flush=True)
        print(f"killed {len(killed)}/{len(mutants)} in {time.time() - start:.0f}s wall")
        return 0 if len(killed) == len(mutants) else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
