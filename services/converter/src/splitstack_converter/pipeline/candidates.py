"""A candidate artifact of one format, and the verdicts the gate and the profiler give it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from splitstack.common.v1 import common_pb2
from splitstack.registry.v1 import registry_pb2

# format -> (artifact kind, precision, file suffix)
FORMATS: dict[int, tuple[int, int, str]] = {
    common_pb2.ONNX_FP32: (common_pb2.ONNX, common_pb2.PRECISION_FP32, ".onnx"),
    common_pb2.ONNX_INT8: (common_pb2.ONNX, common_pb2.PRECISION_INT8, ".onnx"),
    common_pb2.TENSORRT_FP16: (common_pb2.TENSORRT_PLAN, common_pb2.PRECISION_FP16, ".plan"),
    common_pb2.TENSORRT_INT8: (common_pb2.TENSORRT_PLAN, common_pb2.PRECISION_INT8, ".plan"),
}


def format_name(fmt: int) -> str:
    return common_pb2.ModelFormat.Name(fmt)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Lowercase hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Candidate:
    """One format built for a target: its file (when the build worked) and its verdicts so far."""

    format: int
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    gate: common_pb2.GateResult | None = None
    profile: common_pb2.MeasuredProfile | None = None
    accepted: bool = False           # passed the gate and was measured: servable
    reason: str = ""
    adopted: bool = False            # the artifact registered under this key already (not uploaded again)

    @property
    def name(self) -> str:
        return format_name(self.format)

    @property
    def kind(self) -> int:
        return FORMATS[self.format][0]

    @property
    def precision(self) -> int:
        return FORMATS[self.format][1]

    @property
    def filename(self) -> str:
        return f"model-{self.name.lower().replace('_', '-')}{FORMATS[self.format][2]}"

    def built(self, path: Path, **metadata: str) -> None:
        """Record the built file and its digest."""
        self.path = path
        self.sha256 = sha256_file(path)
        self.metadata.update(metadata)

    def adopt(self, path: Path, sha256: str) -> None:
        """Stand for the artifact registered under this candidate's key (file at `path`, digest verified),
        with no verdict yet: the gate and the profiler judge it again."""
        self.path, self.sha256, self.adopted = path, sha256, True
        self.gate, self.profile, self.accepted, self.reason = None, None, False, ""

    def reject(self, reason: str) -> None:
        self.accepted = False
        self.reason = reason

    def to_pb(self) -> registry_pb2.Candidate:
        """The registry's record of this candidate (no digest unless its artifact is kept)."""
        out = registry_pb2.Candidate(format=self.format, accepted=self.accepted, reason=self.reason,
                                     artifact_sha256=self.sha256 if self.accepted else "")
        if self.gate is not None:
            out.gate.CopyFrom(self.gate)
        if self.profile is not None:
            out.profile.CopyFrom(self.profile)
        return out
