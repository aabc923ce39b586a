"""Building, gating and measuring each candidate format of a target from the optimized ONNX model.

A candidate whose build, gate or measurement fails is rejected with its reason (the others go on);
only the stages before (fetch, export, optimize) end a whole conversion. INT8 quantization (which
runs the model on the calibration rows), the gate's run over the sample and the profile each run
in a child process under the pool's `ChildLimits` (see `isolation`): a model that hangs, crashes or
exhausts memory there rejects its candidate and nothing else. TensorRT engines are built here
(GPU pools only).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from splitstack.common.v1 import common_pb2
from splitstack_converter.pipeline import PipelineError, tensorrt
from splitstack_converter.pipeline.candidates import Candidate, sha256_file
from splitstack_converter.pipeline.export import OnnxModelInfo
from splitstack_converter.pipeline.gate import Tolerance, evaluate
from splitstack_converter.pipeline.isolation import ChildLimits
from splitstack_converter.pipeline.profile import Floors, batch_sizes
from splitstack_converter.pipeline.quantize import TENSORRT_SCHEME, cpu_scheme, quantize_int8
from splitstack_converter.pipeline.runners import OrtOptions, cpu_description
from splitstack_converter.pipeline.sample import Sample
from splitstack_converter.pipeline.worker import measure_in_child, quantize_in_child, run_in_child

log = logging.getLogger(__name__)

ONNX_FORMATS = (common_pb2.ONNX_FP32, common_pb2.ONNX_INT8)
TENSORRT_FORMATS = {common_pb2.TENSORRT_FP16: "FP16", common_pb2.TENSORRT_INT8: "INT8"}


@dataclass(frozen=True)
class TargetBuild:
    """Everything candidate builds need to know about the target and this pool."""

    target: common_pb2.InferenceTarget
    ort: OrtOptions
    floors: Floors
    engine_cache_dir: Path
    limits: ChildLimits = ChildLimits()        # each child's time (gate, quantize) and memory limit

    @property
    def max_batch(self) -> int:
        return self.target.max_batch

    def device(self) -> str:
        if self.target.accelerator == common_pb2.GPU:
            return tensorrt.gpu_product() or self.target.gpu_product
        return cpu_description()


class CandidateBuilder:
    """Builds, gates and profiles the candidates of one conversion inside `workdir`."""

    def __init__(self, build: TargetBuild, optimized: Path, info: OnnxModelInfo, sample: Sample, workdir: Path,
                 trt_module: object | None = None) -> None:
        self.build_settings = build
        self.optimized = optimized
        self.info = info
        self.sample = sample
        self.workdir = workdir
        self._trt = trt_module
        self._children = 0

    def scratch(self, task: str) -> Path:
        """A fresh scratch directory for one child process."""
        self._children += 1
        return self.workdir / f"child-{self._children}-{task}"

    # -- build
    def build(self, fmt: int) -> Candidate:
        """The candidate of format `fmt`, built (path set) or rejected with the reason."""
        candidate = Candidate(format=fmt)
        try:
            if fmt == common_pb2.ONNX_FP32:
                path = self.workdir / candidate.filename
                shutil.copyfile(self.optimized, path)
                candidate.built(path, optimization="onnxruntime-basic")
            elif fmt == common_pb2.ONNX_INT8:
                path = self.workdir / candidate.filename
                scheme = cpu_scheme()
                quantize_in_child(self.optimized, path, self.sample.calibration_inputs, self.info.input_name,
                                  scheme.name, self.scratch("quantize"), self.build_settings.limits)
                candidate.built(path, quantization=f"qdq-{scheme.name}-minmax",
                                calibration_rows=str(len(self.sample.calibration_inputs)))
            elif fmt in TENSORRT_FORMATS:
                self._build_engine(candidate, TENSORRT_FORMATS[fmt])
            else:
                candidate.reject(f"format {candidate.name} is not supported by this converter")
        except PipelineError as exc:
            candidate.reject(f"{exc.stage} failed: {exc.reason}")
        except Exception as exc:  # noqa: BLE001  one format failing to build must not end the others
            log.warning("building %s failed", candidate.name, exc_info=True)
            candidate.reject(f"building {candidate.name} failed: {_first_line(exc)}")
        return candidate

    def _build_engine(self, candidate: Candidate, precision: str) -> None:
        trt = self._trt or tensorrt.import_tensorrt()
        if trt is None:
            candidate.reject("TensorRT is not installed on this converter")
            return
        caps = tensorrt.detect_capabilities(trt)
        source = self.prepare_tensorrt_onnx(precision, caps)
        target = self.build_settings.target
        shapes = tensorrt.profile_shapes(self.info.input_name, self.info.features, target.max_batch,
                                         target.selection_metric.batch_size or 1)
        product = tensorrt.gpu_product() or target.gpu_product
        key = tensorrt.cache_key(sha256_file(source), product, caps.version, precision, shapes)
        cache = tensorrt.EngineCache(self.build_settings.engine_cache_dir)
        plan = cache.get(key)
        if plan is None:
            plan = cache.put(key, tensorrt.build_plan(trt, caps, source, precision, shapes))
        path = self.workdir / candidate.filename
        shutil.copyfile(plan, path)
        candidate.built(path, tensorrt_version=caps.version, gpu_product=product, cache_key=key,
                        profile=shapes.describe())

    def prepare_tensorrt_onnx(self, precision: str, caps: tensorrt.Capabilities) -> Path:
        """The ONNX model TensorRT parses for `precision`: explicit Q/DQ for INT8 (every version);
        for FP16 the FP32 model plus the FP16 flag (10.x) or an FP16 model (11.x, strongly typed)."""
        if precision == "INT8":
            path = self.workdir / "tensorrt-int8-qdq.onnx"
            quantize_int8(self.optimized, path, self.sample.calibration_inputs, self.info.input_name,
                          TENSORRT_SCHEME)
            return path
        if caps.fp16_from_onnx_types:
            path = self.workdir / "tensorrt-fp16.onnx"
            tensorrt.to_fp16_onnx(self.optimized, path)
            return path
        return self.optimized

    # -- judge
    def gate(self, candidate: Candidate, metric: common_pb2.PrimaryMetric, tolerance: Tolerance) -> None:
        """Run the sample through the candidate (in a child process) and record the gate's verdict."""
        settings = self.build_settings
        try:
            outputs = run_in_child(candidate.format, candidate.path, self.sample.inputs, settings.max_batch,
                                   settings.ort, self.scratch("gate"), settings.limits)
        except Exception as exc:  # noqa: BLE001  a candidate that cannot load or run is rejected, not fatal
            candidate.reject(f"{candidate.name} failed on the sample: {_first_line(exc)}")
            return
        candidate.gate = evaluate(outputs, self.sample.reference_outputs, self.sample.labels, metric, tolerance)
        candidate.accepted = candidate.gate.passed
        candidate.reason = candidate.gate.reason if candidate.gate.passed else f"rejected: {candidate.gate.reason}"

    def profile(self, candidate: Candidate) -> None:
        """Measure an accepted candidate on this machine, in a fresh child process (its own memory)."""
        settings = self.build_settings
        target = settings.target
        sizes = batch_sizes(target.max_batch, target.selection_metric.batch_size)
        limits = settings.limits.with_timeout(settings.limits.timeout_seconds + profile_seconds(settings.floors,
                                                                                                 sizes))
        try:
            candidate.profile = measure_in_child(candidate.format, candidate.path, self.sample.inputs, sizes,
                                                 settings.floors, settings.ort, self.scratch("profile"), limits,
                                                 target=target.id, device=settings.device())
        except Exception as exc:  # noqa: BLE001
            candidate.reject(f"measuring {candidate.name} failed: {_first_line(exc)}")
            return
        candidate.profile.accuracy = candidate.gate.candidate_metric


def profile_seconds(floors: Floors, sizes: list[int]) -> float:
    """What measuring takes beyond loading: every point runs at most min_seconds after its warm-up
    (four times that, plus ten seconds, leaves room for a busy machine)."""
    return len(sizes) * (floors.min_seconds * 4 + 10)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0][:500]
