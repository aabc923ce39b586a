"""What a finished job hands over, written once to `<work_dir>/outputs/` before anything is registered.

- `model.ckpt`: the Lightning checkpoint after the last epoch (resume training from it);
- `model.pt2`: the exported program (`torch.export`, FP32), input `x` with a dynamic batch axis,
  output `logits` — the code-free hand-off to the converter;
- `sample.npz`: `inputs`, `labels` and `reference_outputs` (the exported program's own outputs)
  of held-out rows, at least `handoff.SAMPLE_MIN_ROWS`;
- `result.json`: metrics, signature and run facts that go into the version's lineage.

The files are staged in a sibling directory and renamed into place, so an `outputs/` directory
is always complete: an attempt that finds one (the trainer restarted after training finished)
registers it instead of training again, and the registration is idempotent because its inputs
never change.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from google.protobuf import json_format
from torch import nn
from torch.export import Dim

from splitstack.common.v1 import common_pb2
from splitstack.contracts import handoff
from splitstack_trainer.jobconfig import RESULT_FILE

SAMPLE_ROWS = 512


class HandOff(nn.Module):
    """The trained network behind the hand-off's fixed input name `x`, in FP32."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@dataclass(frozen=True)
class JobOutputs:
    """The files of a job's `outputs/` directory."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "model.ckpt"

    @property
    def program(self) -> Path:
        return self.root / handoff.EXPORTED_PROGRAM_FILENAME

    @property
    def sample(self) -> Path:
        return self.root / handoff.SAMPLE_FILENAME

    @property
    def result_file(self) -> Path:
        return self.root / RESULT_FILE

    @property
    def complete(self) -> bool:
        return self.result_file.is_file()

    def result(self) -> dict[str, Any]:
        return json.loads(self.result_file.read_text())

    def signature(self) -> common_pb2.Signature:
        return json_format.ParseDict(self.result()["signature"], common_pb2.Signature())


def write_outputs(outputs: JobOutputs, checkpoint: Path, trained: nn.Module, datamodule: L.LightningDataModule,
                  example: torch.Tensor, result: dict[str, Any]) -> None:
    """Stage checkpoint, exported program, sample and result next to `outputs.root`, then rename."""
    staging = outputs.root.with_name(f"{outputs.root.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    staged = JobOutputs(staging)
    shutil.copyfile(checkpoint, staged.checkpoint)
    export_program(trained, example, staged.program)
    inputs, labels = sample_rows(datamodule)
    reference = run_program(staged.program, inputs)
    arrays = {"inputs": inputs, "labels": labels, "reference_outputs": reference}
    handoff.check_sample(arrays)
    np.savez(staged.sample, **arrays)
    signature = handoff.signature(list(inputs.shape[1:]), int(reference.shape[1]))
    record = {**result, "signature": json_format.MessageToDict(signature), "sample_rows": len(inputs)}
    staged.result_file.write_text(json.dumps(record, sort_keys=True, indent=1))
    shutil.rmtree(outputs.root, ignore_errors=True)
    os.replace(staging, outputs.root)


def export_program(trained: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export with a dynamic batch axis named `batch`, saved with torch.export.save."""
    module = HandOff(trained.float().eval())
    example = example.detach().float().cpu()
    if example.shape[0] < 2:  # a batch of one would specialize the batch axis
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    batch = Dim(handoff.BATCH_DIM_NAME, min=1, max=handoff.MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes={handoff.INPUT_NAME: {0: batch}})
    torch.export.save(program, path)


def run_program(path: Path, inputs: np.ndarray) -> np.ndarray:
    """The saved exported program's outputs on `inputs` (the sample's reference outputs)."""
    program = torch.export.load(path)
    with torch.no_grad():
        return program.module()(torch.from_numpy(inputs)).float().numpy()


def sample_rows(datamodule: L.LightningDataModule) -> tuple[np.ndarray, np.ndarray]:
    """Up to SAMPLE_ROWS held-out (validation) rows, topped up from training rows if too few."""
    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for loader in (datamodule.val_dataloader(), datamodule.train_dataloader()):
        for x, y in loader:
            inputs.append(x.detach().float().cpu().numpy())
            labels.append(y.detach().cpu().numpy())
            if sum(len(a) for a in inputs) >= SAMPLE_ROWS:
                break
        if sum(len(a) for a in inputs) >= handoff.SAMPLE_MIN_ROWS:
            break
    return np.concatenate(inputs)[:SAMPLE_ROWS].astype(np.float32), np.concatenate(labels)[:SAMPLE_ROWS]


def example_input(module: L.LightningModule, datamodule: L.LightningDataModule) -> torch.Tensor:
    """The module's `example_input_array`, else the first validation batch's inputs."""
    example = getattr(module, "example_input_array", None)
    if isinstance(example, torch.Tensor):
        return example
    x, _ = next(iter(datamodule.val_dataloader()))
    return x
