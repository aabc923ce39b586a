"""Small plain-torch models trained on scikit-learn's bundled digits, handed off like the trainer does.

An MLP (64-1024-1024-10: matmul-heavy, where INT8 pays off) and a tiny CNN on the 8x8 images
(where quantize/dequantize overhead dominates). Each is trained for a few epochs so accuracy is
meaningful, exported with `torch.export` and a dynamic batch axis, saved with `torch.export.save`,
and paired with a sample .npz (inputs, labels, the exported program's reference outputs) of the
held-out rows. Used by the tests and by bench/bench_converter.py.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from splitstack.contracts import handoff

TRAIN_ROWS = 1400          # of 1797; the remaining 397 rows are the sample (>= SAMPLE_MIN_ROWS)


@dataclass(frozen=True)
class Digits:
    """The digits data set, scaled to [0, 1], split into training rows and held-out sample rows."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def digits(seed: int = 0) -> Digits:
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return Digits(x[:TRAIN_ROWS], y[:TRAIN_ROWS], x[TRAIN_ROWS:], y[TRAIN_ROWS:])


class DigitsMLP(nn.Module):
    """64 -> 1024 -> 1024 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyDigitsCNN(nn.Module):
    """Two 3x3 convolutions with pooling on the 8x8 image, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 8, 8)
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


# kind -> (module class, epochs, learning rate)
RECIPES = {"mlp": (DigitsMLP, 3, 1e-3), "cnn": (TinyDigitsCNN, 20, 5e-3)}


def train(model: nn.Module, data: Digits, epochs: int, lr: float, batch: int = 64) -> float:
    """Adam on the training rows; the held-out accuracy."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(x), batch):
            loss = nn.functional.cross_entropy(model(x[start:start + batch]), y[start:start + batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(data.test_x)).argmax(1).numpy() == data.test_y).mean())


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@dataclass(frozen=True)
class HandOff:
    """What the trainer would upload for one version, plus the live module (for the bench)."""

    kind: str
    module: nn.Module
    program: bytes             # torch.export.save output
    sample: bytes              # .npz: inputs, labels, reference_outputs
    accuracy: float
    data: Digits

    def sample_with(self, **extra: np.ndarray) -> bytes:
        """The sample with extra arrays (e.g. calibration_inputs)."""
        with np.load(io.BytesIO(self.sample)) as archive:
            arrays = {key: archive[key] for key in archive.files}
        return npz_bytes(**arrays, **extra)


def export_program(module: nn.Module, features: int = 64) -> tuple[bytes, torch.export.ExportedProgram]:
    """torch.export with a dynamic batch axis, saved to bytes."""
    batch = torch.export.Dim(handoff.BATCH_DIM_NAME, min=1, max=handoff.MAX_BATCH)
    program = torch.export.export(module, (torch.zeros(2, features),), dynamic_shapes={"x": {0: batch}})
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue(), program


def build(kind: str, seed: int = 0) -> HandOff:
    """Train the `kind` model ("mlp" or "cnn") and export it with its sample."""
    torch.manual_seed(seed)
    cls, epochs, lr = RECIPES[kind]
    data = digits(seed)
    module = cls()
    accuracy = train(module, data, epochs, lr)
    program_bytes, program = export_program(module)
    with torch.no_grad():
        reference = program.module()(torch.from_numpy(data.test_x)).numpy()
    sample = npz_bytes(inputs=data.test_x, labels=data.test_y, reference_outputs=reference)
    return HandOff(kind, module, program_bytes, sample, accuracy, data)
