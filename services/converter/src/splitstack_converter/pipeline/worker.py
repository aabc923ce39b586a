"""The pipeline's work on untrusted bytes, each piece in its own child process (see `isolation`).

Parent side (called from the service's worker thread): `export_in_child`, `optimize_in_child`,
`quantize_in_child`, `run_in_child` (the gate's outputs on the sample) and `measure_in_child` (a
profile). Each writes its inputs into a scratch directory, runs one child under the pool's
`ChildLimits` and validates what comes back: the exported ONNX against the hand-off and the
checker, outputs as a plain float32 array (no pickles), the profile as a `MeasuredProfile`.

Child side (`python -I -m splitstack_converter.pipeline.worker SPEC`): sets its memory limit and
asks to die with its parent before importing anything heavy, then runs the task the spec names.
An input the child finds unusable is reported as a refusal (stage and reason), anything else
exits non-zero with its traceback in the child's log.

Exported programs are loaded with pickles refused unless the operator allows them
(`allow_pickle`): `TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` makes every `torch.load` use the restricted
weights-only unpickler (torch itself falls back to full unpickling when a weights-only load
fails), and the archive loader's plain `pickle.loads` and TorchScript object loader refuse.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from splitstack_converter.pipeline import STAGES, PipelineError
from splitstack_converter.pipeline.isolation import ChildFailed, ChildLimits, ChildRefused, run_child

INPUTS_FILENAME = "inputs.npy"
OUTPUTS_FILENAME = "outputs.npy"
PR_SET_PDEATHSIG = 1


# ---- parent side ------------------------------------------------------------------------------------

def _child(task: str, spec: dict[str, Any], scratch: Path, limits: ChildLimits, stage: str,
           what: str) -> dict[str, Any]:
    """run_child, with a refusal or a failure of the child raised as PipelineError(`stage`)."""
    try:
        return run_child(task, spec, scratch, limits, what=what)
    except ChildRefused as exc:
        raise PipelineError(exc.stage if exc.stage in STAGES else stage, exc.reason) from None
    except ChildFailed as exc:
        raise PipelineError(stage, exc.reason) from None


def export_in_child(program: Path, onnx_path: Path, scratch: Path, limits: ChildLimits, *,
                    allow_pickle: bool = False):  # noqa: ANN201  export.OnnxModelInfo
    """Load the exported program and export it to ONNX in a child; check and save the model here."""
    import onnx

    from splitstack_converter.pipeline.export import ONNX_SIZE_LIMIT, finish_onnx

    raw = scratch / "exported.raw.onnx"
    _child("export", {"program": str(program), "output": str(raw), "allow_pickle": allow_pickle}, scratch, limits,
           "export", "loading and exporting the program")
    try:
        size = raw.stat().st_size
    except OSError:
        raise PipelineError("export", "the export process wrote no ONNX model") from None
    if size > ONNX_SIZE_LIMIT:
        raise PipelineError("export", f"the exported ONNX model is {size} bytes: too large for one file")
    try:
        model = onnx.load(str(raw), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  a malformed protobuf comes in several exception types
        raise PipelineError("export", f"the export process wrote no readable ONNX model: {exc}") from None
    finally:
        raw.unlink(missing_ok=True)
    return finish_onnx(model, onnx_path)


def optimize_in_child(src: Path, dst: Path, level: str, scratch: Path, limits: ChildLimits) -> None:
    """ONNX Runtime's offline optimization of `src` into `dst`, in a child."""
    _child("optimize", {"source": str(src), "output": str(dst), "level": level}, scratch, limits, "optimize",
           "optimizing the ONNX model")
    if not dst.is_file():
        raise PipelineError("optimize", "the optimization process wrote no model")


def quantize_in_child(src: Path, dst: Path, calibration: np.ndarray, input_name: str, scheme: str, scratch: Path,
                      limits: ChildLimits) -> None:
    """INT8 (QDQ) quantization of `src` into `dst` with scheme `scheme` (a name), in a child."""
    scratch.mkdir(parents=True, exist_ok=True)
    np.save(scratch / INPUTS_FILENAME, calibration)
    _child("quantize", {"source": str(src), "output": str(dst), "calibration": str(scratch / INPUTS_FILENAME),
                        "input_name": input_name, "scheme": scheme}, scratch, limits, "quantize",
           "quantizing the model")
    if not dst.is_file():
        raise PipelineError("quantize", "the quantization process wrote no model")


