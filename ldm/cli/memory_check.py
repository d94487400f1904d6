"""Long runs hold: train the tiny model for --steps steps and compare the process's peak memory (RSS) after step
--early with the peak at the end; exit 1 if it grew by more than --tolerance (a cache or a log that grows per step).

    python scripts/memory_check.py --steps 1000 --early 100
"""
import argparse
import sys
import tempfile

from pytorch_lightning.callbacks import LambdaCallback

from ldm.perf.device import host_mb
from ldm.util import HelpFormatter, one_line_errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="training steps")
    p.add_argument("--early", type=int, default=100, help="the step whose peak is the baseline")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed growth of the peak, as a fraction")
    opt = p.parse_args(argv)
    with one_line_errors():
        if not 0 < opt.early < opt.steps:
            raise ValueError(f"--early {opt.early} must lie between 0 and --steps {opt.steps}")
        from ldm.cli import make_example_data, make_tiny_model, train

        with tempfile.TemporaryDirectory() as t:
            make_tiny_model.main(["--out", f"{t}/tiny.ckpt"])
            make_example_data.main(["--out", f"{t}/data"])
            args = ["--base", "configs/tiny/v1-finetune.yaml", "-t", "--actual_resume", f"{t}/tiny.ckpt",
                    "--data_root", f"{t}/data", "--init_word", "circle", "-l", f"{t}/logs",
                    f"lightning.trainer.max_steps={opt.steps}",
                    "lightning.callbacks.image_logger.params.batch_frequency=0"]
            at = {}

            def probe(trainer, *_):  # the peak alone would hide growth below the model load's peak: current RSS too
                if trainer.global_step in (opt.early, opt.steps):
                    at[trainer.global_step] = (host_mb("VmHWM:"), host_mb("VmRSS:"))

            callback = LambdaCallback(on_train_batch_end=probe)
            train.run(*train.get_parser().parse_known_args(args), extra_callbacks=[callback])
        growths = []
        for i, what in enumerate(("peak RSS", "current RSS")):
            early, end = at[opt.early][i], at[opt.steps][i]
            growths.append(end / early - 1)
            print(f"{what} after step {opt.early}: {early:.0f} MiB; after step {opt.steps}: {end:.0f} MiB "
                  f"({growths[-1]:+.1%}, allowed {opt.tolerance:+.0%})")
        sys.exit(0 if max(growths) <= opt.tolerance else 1)


if __name__ == "__main__":
    main()
