"""The demo's data: scikit-learn's bundled digits, split into two dataset versions and a held-out set.

Rows are shuffled once with a fixed seed; 10 % are held out (never published: the demo measures
the served model's accuracy on them); the first dataset version holds 60 % of the rest, the second
all of it. Files are `.npz` with `inputs` (N x 64 float32 pixels scaled to [0, 1]) and `labels`
(int64 0..9), the format the trainer's digits recipes read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitstack.client.stackfile import StackError

HOLDOUT_FRACTION = 0.10
FIRST_FRACTION = 0.60


@dataclass(frozen=True)
class Rows:
    """Inputs (N x 64 float32) and labels (N int64)."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def write(self, path: Path) -> Path:
        np.savez(path, inputs=self.inputs, labels=self.labels)
        return path


@dataclass(frozen=True)
class DigitsSplit:
    """The first dataset version's rows, all published rows, and the held-out rows."""

    first: Rows
    full: Rows
    holdout: Rows


def digits_split(seed: int = 0) -> DigitsSplit:
    """sklearn's bundled digits (no download), shuffled and split as the module docstring says."""
    try:
        from sklearn.datasets import load_digits   # the demo's only use of scikit-learn; imported when needed
    except ImportError:
        raise StackError("the demo needs scikit-learn for its digits data: "
                         "pip install 'splitstack-client[demo]' (make setup installs it)") from None
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    inputs = (digits.data[order] / 16.0).astype(np.float32)
    labels = digits.target[order].astype(np.int64)
    held = int(round(len(labels) * HOLDOUT_FRACTION))
    published = Rows(inputs[held:], labels[held:])
    first = int(round(len(published) * FIRST_FRACTION))
    return DigitsSplit(Rows(published.inputs[:first], published.labels[:first]), published,
                       Rows(inputs[:held], labels[:held]))