def run_in_child(fmt: int, model: Path, inputs: np.ndarray, max_batch: int, ort: object, scratch: Path,
                 limits: ChildLimits) -> np.ndarray:
    """The candidate's outputs on every row of `inputs` (batches of at most `max_batch`), computed in a child.

    RuntimeError naming the failure when the candidate cannot load or run, or answers malformed outputs."""
    scratch.mkdir(parents=True, exist_ok=True)
    np.save(scratch / INPUTS_FILENAME, inputs)
    try:
        run_child("run", {"format": fmt, "model": str(model), "inputs": str(scratch / INPUTS_FILENAME),
                          "batch": max_batch, "ort": asdict(ort), "output": str(scratch / OUTPUTS_FILENAME)},
                  scratch, limits, what="running the candidate on the sample")
    except (ChildFailed, ChildRefused) as exc:
        raise RuntimeError(exc.reason) from None
    try:
        outputs = np.load(scratch / OUTPUTS_FILENAME, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise RuntimeError(f"the candidate's outputs are unreadable: {exc}") from None
    if outputs.dtype != np.float32 or outputs.ndim != 2:
        raise RuntimeError(f"the candidate answered {outputs.dtype} outputs of shape {list(outputs.shape)}")
    return outputs


def measure_in_child(fmt: int, model: Path, inputs: np.ndarray, batches: list[int], floors: object, ort: object,
                     scratch: Path, limits: ChildLimits, *, target: str, device: str):  # noqa: ANN201
    """The candidate's MeasuredProfile, measured in a fresh child (see profile.py); RuntimeError on failure."""
    from google.protobuf import json_format

    from splitstack.common.v1 import common_pb2

    scratch.mkdir(parents=True, exist_ok=True)
    np.save(scratch / INPUTS_FILENAME, inputs)
    output = scratch / "profile.json"
    try:
        run_child("profile", {"format": fmt, "model": str(model), "inputs": str(scratch / INPUTS_FILENAME),
                              "batches": batches, "floors": asdict(floors), "ort": asdict(ort), "target": target,
                              "device": device, "output": str(output)}, scratch, limits,
                  what="measuring the candidate")
        return json_format.Parse(output.read_text(), common_pb2.MeasuredProfile())
    except (ChildFailed, ChildRefused) as exc:
        raise RuntimeError(exc.reason) from None
    except (OSError, json_format.ParseError) as exc:
        raise RuntimeError(f"the profile is unreadable: {exc}") from None


# ---- child side -------------------------------------------------------------------------------------

def _confine(memory_bytes: int) -> None:
    """Limit this process's address space, write no core files, die with the parent."""
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass   # not Linux: the parent's time limit still applies


def _refuse_pickles() -> None:
    """Make torch's loaders refuse to unpickle anything but tensors and plain containers."""
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    import torch
    import torch.export.pt2_archive._package as package

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("the exported program contains a pickled object; this converter loads tensors only "
                           "(the operator may allow pickled programs: SPLITSTACK_CONVERTER_ALLOW_PICKLED_PROGRAMS)")

    class NoPickle:
        loads = staticmethod(refuse)
        load = staticmethod(refuse)

    package.pickle = NoPickle()
    torch._C._pickle_load_obj = refuse   # TorchScript custom objects


def _task_export(spec: dict[str, Any]) -> dict[str, Any]:
    if not spec.get("allow_pickle"):
        _refuse_pickles()
    from splitstack_converter.pipeline import quiet_libraries
    from splitstack_converter.pipeline.export import export_raw

    quiet_libraries()
    export_raw(Path(spec["program"]), Path(spec["output"]))
    return {}


def _task_optimize(spec: dict[str, Any]) -> dict[str, Any]:
    from splitstack_converter.pipeline.optimize import optimize_onnx

    optimize_onnx(Path(spec["source"]), Path(spec["output"]), spec["level"])
    return {}


def _task_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    from splitstack_converter.pipeline import quiet_libraries
    from splitstack_converter.pipeline.quantize import SCHEMES, quantize_int8

    quiet_libraries()
    rows = np.load(spec["calibration"], allow_pickle=False)
    quantize_int8(Path(spec["source"]), Path(spec["output"]), rows, spec["input_name"], SCHEMES[spec["scheme"]])
    return {}


def _task_run(spec: dict[str, Any]) -> dict[str, Any]:
    from splitstack_converter.pipeline.gate import run_in_batches
    from splitstack_converter.pipeline.runners import OrtOptions, open_runner

    inputs = np.load(spec["inputs"], allow_pickle=False)
    runner = open_runner(spec["format"], Path(spec["model"]), OrtOptions(**spec["ort"]))
    try:
        outputs = run_in_batches(runner.run, inputs, spec["batch"])
    finally:
        runner.close()
    np.save(spec["output"], np.ascontiguousarray(outputs, dtype=np.float32))
    return {}


def _task_profile(spec: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf import json_format

    from splitstack_converter.pipeline.profile import Floors, profile_candidate
    from splitstack_converter.pipeline.runners import OrtOptions, open_runner

    inputs = np.load(spec["inputs"], allow_pickle=False)
    ort = OrtOptions(**spec["ort"])
    profile = profile_candidate(lambda: open_runner(spec["format"], Path(spec["model"]), ort), inputs,
                                spec["batches"], Floors(**spec["floors"]), target=spec["target"],
                                device=spec["device"])
    Path(spec["output"]).write_text(json_format.MessageToJson(profile))
    return {}


TASKS = {"export": _task_export, "optimize": _task_optimize, "quantize": _task_quantize, "run": _task_run,
         "profile": _task_profile}


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    _confine(int(spec.get("memory_bytes", 0)))
    try:
        result: dict[str, Any] = {"ok": True, **TASKS[spec["task"]](spec)}
    except PipelineError as exc:
        result = {"refused": {"stage": exc.stage, "reason": exc.reason}}
    except MemoryError:
        traceback.print_exc()
        return 3
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
