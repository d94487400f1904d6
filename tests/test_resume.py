"""--resume continues a run bit for bit: an interrupted run taken on to step n has the adapter, the AdamW state and the
random states of an uninterrupted n-step run (on the same machine)."""
import copy
import os
import shutil
import signal

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

import main
from ldm.rng import collect_rng_states

from .conftest import TINY_FINETUNE
from .test_main import _train_args

# Steps of the uninterrupted run. With 5 pictures x 4 repeats and batches of 2 an epoch is 10 steps, so runs here
# stop and resume mid-epoch, at an epoch's end, and go on across epoch boundaries.
STRAIGHT_STEPS = 14
EVERY = 4  # periodic checkpoints (and sample grids) every 4 steps


class Recorder(pl.Callback):
    """The in-memory adapter, AdamW state and random states after every step (after the optimizer step; nothing draws
    random numbers between here and the next step)."""

    def __init__(self):
        self.adapter, self.optimizer, self.rng = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.adapter[step] = [p.detach().clone() for p in pl_module.trainable_parameters()]
        self.optimizer[step] = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
        self.rng[step] = collect_rng_states()


class Interrupt(pl.Callback):
    """Sends `signum` to this process during step `step` (as Ctrl-C or `kill` would)."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


def train(args, *callbacks):
    return main.run(*main.get_parser().parse_known_args(args), extra_callbacks=callbacks)


def resume(logdir_or_ckpt, steps, *callbacks, extra=()):
    return train(["-t", "--resume", str(logdir_or_ckpt), f"lightning.trainer.max_steps={steps}", *extra], *callbacks)


def last_ckpt(logdir):
    return torch.load(os.path.join(logdir, "checkpoints", "last.ckpt"), weights_only=True)


def max_abs_diff(a, b):
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def assert_same_adapter(got, expected):
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True)), f"max abs diff {max_abs_diff(got, expected)}"


def assert_same_optimizer(got, expected):
    assert got.keys() == expected.keys()
    for i in expected:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[i][key], expected[i][key]), (
                f"{key} of parameter {i}: max abs diff {max_abs_diff([got[i][key]], [expected[i][key]])}")


def assert_same_rng(got, expected):
    assert torch.equal(got["torch"], expected["torch"])
    assert got["numpy"][0] == expected["numpy"][0] and torch.equal(got["numpy"][1], expected["numpy"][1])
    assert tuple(got["numpy"][2:]) == tuple(expected["numpy"][2:])
    assert tuple(got["python"][0:1]) == tuple(expected["python"][0:1]) and tuple(got["python"][1]) == tuple(expected["python"][1])


def assert_checkpoint_is_step(ckpt, recorder, step):
    """`ckpt` (a loaded last.ckpt) holds exactly what the uninterrupted run held in memory after `step` steps."""
    assert ckpt["global_step"] == step
    assert_same_adapter(ckpt["trainable"], recorder.adapter[step])
    assert_same_optimizer(ckpt["optimizer_states"][0]["state"], recorder.optimizer[step])
    assert_same_rng(ckpt["rng_states"], recorder.rng[step])


@pytest.fixture(scope="module")
def straight(tiny_ckpt, example_data, tmp_path_factory):
    """An uninterrupted STRAIGHT_STEPS-step run: its folder and what it held after every step."""
    recorder = Recorder()
    logdir, _ = train(_train_args(tiny_ckpt, example_data, tmp_path_factory.mktemp("straight"), STRAIGHT_STEPS, EVERY),
                      recorder)
    assert sorted(recorder.adapter) == list(range(1, STRAIGHT_STEPS + 1))
    return logdir, recorder


@pytest.mark.parametrize("stop, end, workers", [
    (4, 6, 0),  # mid-epoch
    (10, 14, 0),  # at the end of the first epoch, then into the second
    (7, 14, 2),  # DataLoader worker processes fetching ahead; across an epoch boundary
])
def test_resume_equals_an_uninterrupted_run(stop, end, workers, straight, tiny_ckpt, example_data, tmp_path):
    """`stop` steps, then --resume to `end`: bitwise the uninterrupted run's adapter, AdamW and random states."""
    _, recorder = straight
    args = _train_args(tiny_ckpt, example_data, tmp_path, stop, EVERY) + [f"data.params.num_workers={workers}"]
    logdir, _ = train(args)
    assert_checkpoint_is_step(last_ckpt(logdir), recorder, stop)
    _, model = resume(logdir, end)
    assert_same_adapter(model.trainable_parameters(), recorder.adapter[end])
    assert_checkpoint_is_step(last_ckpt(logdir), recorder, end)


