"""ldm/util.py: atomic writes with the user's file mode, and the CLIs' --help layout."""
import os
import re
import stat
from pathlib import Path

import pytest

from ldm.util import atomic_write


def _write_private(tmp):
    Path(tmp).write_bytes(b"data")
    os.chmod(tmp, 0o600)  # as mkstemp-made temporary files are


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_file_the_umask_mode(tmp_path, umask, mode):
    before = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "out.bin", _write_private)
    finally:
        os.umask(before)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert Path(path).read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    (tmp_path / "out.bin").write_bytes(b"old")

    def fail(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "out.bin", fail)
    assert os.listdir(tmp_path) == ["out.bin"] and (tmp_path / "out.bin").read_bytes() == b"old"


def test_help_keeps_the_docstring_paragraphs_and_shows_defaults(monkeypatch):
    import main
    from ldm.cli import attention_maps

    monkeypatch.setenv("COLUMNS", "80")
    text = attention_maps.get_parser().format_help()
    # paragraphs stay apart, the indented command and file list stay as written, prose is wrapped to the terminal
    assert "\n\n    python scripts/attention_maps.py --ckpt_path models/sd/v1-5.ckpt \\\n" in text
    assert "\n\n    <outdir>/samples/<stem>.png " in text
    assert "\n\nThe mask is the --mask_token word's map" in text
    assert max(len(line) for line in text.splitlines() if not line.startswith("    ")) <= 80
    assert "(default: 0.5)" in text  # --mask_threshold
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    text = main.get_parser().format_help()
    # The command stays a paragraph of its own, unwrapped; from Python 3.13 the compiler strips a docstring's common
    # indentation, which here is all of it, so the command may start at column 0.
    assert re.search(r"code bases\.\n\n *python main\.py --base \S+ -t --actual_resume \S+ \\\n +-n teddybear", text)
    assert "(default: 23)" in text and "(default: )" not in text
