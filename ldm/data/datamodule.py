"""The reference's `DataModuleFromConfig`: datasets built from config, batched by Lightning, in an order that
`--resume` continues exactly."""
import math
import warnings

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler

from ldm.data.personalized import Concepts, concept_names
from ldm.util import instantiate_from_config


class ResumableSampler(Sampler):
    """A new random order of the dataset every data epoch, as `DataLoader(shuffle=True)` gives, such that an
    interrupted run goes on with the very items an uninterrupted one would have drawn.

    Epoch e's order is `randperm` seeded with `seed + e` (no global random state). With `item_seeds` each item comes as
    `(index, item_seed)`, from which the dataset draws its flip and caption, whichever process loads it, and when.
    Where the run stands is counted in batches consumed by training (`consumed_batches()`, the trainer's count, which a
    checkpoint restores), not in items handed out: Lightning and the DataLoader workers fetch ahead. `anchor`: the count
    `anchor_batches` stood at item `position` of data epoch `epoch` (a data epoch ends when its items run out, whatever
    epoch Lightning counts). With several processes each takes its shard of the same order as torch's
    DistributedSampler does: padded with its first items to a multiple of `world_size`, every `world_size`-th item from
    `rank` on, so all ranks take the same number of batches per data epoch."""

    def __init__(self, length, batch_size, seed, consumed_batches=None, item_seeds=True, rank=0, world_size=1):
        self.length, self.batch_size, self.seed, self.item_seeds = length, batch_size, seed, item_seeds
        self.rank, self.world_size = rank, world_size
        self.consumed_batches = consumed_batches or (lambda: None)
        self.anchor = (0, 0, 0)  # (epoch, position, anchor_batches)
        self._permutation = (None, None)  # (epoch, its order): one epoch's order is kept, for state_dict

    def __len__(self):
        return math.ceil(self.length / self.world_size)

    def permutation(self, epoch):
        if self._permutation[0] != epoch:
            generator = torch.Generator().manual_seed((self.seed + epoch) % 2**64)
            self._permutation = (epoch, torch.randperm(self.length, generator=generator))
        return self._permutation[1]

    def shard(self, epoch):
        order = self.permutation(epoch)
        padded = order.repeat(math.ceil(len(self) * self.world_size / self.length))[: len(self) * self.world_size]
        return padded[self.rank :: self.world_size]

    def position_after(self, batches):
        """(data epoch, item position in its order) of the next item once `batches` batches were consumed."""
        epoch, position, anchor_batches = self.anchor
        done = batches - anchor_batches
        if done < 0:
            raise ValueError(f"the trainer counts {batches} batches consumed, fewer than the {anchor_batches} of the "
                             "data order's last checkpoint; resume from the run's last.ckpt")
        left = math.ceil((len(self) - position) / self.batch_size)  # batches left in the anchor's epoch
        if done < left:
            return epoch, position + done * self.batch_size
        per_epoch = math.ceil(len(self) / self.batch_size)
        return epoch + 1 + (done - left) // per_epoch, ((done - left) % per_epoch) * self.batch_size

    def __iter__(self):
        batches = self.consumed_batches()
        if batches is None:  # no trainer counts for us: every iteration is taken to be consumed whole
            epoch, position, anchor_batches = self.anchor
            if position >= len(self):
                epoch, position = epoch + 1, 0
            self.anchor = (epoch + 1, 0, anchor_batches)
        else:
            epoch, position = self.position_after(batches)
            self.anchor = (epoch, position, batches)
        # Only to the end of this data epoch: the next iteration starts the next one.
        order = self.shard(epoch)[position:].tolist()
        return iter([(i, f"{self.seed}:{epoch}:{i}") for i in order] if self.item_seeds else order)

    def state_dict(self):
        batches = self.consumed_batches()
        epoch, position = self.position_after(batches) if batches is not None else self.anchor[:2]
        batches = self.anchor[2] if batches is None else batches
        return {"seed": self.seed, "epoch": epoch, "position": position, "consumed_batches": batches,
                "length": self.length, "world_size": self.world_size, "permutation": self.permutation(epoch).clone()}

    def load_state_dict(self, state):
        self.seed = state["seed"]
        if (state["length"], state.get("world_size", 1)) != (self.length, self.world_size):
            # Other pictures, repeats or processes than the checkpoint's run (deliberate or not): its order cannot go
            # on, so the next data epoch starts at once. Training goes on; not as an uninterrupted run would.
            ranks = ("", "") if state.get("world_size", 1) == self.world_size else (
                f" in {self.world_size} processes", f" in {state.get('world_size', 1)}")
            warnings.warn(f"the data has {self.length} items (images x repeats){ranks[0]}, the checkpoint's run had "
                          f"{state['length']}{ranks[1]}: its data order starts a new epoch, so this run no longer "
                          "continues exactly")
            self.anchor = (state["epoch"] + 1, 0, state["consumed_batches"])
            return
        self.anchor = (state["epoch"], state["position"], state["consumed_batches"])
        self._permutation = (state["epoch"], state["permutation"])


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(self, batch_size, train=None, num_workers=None, **ignored):  # ignored: validation, wrap (reference)
        super().__init__()
        self.batch_size, self.train_config, self.train_dataset, self.sampler = batch_size, train, None, None
        self.num_workers = batch_size * 2 if num_workers is None else num_workers
        # The run's seed (pl.seed_everything has just set it); the data order and the items' draws derive from it.
        self.seed = torch.initial_seed()

    def setup(self, stage=None):
        if self.train_dataset is None:
            self.train_dataset = build_dataset(self.train_config)
            # A dataset of another kind gets plain indices (it may not take the `(index, item_seed)` keys).
            item_seeds = getattr(self.train_dataset, "takes_item_seeds", False)
            self.sampler = ResumableSampler(len(self.train_dataset), self.batch_size, self.seed, self._consumed_batches,
                                            item_seeds)
        if self.trainer is not None:  # this process's shard; Lightning's DistributedSampler is off (ldm/cli/train.py)
            self.sampler.rank, self.sampler.world_size = self.trainer.global_rank, self.trainer.world_size

    def _consumed_batches(self):
        """Batches the training loop has taken (restored with the loops on --resume); None outside a Trainer."""
        return None if self.trainer is None else self.trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def train_dataloader(self):
        self.setup()
        # Our own generator: a DataLoader without one draws its workers' base seed from the global torch stream
        # whenever it starts iterating, which --resume does at another point than an uninterrupted run.
        generator = torch.Generator().manual_seed(self.seed % 2**64)
        return DataLoader(self.train_dataset, self.batch_size, sampler=self.sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=generator,
                          collate_fn=getattr(self.train_dataset, "collate", None))

    # Saved in every checkpoint (Lightning calls these with the LightningModule's hooks): where the data order stands.
    def state_dict(self):
        return {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}

    def load_state_dict(self, state):
        if "sampler" in state:
            self.setup()
            self.sampler.load_state_dict(state["sampler"])


def build_dataset(config):
    """The dataset of a config; lists of `data_root` and `base_class_word` (one per concept) make a `Concepts`."""
    params = dict(config.get("params") or {})  # plain data: instantiate_from_config resolved the data config
    roots = params.get("data_root")
    if not isinstance(roots, list):
        return instantiate_from_config(config)
    words = list(concept_names(roots, params.get("base_class_word")).values())
    datasets = [instantiate_from_config({"target": config["target"], "params": {**params, "data_root": r, "base_class_word": w}})
                for r, w in zip(roots, words)]
    return datasets[0] if len(datasets) == 1 else Concepts(datasets)