def test_resume_from_a_periodic_checkpoint(straight, tmp_path):
    """A checkpoint written mid-run every `every_n_train_steps` resumes exactly too (Lightning saves it at another
    point of the loop than last.ckpt)."""
    logdir, recorder = straight
    copy_dir = shutil.copytree(logdir, tmp_path / "run")
    ckpt = copy_dir / "checkpoints" / "epoch=000000-step=000000008.ckpt"
    assert_checkpoint_is_step(torch.load(ckpt, weights_only=True), recorder, 8)
    _, model = resume(ckpt, STRAIGHT_STEPS)
    assert_same_adapter(model.trainable_parameters(), recorder.adapter[STRAIGHT_STEPS])
    assert_checkpoint_is_step(last_ckpt(copy_dir), recorder, STRAIGHT_STEPS)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_saves_the_step_it_held_and_resumes_exactly(signum, straight, tiny_ckpt, example_data, tmp_path):
    """A signal during step 7 (no periodic save there): last.ckpt and checkpoints/adapter hold the adapter the run
    held in memory after step 7, and --resume to the planned end equals the uninterrupted run."""
    _, recorder = straight
    interrupted = Recorder()
    with pytest.raises(main.TrainingStopped) as e:
        train(_train_args(tiny_ckpt, example_data, tmp_path, STRAIGHT_STEPS, EVERY), interrupted, Interrupt(7, signum))
    assert e.value.code == 128 + signum and str(e.value).startswith("interrupted at step 7;")
    assert sorted(interrupted.adapter) == list(range(1, 8))
    logdir = str(e.value).split("--resume ")[1]
    ckpt = last_ckpt(logdir)
    assert_checkpoint_is_step(ckpt, interrupted, 7)  # what this run held in memory at the interruption
    assert_checkpoint_is_step(ckpt, recorder, 7)  # which is what the uninterrupted run held
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    enc = FrozenCLIPEmbedder(**OmegaConf.to_container(OmegaConf.load(TINY_FINETUNE).model.params.cond_stage_config.params))
    enc.adapter_load(os.path.join(logdir, "checkpoints", "adapter"))
    assert_same_adapter(enc.adapter_parameters(), interrupted.adapter[7])

    _, model = resume(logdir, STRAIGHT_STEPS)
    assert_same_adapter(model.trainable_parameters(), recorder.adapter[STRAIGHT_STEPS])
    assert_checkpoint_is_step(last_ckpt(logdir), recorder, STRAIGHT_STEPS)


def test_resume_with_other_data_warns_and_trains_on(straight, tmp_path):
    """Another number of items (images x repeats) cannot continue the saved order: a warning says so, a new data
    epoch starts, and the run reaches its end."""
    logdir, _ = straight
    copy_dir = shutil.copytree(logdir, tmp_path / "run")
    with pytest.warns(UserWarning, match=r"the data has 25 items \(images x repeats\), the checkpoint's run had 20: its "
                                         "data order starts a new epoch, so this run no longer continues exactly"):
        resume(copy_dir, STRAIGHT_STEPS + 2, extra=["data.params.train.params.repeats=5"])
    assert last_ckpt(copy_dir)["DataModuleFromConfig"]["sampler"]["epoch"] == 2


def test_sampler_goes_on_from_the_count_of_consumed_batches():
    """The order depends on the seed and the consumed-batch count only, not on what was fetched ahead."""
    from ldm.data.datamodule import ResumableSampler

    count = {"batches": 0}
    straight = ResumableSampler(5, 2, seed=7, consumed_batches=lambda: count["batches"])
    epochs = []
    for _ in range(3):  # 3 batches an epoch, the last one short
        epochs.append(list(straight))
        count["batches"] += 3
    assert all(sorted(i for i, _ in epoch) == list(range(5)) for epoch in epochs) and epochs[0] != epochs[1]
    assert len({item_seed for epoch in epochs for _, item_seed in epoch}) == 15  # every (epoch, index) its own draws

    count["batches"] = 3
    interrupted = ResumableSampler(5, 2, seed=7, consumed_batches=lambda: count["batches"])
    assert list(interrupted) == epochs[1]  # the whole second epoch handed out (fetched ahead) ...
    count["batches"] = 4  # ... but only its first batch trained on when the checkpoint is written
    state = interrupted.state_dict()
    assert (state["epoch"], state["position"], state["consumed_batches"]) == (1, 2, 4)
    resumed = ResumableSampler(5, 2, seed=0, consumed_batches=lambda: count["batches"])
    resumed.load_state_dict(state)
    assert list(resumed) == epochs[1][2:]
    count["batches"] = 6
    assert list(resumed) == epochs[2]

    alone = ResumableSampler(5, 2, seed=7)  # outside a trainer every iteration is a whole epoch
    assert [list(alone) for _ in range(3)] == epochs
