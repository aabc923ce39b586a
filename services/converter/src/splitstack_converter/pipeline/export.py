"""Exported program -> a single-file ONNX model whose batch axis is dynamic and named "batch".

The hand-off (splitstack.contracts.handoff) fixes one input (`x`, float32, [batch, *features])
and one output (`logits`, [batch, classes]). `torch.onnx.export(dynamo=True)` names the dynamic
axis after its symbol (e.g. `s77`); it is renamed to `batch` everywhere it appears, the model is
kept in one file (no external data), and the ONNX checker must pass.

Two halves: `export_raw` loads the program and runs the exporter (in the service it runs in a
child process, see `worker.export_in_child`: loading a .pt2 unpickles parts of it);
`finish_onnx` checks what came out against the hand-off and the checker (in the service process).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from splitstack.contracts import handoff
from splitstack_converter.pipeline import PipelineError

log = logging.getLogger(__name__)

ONNX_SIZE_LIMIT = 2 * 1024 ** 3 - 1   # protobuf's limit for a single-file model


@dataclass(frozen=True)
class OnnxModelInfo:
    """What the rest of the pipeline needs to know about an exported ONNX model."""

    input_name: str
    output_name: str
    features: tuple[int, ...]        # per-row input shape (the batch axis excluded)
    opset: int


def _load_program(program_path: Path):  # noqa: ANN202  torch.export.ExportedProgram
    import torch

    try:
        return torch.export.load(str(program_path))
    except MemoryError:
        raise                # the child's memory limit: reported as such by the parent
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in _plain(str(exc)).splitlines() if "Unsupported global" in line), "")
        raise PipelineError("export", "cannot load the exported program: it holds a pickled object that is not a "
                                      "tensor or a plain container (refused: weights-only loading)"
                                      + (f": {detail.split('. Please')[0][:300]}" if detail else "")) from None
    except Exception as exc:  # noqa: BLE001  any failure to read the input is the input's fault
        raise PipelineError("export", f"cannot load the exported program: {type(exc).__name__}: "
                                      f"{_first_line(exc)}") from None


def _user_inputs(program) -> list[str]:  # noqa: ANN001
    return list(program.graph_signature.user_inputs)


def export_onnx(program_path: Path, onnx_path: Path) -> OnnxModelInfo:
    """Write `onnx_path` from the exported program at `program_path`; PipelineError("export") on failure.

    In this process: only for programs this process made. The service loads registry artifacts in
    a child (`worker.export_in_child`), which runs `export_raw` there and `finish_onnx` here.
    """
    raw = onnx_path.with_name(onnx_path.stem + ".raw.onnx")
    export_raw(program_path, raw)
    try:
        return finish_onnx(onnx.load(str(raw), load_external_data=False), onnx_path)
    finally:
        raw.unlink(missing_ok=True)


def export_raw(program_path: Path, raw_path: Path) -> None:
    """Load the exported program and write the exporter's ONNX model as it is (no checks) to `raw_path`."""
    import torch

    program = _load_program(program_path)
    inputs = _user_inputs(program)
    if len(inputs) != 1:
        raise PipelineError("export", f"the exported program takes {len(inputs)} inputs {inputs}; the hand-off "
                                      f"allows exactly one ({handoff.INPUT_NAME!r})")
    try:
        # The exporter prints its progress and warns about deprecations inside torch itself.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            onnx_program = torch.onnx.export(program, dynamo=True, external_data=False, verbose=False,
                                             output_names=[handoff.OUTPUT_NAME])
        model = onnx_program.model_proto
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001  unsupported operators and friends end up here
        raise PipelineError("export", f"ONNX export failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if model.ByteSize() > ONNX_SIZE_LIMIT:
        raise PipelineError("export", f"the ONNX model is {model.ByteSize()} bytes: too large for one file")
    onnx.save_model(model, str(raw_path), save_as_external_data=False)


def finish_onnx(model: onnx.ModelProto, onnx_path: Path) -> OnnxModelInfo:
    """Check the model against the hand-off (one input `x`, one output `logits`, float32), name the
    batch axis, run the full checker and save `model` as one file; its info."""
    check_handoff_io(model)
    rename_batch_axis(model)
    if model.ByteSize() > ONNX_SIZE_LIMIT:
        raise PipelineError("export", f"the ONNX model is {model.ByteSize()} bytes: too large for one file")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001  checker errors come in several types
        raise PipelineError("export", f"the ONNX checker rejected the model: {_first_line(exc)}") from None
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(onnx_path), save_as_external_data=False)
    return model_info(model)


def check_handoff_io(model: onnx.ModelProto) -> None:
    """PipelineError unless the model has exactly the hand-off's input and output, as float32 tensors."""
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if inputs != [handoff.INPUT_NAME] or outputs != [handoff.OUTPUT_NAME]:
        raise PipelineError("export", f"the ONNX model has inputs {inputs[:5]} and outputs {outputs[:5]}; the "
                                      f"hand-off needs one input {handoff.INPUT_NAME!r} and one output "
                                      f"{handoff.OUTPUT_NAME!r}")
    for value in (model.graph.input[0], model.graph.output[0]):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise PipelineError("export", f"the ONNX model's {value.name!r} is not a float32 tensor")


def rename_batch_axis(model: onnx.ModelProto, name: str = handoff.BATCH_DIM_NAME) -> str:
    """Rename the input's dynamic first axis to `name` wherever its symbol appears; the old symbol.

    PipelineError when the first input axis is not dynamic (the serving side batches requests).
    """
    first = model.graph.input[0].type.tensor_type.shape.dim
    if not first or not first[0].dim_param:
        raise PipelineError("export", "the model's input has no dynamic batch axis (export the program with "
                                      "dynamic_shapes on dimension 0)")
    symbol = first[0].dim_param
    if symbol == name:
        return symbol
    pattern = re.compile(rf"\b{re.escape(symbol)}\b")
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(name, dim.dim_param)
    return symbol


def model_info(model: onnx.ModelProto) -> OnnxModelInfo:
    """Input/output names, per-row feature shape and opset of a one-input, one-output model."""
    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    if any(not d.HasField("dim_value") for d in dims):
        raise PipelineError("export", "only the batch axis of the input may be dynamic")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxModelInfo(input_name=model.graph.input[0].name, output_name=model.graph.output[0].name,
                         features=tuple(d.dim_value for d in dims), opset=opset)


def batch_axis_name(path: Path) -> str:
    """The name of the input's first axis in the ONNX model at `path` (tests, checks)."""
    model = onnx.load(str(path), load_external_data=False)
    return model.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def _plain(text: str) -> str:
    """`text` without terminal colour codes (torch's messages carry some)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _first_line(exc: BaseException) -> str:
    text = _plain(str(exc)).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
