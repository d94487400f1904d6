"""Lightning callbacks of a training run: adapter snapshots, sample sheets, the progress bar and the model summary."""
import csv
import logging
import math
import os
import sys
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.callbacks import ModelSummary, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from pytorch_lightning.utilities.model_summary import get_human_readable_count, summarize
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.report import save_sheet
from ldm.util import atomic_write


# What Lightning (and torch through it) says on every run that a user of main.py cannot act on, each by its own text,
# so that every other warning still shows.
_QUIET = (
    # The frozen base model stays in eval mode on purpose (LatentDiffusion.train): no dropout, no norm statistics.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # LatentDiffusion's hook is the one meant; Lightning warns whenever a model has it and a datamodule is passed.
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    # Lightning 2.6 still builds torch's deprecated LeafSpec when it batches; a matter between those two libraries.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # --resume continues in the run's own folder, and the epoch's position is meaningless with photos shuffled anew.
    r"Checkpoint directory .* exists and is not empty",
    r"You're resuming from a checkpoint that ended before the epoch ended")
_CHATTER = ("💡 Tip:",  # an advertisement for a cloud logging service, on every Trainer
            "`Trainer.fit` stopped: `max_steps=")  # the progress bar shows it, and this line broke into the bar's


def _not_chatter(record):
    return not str(record.msg).startswith(_CHATTER)


def quiet_lightning():
    for message in _QUIET:
        warnings.filterwarnings("ignore", message=message)
    # where Lightning's rank_zero_info writes; addFilter adds a filter once
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_not_chatter)


class AdapterCheckpoint(pl.Callback):
    """`checkpoints/adapter_gs-<step>/` every `every_n_train_steps` steps (the reference's names: after 1000 steps,
    `adapter_gs-999`) and `checkpoints/adapter/` at the end, in the authors' file format plus our own safetensors with
    metadata; at the end also `last.ckpt` for `--resume`."""

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
        # The full state (optimizer, loops, callbacks): this is the file --resume continues from. Every rank takes
        # part (save_checkpoint gathers the state and waits for all); only rank zero writes, so only it renames.
        path = os.path.join(self.dirpath, "last.ckpt")
        save = lambda tmp: trainer.save_checkpoint(tmp, weights_only=False)  # noqa: E731
        atomic_write(path, save) if trainer.is_global_zero else save(path)


class ImageLogger(pl.Callback):
    """Sample sheets with and without the learned concept every `batch_frequency` steps:
    `images/train/<key>_gs-<step>.png`, one column per caption."""

    ROW_LABELS = {"samples": "with the learned concept", "samples_base": "base model"}

    def __init__(self, batch_frequency=500, max_images=4, ddim_steps=50, **ignored):
        self.every, self.max_images, self.ddim_steps = batch_frequency, max_images, ddim_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not (self.every and step % self.every == 0 and trainer.is_global_zero):
            return
        captions, concepts = pl_module.sample_prompts(batch, self.max_images)  # every concept of a many-concept run
        images = pl_module.log_images(captions, ddim_steps=self.ddim_steps, concepts=concepts)
        for key, value in images.items():
            path = os.path.join(trainer.default_root_dir, "images", "train", f"{key}_gs-{step:06d}.png")
            label = f"{self.ROW_LABELS.get(key, key)}, step {step}"
            sheet = torch.from_numpy(np.array(save_sheet(path, value, [label], captions, value_range=(-1, 1))))
            for logger in trainer.loggers:
                if hasattr(logger.experiment, "add_image"):
                    logger.experiment.add_image(f"train/{key}", sheet.permute(2, 0, 1), step)


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run that counts optimizer steps to the end and shows the loss first:
    `step 120/800, loss=0.0312, lr=2.00e-02 |#####     | [00:12<01:10, 9.80step/s]`. Lightning's own counts the
    batches of an epoch ("Epoch 3/-2" when only max_steps bounds the run), meaningless for a few repeated photos."""

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt}{postfix} |{bar}| [{elapsed}<{remaining}, {rate_fmt}]"
    NAMES = {"train/loss_simple": "loss", "lr-abs": "lr"}

    def on_train_start(self, trainer, pl_module):
        self.train_progress_bar = Tqdm(
            desc="step", initial=trainer.global_step, total=convert_inf(trainer.estimated_stepping_batches),
            position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
            file=sys.stdout, smoothing=0, unit="step", bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_):
        pass  # one bar for all epochs

    def on_train_epoch_end(self, trainer, pl_module):
        pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, end=False):
        bar, step = self.train_progress_bar, trainer.global_step
        # The last step is drawn by on_train_end's close(): drawn here too, it would print twice into a log file.
        if bar is not None and not bar.disable and (end or step - bar.n >= self.refresh_rate and step != bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            if not end:
                bar.refresh()

    def on_train_end(self, trainer, pl_module):
        self.on_train_batch_end(trainer, pl_module, None, None, None, end=True)
        if self.train_progress_bar is not None:
            self.train_progress_bar.close()

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: not ours to show
        items = {self.NAMES.get(k, k): v for k, v in items.items()}
        return {k: f"{v:.2e}" if k == "lr" and isinstance(v, float) else v for k, v in items.items()}


class AdapterSummary(ModelSummary):
    """Lightning's summary of the model's parts, with the numbers of trainable and frozen parameters right: the
    adapter lives outside `parameters()` on purpose (see FrozenCLIPEmbedder), so Lightning alone reports "Trainable
    params: 0"; here they are the model's `trainable_parameters()`, counted once even if registered."""

    def on_fit_start(self, trainer, pl_module):
        if not self._max_depth or not trainer.is_global_zero:
            return
        summary = summarize(pl_module, max_depth=self._max_depth)
        trainable, registered = pl_module.trainable_parameters(), {id(p) for p in pl_module.parameters()}
        n_trainable = sum(p.numel() for p in trainable)
        total = summary.total_parameters + sum(p.numel() for p in trainable if id(p) not in registered)
        rows = [("", "Name", "Type", "Params")] + [
            (str(i), name, kind, get_human_readable_count(n))
            for i, (name, kind, n) in enumerate(zip(summary.layer_names, summary.layer_types, summary.param_nums))]
        widths = [max(len(r[k]) for r in rows) for k in range(4)]
        lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        rule = "-" * max(len(line) for line in lines)
        print("\n".join([lines[0], rule, *lines[1:], rule,
                         f"Trainable params: {n_trainable:,} (what this run learns; the base model is frozen)",
                         f"Frozen params: {total - n_trainable:,}"]), flush=True)


