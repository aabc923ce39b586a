"""Training profiles and inference targets as data: one TOML file each under stacks/.

Parsed into the contract messages (`TrainingProfile`, `InferenceTarget`), so an unknown or
misspelled field in a file is an error, not a silent default.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from google.protobuf import json_format

from splitstack.common.v1 import common_pb2
from splitstack.contracts.names import check_name

SELECTION_METRICS = ("p50_latency_ms", "p99_latency_ms", "throughput_rows_per_s")


def _read(kind: str, extra_dir: Path | None) -> list[tuple[str, dict]]:
    files = [(p.name, p.read_text()) for p in resources.files(__package__).joinpath("stacks", kind).iterdir()
             if p.name.endswith(".toml")]
    if extra_dir is not None:
        files += [(p.name, p.read_text()) for p in sorted(Path(extra_dir).glob("*.toml"))]
    return [(name, tomllib.loads(text)) for name, text in sorted(files)]


def _parse(name: str, data: dict, message: type) -> object:
    try:
        return json_format.ParseDict(data, message(), ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise ValueError(f"{name}: {exc}") from None


def training_profiles(extra_dir: Path | None = None) -> dict[str, common_pb2.TrainingProfile]:
    """Every training profile by name (shipped ones plus *.toml in `extra_dir`)."""
    out = {}
    for fname, data in _read("training", extra_dir):
        profile = _parse(fname, data, common_pb2.TrainingProfile)
        check_name(f"{fname}: name", profile.name)
        if profile.batch_size <= 0 or profile.devices <= 0 or profile.nodes <= 0:
            raise ValueError(f"{fname}: batch_size, devices and nodes must be positive")
        out[profile.name] = profile
    return out


def inference_targets(extra_dir: Path | None = None) -> dict[str, common_pb2.InferenceTarget]:
    """Every inference target by id (shipped ones plus *.toml in `extra_dir`)."""
    out = {}
    for fname, data in _read("inference", extra_dir):
        target = _parse(fname, data, common_pb2.InferenceTarget)
        check_name(f"{fname}: id", target.id)
        if not target.candidate_formats:
            raise ValueError(f"{fname}: candidate_formats is empty")
        if target.selection_metric.name not in SELECTION_METRICS:
            raise ValueError(f"{fname}: selection_metric.name must be one of {SELECTION_METRICS}")
        if target.max_batch <= 0 or not 0 < target.replicas_min <= target.replicas_max:
            raise ValueError(f"{fname}: max_batch must be positive and 0 < replicas_min <= replicas_max")
        out[target.id] = target
    return out
