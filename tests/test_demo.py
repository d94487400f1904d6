"""scripts/demo.py, the README's first command: its output has no warning a user cannot act on."""
import os
import re
import subprocess
import sys

from .conftest import ROOT

# What a warning line looks like: Python's `file.py:12: FooWarning: ...` (Lightning drops the category, so the
# location alone counts too), a word of warning or deprecation, or an advertisement's tip.
WARNING_LINE = re.compile(r"warn|deprecat|\.py:\d+: |tip:", re.I)


def test_demo_output_has_no_warning_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONPATH")}
    cmd = [sys.executable, "scripts/demo.py", "--steps", "4", "--n", "1", "--data_root", str(tmp_path / "data"),
           "--logdir", str(tmp_path / "logs"), "--outdir", str(tmp_path / "out"),
           # a sample sheet during training too, as the full demo makes at steps 300 and 600
           "lightning.callbacks.image_logger.params.batch_frequency=2",
           "lightning.callbacks.image_logger.params.ddim_steps=2", "lightning.callbacks.image_logger.params.max_images=1"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    output = done.stdout.replace(str(tmp_path), "<tmp>")  # the test's own folder name says "warning"
    lines = [line for line in re.split(r"[\r\n]+", output) if line.strip()]
    assert done.returncode == 0, "\n".join(lines[-20:])
    warnings = [line for line in lines if WARNING_LINE.search(line)]
    assert warnings == []
    assert any(line.startswith("step 4/4, loss=") for line in lines)
    assert "Trainable params: 192 (what this run learns" in done.stdout  # K and V of one 32-wide token in 3 layers
    assert os.path.isfile(tmp_path / "out" / "base_vs_catversion.png")
