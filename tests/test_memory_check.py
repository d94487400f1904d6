"""scripts/memory_check.py: a short real run reads this process's memory at both steps; growth past the tolerance
exits 1, and a bad --early is refused before anything is built."""
import re

import pytest

from ldm.cli import memory_check


def _run(argv):
    with pytest.raises(SystemExit) as exit_info:
        memory_check.main(argv)
    return exit_info.value.code


def test_a_real_run_reads_the_process_memory_at_both_steps(capsys):
    assert _run(["--steps", "3", "--early", "1", "--tolerance", "10"]) == 0
    out = capsys.readouterr().out
    for what in ("peak RSS", "current RSS"):
        early, end = map(float, re.search(rf"{what} after step 1: (\d+) MiB; after step 3: (\d+) MiB", out).groups())
        assert 50 < early <= end * 1.5  # a Python process with torch loaded holds far more than 50 MiB


def test_growth_past_the_tolerance_fails(monkeypatch, capsys):
    readings = iter([100.0, 100.0, 150.0, 104.0])  # (peak, current) after step 1, then after step 3
    monkeypatch.setattr(memory_check, "host_mb", lambda field: next(readings))
    assert _run(["--steps", "3", "--early", "1", "--tolerance", "0.1"]) == 1
    out = capsys.readouterr().out
    assert "peak RSS after step 1: 100 MiB; after step 3: 150 MiB (+50.0%, allowed +10%)" in out
    assert "current RSS after step 1: 100 MiB; after step 3: 104 MiB (+4.0%, allowed +10%)" in out


def test_early_step_outside_the_run_is_refused(capsys):
    assert _run(["--steps", "3", "--early", "3"]) == 2
    assert "--early 3 must lie between 0 and --steps 3" in capsys.readouterr().err
