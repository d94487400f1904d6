"""Packaging: the console commands install and run; the three dependency lists agree."""
import os
import re
import subprocess
import sys
import sysconfig

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (we declare >= 3.10): pytest itself depends on tomli there
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_editable_install_in_a_fresh_venv_exposes_console_commands(tmp_path):
    """`pip install -e .` in a new virtual environment, then every console command answers --help.

    The new venv sees the packages of the environment running the tests (torch is gigabytes; what is tested here is
    our packaging, not pip's downloads) through a .pth file naming that environment's site-packages: the venv's
    --system-site-packages would reach the base interpreter instead, which lacks them when the tests themselves run
    in a venv. --no-deps installs nothing but the build backend."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    venv_site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(venv_site, "outer-environment.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT]
    subprocess.run(pip, check=True, cwd=tmp_path, capture_output=True)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        commands = tomllib.load(f)["project"]["scripts"]
    assert len(commands) >= 8
    for name in commands:
        out = subprocess.run([str(venv / "bin" / name), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (name, out.stderr[-1000:])
        assert "usage:" in out.stdout and "default" in out.stdout, name


def _requirements(lines):
    """Normalised requirement strings (name lower-cased, '_' and '-' alike, no spaces) of a list of lines."""
    out = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, rest = re.match(r"([A-Za-z0-9_.\-]+)(.*)", line).groups()
            out.add(name.lower().replace("_", "-") + rest.replace(" ", ""))
    return out


def test_dependency_lists_agree():
    """pyproject.toml is the one list; requirements*.txt repeat it exactly and environment.yaml installs from it."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert _requirements(f) == _requirements(project["dependencies"])
    with open(os.path.join(ROOT, "requirements-test.txt")) as f:
        test_lines = [line for line in f if not line.strip().startswith("-r")]
    assert _requirements(test_lines) == _requirements(project["optional-dependencies"]["test"])
    with open(os.path.join(ROOT, "environment.yaml")) as f:
        env = yaml.safe_load(f)
    deps = env["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == ["-e .[test]"]  # no package pinned here that could disagree with pyproject.toml
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    low = tuple(int(x) for x in re.match(r">=(\d+)\.(\d+)", project["requires-python"]).groups())
    assert tuple(int(x) for x in python.split("=")[1].split(".")[:2]) >= low
    assert not [d for d in deps if isinstance(d, str) and d not in ("pip", python)]  # conda packages beside pip's
