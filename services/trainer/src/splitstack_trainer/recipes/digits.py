"""The digits recipes: Lightning code written the way any team writes it, trained on a registry dataset.

The dataset version is an `.npz` with `inputs` (N x 64 float32, the 8x8 digits pixels) and `labels`
(N integers 0..9), e.g. scikit-learn's bundled digits scaled to [0, 1]. The data module receives the
downloaded, digest-checked file (`dataset_path`) and the training profile's batch size; the
modules take rows of 64 features (the CNN reshapes them to 1x8x8 itself), so both share the data
and the hand-off signature.

`check_hyperparameters` (a static method the trainer calls when a job is submitted, before any
process starts) rejects values the constructors would fail on later.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FEATURES = 64
CLASSES = 10


class DigitsDataModule(L.LightningDataModule):
    """Train/validation split of a digits .npz; batches are (inputs, labels)."""

    def __init__(self, dataset_path: str, batch_size: int, val_fraction: float = 0.2, split_seed: int = 0) -> None:
        super().__init__()
        self.check_hyperparameters(val_fraction=val_fraction)
        self.dataset_path = dataset_path
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.train: TensorDataset | None = None
        self.val: TensorDataset | None = None

    @staticmethod
    def check_hyperparameters(val_fraction: float = 0.2, **_: object) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        with np.load(self.dataset_path) as data:
            missing = [k for k in ("inputs", "labels") if k not in data]
            if missing:
                raise ValueError(f"dataset {self.dataset_path} lacks arrays {missing}; has {sorted(data.files)}")
            inputs = np.asarray(data["inputs"], dtype=np.float32).reshape(len(data["inputs"]), -1)
            labels = np.asarray(data["labels"], dtype=np.int64)
        if inputs.shape[1] != FEATURES or len(inputs) != len(labels):
            raise ValueError(f"expected inputs N x {FEATURES} and N labels, got {inputs.shape} and {labels.shape}")
        order = np.random.default_rng(self.split_seed).permutation(len(inputs))
        cut = int(round(len(inputs) * (1.0 - self.val_fraction)))
        train, val = order[:cut], order[cut:]
        self.train = TensorDataset(torch.from_numpy(inputs[train]), torch.from_numpy(labels[train]))
        self.val = TensorDataset(torch.from_numpy(inputs[val]), torch.from_numpy(labels[val]))

    def train_dataloader(self) -> DataLoader:
        # The profile's batch size where the data allows it: never larger than the training split.
        return DataLoader(self.train, batch_size=min(self.batch_size, len(self.train)), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=min(self.batch_size, len(self.val)))


class DigitsClassifier(L.LightningModule):
    """Cross-entropy training and accuracy validation of a 10-class digits network (`self.net`)."""

    net: nn.Module

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.example_input_array = torch.zeros(2, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits.float(), y), sync_dist=True)
        self.log("val_accuracy", (logits.argmax(dim=1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsMLP(DigitsClassifier):
    """64 -> hidden -> ... -> 10 (default two 1024-wide layers: where INT8 pays off)."""

    def __init__(self, hidden: int = 1024, layers: int = 2, lr: float = 3e-3) -> None:
        self.check_hyperparameters(hidden=hidden, layers=layers, lr=lr)
        super().__init__(lr)
        self.save_hyperparameters()
        widths = [FEATURES] + [hidden] * layers
        blocks: list[nn.Module] = []
        for fan_in, fan_out in zip(widths, widths[1:]):
            blocks += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(widths[-1], CLASSES))

    @staticmethod
    def check_hyperparameters(hidden: int = 1024, layers: int = 2, lr: float = 3e-3, **_: object) -> None:
        if hidden < 1 or layers < 1:
            raise ValueError(f"hidden and layers must be >= 1, got hidden={hidden}, layers={layers}")
        if not 0.0 < lr < 10.0:
            raise ValueError(f"lr must be in (0, 10), got {lr}")


class DigitsCNN(DigitsClassifier):
    """Two 3x3 convolutions with pooling on the 8x8 image, then a linear layer (tiny: INT8 does not pay)."""

    def __init__(self, channels: int = 8, lr: float = 1e-2) -> None:
        self.check_hyperparameters(channels=channels, lr=lr)
        super().__init__(lr)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * channels * 2 * 2, CLASSES))

    @staticmethod
    def check_hyperparameters(channels: int = 8, lr: float = 1e-2, **_: object) -> None:
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not 0.0 < lr < 10.0:
            raise ValueError(f"lr must be in (0, 10), got {lr}")
