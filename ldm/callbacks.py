"""Lightning callbacks of a training run: adapter snapshots and sample grids."""
import csv
import os

import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.util import atomic_write


def save_image_grid(images, path, nrow=None):
    """Save images in [-1, 1] (b, c, h, w) as one PNG grid, atomically."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = torchvision.utils.make_grid(images, nrow=nrow or max(1, int(len(images) ** 0.5)), padding=2)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG"))
    return grid


class AdapterCheckpoint(pl.Callback):
    """`checkpoints/adapter_gs-<step>/` every `every_n_train_steps` steps and `checkpoints/adapter/` at the end,
    in the authors' file format plus our own safetensors with metadata; at the end also `last.ckpt` for `--resume`.

    Names follow the reference: the snapshot after 1000 optimizer steps is `adapter_gs-999`."""

    def __init__(self, dirpath, every_n_train_steps=250, base_class_word=None):
        self.dirpath, self.every, self.base_class_word = dirpath, every_n_train_steps, base_class_word

    def save(self, pl_module, name, step):
        meta = {"global_step": str(step), "base_class_word": self.base_class_word or "",
                "base_fingerprint": pl_module.base_fingerprint or ""}
        pl_module.save_personalization(os.path.join(self.dirpath, name), metadata=meta)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step % self.every == 0 and trainer.is_global_zero:
            self.save(pl_module, f"adapter_gs-{step - 1}", step)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.save(pl_module, "adapter", trainer.global_step)
        atomic_write(os.path.join(self.dirpath, "last.ckpt"), trainer.save_checkpoint)


class ImageLogger(pl.Callback):
    """Sample grids with and without the learned concept every `batch_frequency` steps (and after the last one)."""

    def __init__(self, batch_frequency=500, max_images=4, ddim_steps=50, **ignored):
        self.every, self.max_images, self.ddim_steps = batch_frequency, max_images, ddim_steps

    def log_samples(self, trainer, pl_module, batch):
        captions = list(batch[pl_module.cond_stage_key])[: self.max_images]
        images = pl_module.log_images(captions, ddim_steps=self.ddim_steps)
        folder = os.path.join(trainer.default_root_dir, "images", "train")
        for key, value in images.items():
            grid = save_image_grid(value, os.path.join(folder, f"{key}_gs-{trainer.global_step:06d}.png"))
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_image"):
                    logger.experiment.add_image(f"train/{key}", grid, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0 and trainer.is_global_zero:
            self.log_samples(trainer, pl_module, batch)


class TrainingGuard(pl.Callback):
    """Ctrl-C / SIGTERM and a non-finite loss end the run cleanly instead of losing it.

    A signal lets the current step finish, then training stops normally, so the end-of-training saves
    (`checkpoints/adapter/`, `checkpoints/last.ckpt`) run; a second Ctrl-C aborts at once. A NaN or infinite loss
    stops the run with the adapter restored to the last numbers that gave a finite loss.

    Why the check looks one step back: reading a flag from the GPU in step k waits for step k to finish, so the host
    could not queue step k+1 meanwhile (on a fast GPU that idles it for the host's share of every step). Step k's
    flag is copied to the host without waiting and read in step k+1, by which time it has arrived; a snapshot of the
    adapter (a few KB, copied on the device) is kept per step, so the restored numbers are the same as with an
    immediate check. Before anything is saved (snapshots, the end of training, a signal) the pending flag is settled
    at once, so no file ever holds numbers from a non-finite step.
    """

    def __init__(self, adapter_checkpoint):
        self.adapter_checkpoint = adapter_checkpoint
        self.signal = None
        self.last_good = None
        self._pending = None  # (finite flag on the host, event, adapter snapshot, step, loss) of the newest step

    def install(self):
        """Take over SIGINT/SIGTERM; returns a function that gives them back."""
        import signal

        def handler(signum, frame):
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum
            print(f"\nReceived {signal.Signals(signum).name}: saving after this step (press Ctrl-C again to abort)", flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]

    def on_before_backward(self, trainer, pl_module, loss):
        params = pl_module.trainable_parameters()
        loss = loss.detach()
        finite = torch.isfinite(loss).all()
        event = None
        if finite.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            finite = host
        pending, self._pending = self._pending, (finite, event, [p.detach().clone() for p in params], trainer.global_step, loss)
        if pending is not None:
            self._settle(pending, params)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        saves = self.adapter_checkpoint.every and step % self.adapter_checkpoint.every == 0
        if saves or self.signal is not None or (trainer.max_steps > 0 and step >= trainer.max_steps):
            self.settle(pl_module)
        if self.signal is not None:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        self.settle(pl_module)

    def settle(self, pl_module):
        """Read the newest step's flag now (waiting for it); raise FloatingPointError if its loss was not finite."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._settle(pending, pl_module.trainable_parameters())

    def _settle(self, pending, params):
        finite, event, snapshot, step, loss = pending
        if event is not None:
            event.synchronize()
        if bool(finite):
            self.last_good = snapshot
            return
        self._pending = None
        if self.last_good is not None:
            with torch.no_grad():
                for p, good in zip(params, self.last_good):
                    p.copy_(good)
        raise FloatingPointError(f"the loss is {loss.item()} at step {step}")

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, FloatingPointError) and trainer.is_global_zero:
            self.adapter_checkpoint.save(pl_module, "adapter", trainer.global_step)
        elif isinstance(exception, SIGTERMException) and self.signal is not None:
            # Lightning's own SIGTERM handler ends the loop with this exception right after the step we let finish,
            # so on_train_end never runs: write what it would have, this step's adapter and last.ckpt.
            self.adapter_checkpoint.on_train_end(trainer, pl_module)


class ContinuingCSVLogger(pl.loggers.CSVLogger):
    """Lightning's CSVLogger, except that a run resumed into its folder appends to `metrics.csv`.

    Lightning deletes an existing `metrics.csv` when its writer starts, so `--resume` used to lose the rows before the
    interruption (TensorBoard keeps them). The rows are read first, written back, and the writer told their columns.
    """

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, pl.loggers.csv_logs.ExperimentWriter.NAME_METRICS_FILE)
        rows, columns = [], []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                rows, columns = list(reader), list(reader.fieldnames or [])
        writer = super().experiment
        if columns and hasattr(writer, "metrics_keys"):  # rank 0's writer (other ranks get a dummy)

            def write_back(tmp):
                with open(tmp, "w", newline="") as f:
                    out = csv.DictWriter(f, fieldnames=columns)
                    out.writeheader()
                    out.writerows(rows)

            atomic_write(path, write_back)
            writer.metrics_keys = columns
        return writer
