"""The reference's `DataModuleFromConfig`: datasets built from config, batched by Lightning."""
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from ldm.util import instantiate_from_config


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(self, batch_size, train=None, validation=None, num_workers=None, wrap=False, **ignored):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = batch_size * 2 if num_workers is None else num_workers
        self.train_config = train
        self.train_dataset = None

    def setup(self, stage=None):
        if self.train_dataset is None:
            self.train_dataset = instantiate_from_config(self.train_config)

    def train_dataloader(self):
        self.setup()
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
