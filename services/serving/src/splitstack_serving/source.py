"""Where model artifacts come from: the `ModelSource` interface and its local-directory form.

The repository asks a source for a model version and gets a `LocalModel`: a file on this
machine, its version, and (when the source knows it) the SHA-256 it must have, which the
repository verifies before loading anything. `DirectoryModelSource` reads a Triton-style tree:

    <model_dir>/<name>/config.pbtxt            optional: the model's ModelConfig (text format)
    <model_dir>/<name>/<version>/model.onnx    versions are positive integers; latest = highest
    <model_dir>/<name>/<version>/model.plan    instead of model.onnx: a TensorRT engine
    <model_dir>/<name>/<version>/model.onnx.sha256   optional: the expected digest (hex)

A registry-backed source (aliases, digest-verified downloads into a cache) fits the same interface.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from google.protobuf import text_format

from inference import model_config_pb2
from splitstack.chassis.errors import InvalidArgument, NotFound
from splitstack.contracts.names import check_name, parse_version

from splitstack_serving.backend import ModelLoadError

MODEL_FILE = "model.onnx"
PLAN_FILE = "model.plan"
MODEL_FILES = (MODEL_FILE, PLAN_FILE)  # a version directory's artifact, in this order of preference
DIGEST_SUFFIX = ".sha256"
CONFIG_FILE = "config.pbtxt"


@dataclass(frozen=True)
class LocalModel:
    """A model version's artifact on this machine, ready to load."""

    name: str
    version: str
    path: Path
    sha256: str = ""  # the digest the artifact must have; "" when the source does not know it
    config: model_config_pb2.ModelConfig | None = None  # the model's own settings, if it has any


class ModelSource(Protocol):
    """Finds model versions and puts their artifacts on local disk."""

    async def fetch(self, name: str, version: str = "") -> LocalModel:
        """The artifact of `name` at `version` ("" = the version the source calls current);
        NotFound when there is none."""
        ...

    async def available(self) -> dict[str, list[str]]:
        """Every model the source offers, with its versions (ascending)."""
        ...


def version_order(version: str) -> tuple[int, str]:
    """Sort key: numeric versions by value, anything else after them by text."""
    return (int(version), "") if version.isdigit() else (2**63, version)


class DirectoryModelSource:
    """Models in a local Triton-style directory tree."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    async def fetch(self, name: str, version: str = "") -> LocalModel:
        """The artifact of `name` at `version` ("" = the highest version present)."""
        return await asyncio.to_thread(self._find, name, version)

    async def available(self) -> dict[str, list[str]]:
        """Every model directory under the root with the versions that have a model file."""
        return await asyncio.to_thread(self._scan)

    def _scan(self) -> dict[str, list[str]]:
        if not self.root.is_dir():
            return {}
        return {entry.name: self._versions(entry) for entry in sorted(self.root.iterdir())
                if entry.is_dir() and not entry.name.startswith(".")}

    @staticmethod
    def _versions(model_dir: Path) -> list[str]:
        found = [entry.name for entry in model_dir.iterdir()
                 if entry.name.isdigit() and _artifact_in(entry) is not None]
        return sorted(found, key=version_order)

    def _find(self, name: str, version: str) -> LocalModel:
        check_name("model name", name)
        model_dir = self.root / name
        versions = self._versions(model_dir) if model_dir.is_dir() else []
        if not versions:
            raise NotFound(f"no model '{name}' under {self.root} "
                           f"(expected {name}/<version>/{MODEL_FILE} or {PLAN_FILE})")
        if version:
            _check_version(version)
            if version not in versions:
                raise NotFound(f"model '{name}' has no version '{version}' under {self.root} "
                               f"(versions: {', '.join(versions)})")
        else:
            version = versions[-1]
        path = _artifact_in(model_dir / version)
        return LocalModel(name, version, path, _expected_digest(path), _read_config(model_dir / CONFIG_FILE))


def _artifact_in(version_dir: Path) -> Path | None:
    """The model file of a version directory (model.onnx, else model.plan), or None."""
    for file_name in MODEL_FILES:
        if (version_dir / file_name).is_file():
            return version_dir / file_name
    return None


def _check_version(version: str) -> None:
    try:
        parse_version(version)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _expected_digest(model_path: Path) -> str:
    digest_path = model_path.with_name(model_path.name + DIGEST_SUFFIX)
    if not digest_path.is_file():
        return ""
    words = digest_path.read_text().split()  # "<hex>" or sha256sum's "<hex>  model.onnx"
    return words[0].lower() if words else ""


def _read_config(path: Path) -> model_config_pb2.ModelConfig | None:
    if not path.is_file():
        return None
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{path}: not a valid ModelConfig: {exc}") from None
