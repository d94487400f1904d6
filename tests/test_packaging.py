import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_editable_install_in_a_fresh_venv_exposes_console_commands(tmp_path):
    """`pip install -e .` in a new virtual environment, then every console command answers --help.

    The venv sees the system's packages (torch is gigabytes; what is tested here is our packaging, not pip's downloads),
    and --no-deps installs nothing but the build backend."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT]
    subprocess.run(pip, check=True, cwd=tmp_path, capture_output=True)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        commands = tomllib.load(f)["project"]["scripts"]
    assert len(commands) >= 8
    for name in commands:
        out = subprocess.run([str(venv / "bin" / name), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (name, out.stderr[-1000:])
        assert "usage:" in out.stdout and "default" in out.stdout, name