class TrainingGuard(pl.Callback):
    """Ctrl-C / SIGTERM and a non-finite loss end the run cleanly instead of losing it: a signal lets the current step
    finish and training end normally (so the end-of-training saves run; a second Ctrl-C aborts at once); a NaN or
    infinite loss stops the run with the adapter restored to the last numbers that gave a finite loss.

    The check looks one step back: reading the flag in step k would wait for the GPU, so the host could not queue step
    k+1. Step k's flag is copied without waiting and read in step k+1, with a per-step snapshot of the adapter (a few KB
    on the device) to restore; before anything is saved the pending flag is settled, so no file holds numbers from a
    non-finite step. With several processes the mean loss over all is checked and a signal on any stops all after the
    same step: every rank takes the same way out (a rank left behind would wait forever)."""

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
        # Several concepts: each one's loss, so that a non-finite one is named.
        self._names, losses = getattr(pl_module, "concept_names", []), getattr(pl_module, "concept_losses", None)
        loss = (loss if losses is None or len(self._names) < 2 else losses).detach()
        if trainer.world_size > 1:  # every rank sees every rank's loss, so that all stop after the same step
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
        finite = torch.isfinite(loss).all()
        event = torch.cuda.Event() if finite.is_cuda else None
        finite = finite.to("cpu", non_blocking=True)  # from a GPU into pinned memory, without waiting for it
        if event is not None:
            event.record()
        snapshot = [p.detach().clone() for p in params]
        pending, self._pending = self._pending, (finite, event, snapshot, trainer.global_step, loss)
        if pending is not None:
            self._settle(pending, params)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        saves = self.adapter_checkpoint.every and step % self.adapter_checkpoint.every == 0
        stop = self.signal is not None
        if trainer.world_size > 1:  # a small collective per step (Lightning 2.6 already holds one for SIGTERM)
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if saves or stop or (trainer.max_steps > 0 and step >= trainer.max_steps):
            self.settle(pl_module)
        if stop:
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
        if loss.numel() > 1:
            bad = ", ".join(f"{n} ({v})" for n, v in zip(self._names, loss.tolist()) if not math.isfinite(v))
            raise FloatingPointError(f"the loss of concept {bad} is not finite at step {step}")
        raise FloatingPointError(f"the loss is {loss.item()} at step {step}")

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, FloatingPointError) and trainer.is_global_zero:
            self.adapter_checkpoint.save(pl_module, "adapter", trainer.global_step)
        elif isinstance(exception, SIGTERMException) and self.signal is not None:
            # Lightning's own SIGTERM handler ends the loop with this exception right after the step we let finish,
            # so on_train_end never runs: write what it would have, this step's adapter and last.ckpt.
            self.adapter_checkpoint.on_train_end(trainer, pl_module)


class _AppendingWriter(pl.loggers.csv_logs.ExperimentWriter):
    def _check_log_dir_exists(self):
        """Lightning deletes an existing `metrics.csv` here; a run resumed into its folder appends to it instead (and
        rewrites it whole only when new columns come, as Lightning does)."""
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class ContinuingCSVLogger(pl.loggers.CSVLogger):
    """Lightning's CSVLogger, except that `--resume` keeps the rows of `metrics.csv` from before the interruption."""

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
