"""Progress from rank zero: a Lightning callback that reports what training is doing.

Every `interval` seconds during an epoch, and at the end of each epoch, rank zero sends a
`Progress` (epoch, global step, total steps, last training loss, the latest validation metrics,
samples per second over all ranks since this attempt started, and the ETA that rate implies).
Other ranks send nothing. Outside the fit loop the job reports its stages through `report`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch

from splitstack.trainer.v1 import trainer_pb2 as pb


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().float().item()
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def validation_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric `val*` entries of Lightning's callback metrics."""
    found = {name: _number(value) for name, value in metrics.items() if name.startswith("val")}
    return {name: value for name, value in found.items() if value is not None}


class ProgressReporter(L.Callback):
    """Sends `Progress` messages for one job from rank zero."""

    def __init__(self, job_id: str, max_epochs: int, interval: float, send: Callable[[pb.Progress], None]) -> None:
        self.job_id = job_id
        self.max_epochs = max_epochs
        self.interval = interval
        self._send = send
        self._started = time.monotonic()
        self._first_step = 0
        self._rows = 0
        self._last_sent = 0.0
        self._loss = 0.0
        self._total_steps = 0
        self.is_rank_zero = True

    # ---- stages outside the fit loop -----------------------------------------------------------

    def report(self, stage: str, message: str, **fields: Any) -> None:
        """Send a progress message for a stage (fit, validate, export, register) from rank zero."""
        if self.is_rank_zero:
            self._send(self._progress(stage, message=message, **fields))

    def _progress(self, stage: str, **fields: Any) -> pb.Progress:
        progress = pb.Progress(job_id=self.job_id, stage=stage, max_epochs=self.max_epochs,
                               total_steps=self._total_steps, **fields)
        progress.at.GetCurrentTime()
        return progress

    # ---- Lightning hooks -----------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.is_rank_zero = trainer.is_global_zero
        steps = trainer.estimated_stepping_batches
        self._total_steps = int(steps) if math.isfinite(steps) else 0
        self._started = time.monotonic()
        self._first_step = trainer.global_step
        self._rows = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._rows += _rows_of(batch) * trainer.world_size
        loss = _number(outputs.get("loss") if isinstance(outputs, Mapping) else outputs)
        if loss is not None:
            self._loss = loss
        if trainer.is_global_zero and time.monotonic() - self._last_sent >= self.interval:
            self._report_fit(trainer, "")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._report_fit(trainer, f"epoch {trainer.current_epoch + 1}/{self.max_epochs} done")

    def _report_fit(self, trainer: L.Trainer, message: str) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        steps_done = trainer.global_step - self._first_step
        rate = self._rows / elapsed
        eta = (self._total_steps - trainer.global_step) * elapsed / steps_done if steps_done > 0 else 0.0
        self._last_sent = time.monotonic()
        self._send(self._progress(
            "fit", epoch=trainer.current_epoch, step=trainer.global_step, loss=self._loss,
            val_metrics=validation_metrics(trainer.callback_metrics), samples_per_second=rate,
            eta_seconds=max(eta, 0.0), message=message))


def _rows_of(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else 0
