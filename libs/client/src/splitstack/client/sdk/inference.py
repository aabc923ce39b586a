"""Serving through the Open Inference Protocol over gRPC (`inference.GRPCInferenceService`).

`predict` reads the model's metadata (input and output names, datatypes), sends numpy arrays as
raw little-endian buffers and returns the outputs as numpy arrays; `serving_version` is the
version a model's empty-version requests get now (from its ModelConfig's version policy).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from inference import grpc_service_pb2 as ipb
from inference import grpc_service_pb2_grpc
from splitstack.client.sdk.errors import PlatformError, call
from splitstack.client.sdk.events import EventSubscription
from splitstack.contracts.datatypes import CONTENTS_FIELDS, NUMPY_DTYPE_NAMES
from splitstack.events.v1 import events_pb2

log = logging.getLogger(__name__)

SERVICE = "serving"
POLL_SECONDS = 1.0
SIGNATURE_TTL_SECONDS = 5.0     # how long a model's metadata and batch limit are reused by predict
NUMPY_DTYPES: dict[str, np.dtype] = {name: np.dtype(dtype) for name, dtype in NUMPY_DTYPE_NAMES.items()}


def _dtype(datatype: str, what: str) -> np.dtype:
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise ValueError(f"{what} has datatype {datatype}, which the SDK cannot map to numpy") from None


def named_inputs(inputs: Any, metadata: ipb.ModelMetadataResponse) -> dict[str, np.ndarray]:
    """`inputs` (one array, or a mapping by name) as arrays of the model's input datatypes, in its order."""
    names = [spec.name for spec in metadata.inputs]
    if not isinstance(inputs, Mapping):
        if len(names) != 1:
            raise ValueError(f"model {metadata.name} takes {len(names)} inputs ({', '.join(names)}); "
                             f"pass a mapping of name to array")
        inputs = {names[0]: inputs}
    unknown = sorted(set(inputs) - set(names))
    missing = [n for n in names if n not in inputs]
    if unknown or missing:
        raise ValueError(f"model {metadata.name} takes inputs {', '.join(names)}; "
                         f"missing: {', '.join(missing) or 'none'}, unknown: {', '.join(unknown) or 'none'}")
    arrays = {}
    for spec in metadata.inputs:
        dtype = _dtype(spec.datatype, f"input {spec.name!r}")
        array = np.asarray(inputs[spec.name])
        try:
            arrays[spec.name] = np.ascontiguousarray(array.astype(dtype, casting="same_kind", copy=False))
        except TypeError:
            raise ValueError(f"input {spec.name!r} is {spec.datatype}; an array of {array.dtype} "
                             f"cannot be converted to it") from None
    return arrays


def infer_request(model: str, version: int | None, arrays: Mapping[str, np.ndarray],
                  metadata: ipb.ModelMetadataResponse) -> ipb.ModelInferRequest:
    request = ipb.ModelInferRequest(model_name=model, model_version=str(version) if version else "")
    for spec in metadata.inputs:
        array = arrays[spec.name]
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return request


def decode_outputs(response: ipb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output of a response as a numpy array (raw buffers, else typed contents)."""
    outputs = {}
    for index, tensor in enumerate(response.outputs):
        dtype = _dtype(tensor.datatype, f"output {tensor.name!r}").newbyteorder("<")
        if index < len(response.raw_output_contents):
            array = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
        else:
            array = np.asarray(getattr(tensor.contents, CONTENTS_FIELDS[tensor.datatype]), dtype=dtype)
        outputs[tensor.name] = array.reshape(tuple(tensor.shape)).astype(dtype.newbyteorder("="))
    return outputs


class ServingClient:
    """One serving endpoint (one target) through the Open Inference Protocol."""

    def __init__(self, channel: grpc.Channel, address: str, timeout: float) -> None:
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        self.address = address
        self.timeout = timeout
        self._signatures: dict[tuple[str, str], tuple[float, ipb.ModelMetadataResponse, int]] = {}
        self._lock = threading.Lock()

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return call(SERVICE, getattr(self.stub, method), request, timeout or self.timeout)

    def metadata(self, model: str, version: int | None = None) -> ipb.ModelMetadataResponse:
        return self._call("ModelMetadata", ipb.ModelMetadataRequest(name=model, version=str(version or "")))

    def signature(self, model: str, version: int | None = None) -> tuple[ipb.ModelMetadataResponse, int]:
        """The model's metadata and max batch size (0 = not batched), reused for a few seconds."""
        key, now = (model, str(version or "")), time.monotonic()
        with self._lock:
            cached = self._signatures.get(key)
        if cached is not None and now - cached[0] < SIGNATURE_TTL_SECONDS:
            return cached[1], cached[2]
        metadata = self.metadata(model, version)
        config = self._call("ModelConfig", ipb.ModelConfigRequest(name=model, version=key[1])).config
        with self._lock:
            self._signatures[key] = (now, metadata, config.max_batch_size)
        return metadata, config.max_batch_size

    def predict(self, model: str, inputs: Any, *, version: int | None = None,
                timeout: float | None = None) -> dict[str, np.ndarray]:
        """Outputs by name; more rows than the model's max batch size go in several requests."""
        metadata, max_batch = self.signature(model, version)
        arrays = named_inputs(inputs, metadata)
        rows = {a.shape[0] for a in arrays.values() if a.ndim > 0}
        if max_batch <= 0 or len(rows) != 1 or rows.pop() <= max_batch:
            return decode_outputs(self._call("ModelInfer", infer_request(model, version, arrays, metadata), timeout))
        total = next(iter(arrays.values())).shape[0]
        parts = [decode_outputs(self._call("ModelInfer", infer_request(
            model, version, {k: a[start:start + max_batch] for k, a in arrays.items()}, metadata), timeout))
            for start in range(0, total, max_batch)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def serving_version(self, model: str) -> int:
        """The version an empty-version request of `model` gets now."""
        config = self._call("ModelConfig", ipb.ModelConfigRequest(name=model)).config
        versions = list(config.version_policy.specific.versions)
        if versions:
            return int(versions[0])
        loaded = [int(v) for v in self.metadata(model).versions if v.isdigit()]
        if not loaded:
            raise PlatformError(SERVICE, grpc.StatusCode.NOT_FOUND, f"model {model} has no numbered version loaded")
        return max(loaded)

    def index(self) -> list[ipb.RepositoryIndexResponse.ModelIndex]:
        return list(self._call("RepositoryIndex", ipb.RepositoryIndexRequest()).models)

    def load(self, model: str, version: int | None = None, timeout: float | None = None) -> None:
        """Load (and make current) `version` of `model`, or in registry mode its alias's version."""
        request = ipb.RepositoryModelLoadRequest(model_name=model)
        if version:
            request.parameters["version"].int64_param = version
        self._call("RepositoryModelLoad", request, timeout or max(self.timeout, 120.0))

    def ready(self) -> bool:
        return bool(self._call("ServerReady", ipb.ServerReadyRequest()).ready)


def wait_version(serving: ServingClient, model: str, version: int, timeout: float,
                 events: EventSubscription | None = None) -> None:
    """Until serving answers `model`'s requests with `version`, or `events` (subscribed to
    model.deployed of the model and target) reports a replica swapped to it; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        current = _current_version(serving, model)
        if current == version:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            now = f"version {current}" if current else "no version"
            raise TimeoutError(f"serving at {serving.address} still answers {model} with {now}, not version {version}, "
                               f"after {timeout:g}s")
        if events is None:
            time.sleep(min(POLL_SECONDS, left))
            continue
        event = events.get(timeout=min(POLL_SECONDS, left))
        if event is not None and isinstance(event.payload, events_pb2.ModelDeployed) \
                and (event.payload.model, event.payload.version) == (model, version):
            return


def _current_version(serving: ServingClient, model: str) -> int | None:
    try:
        return serving.serving_version(model)
    except PlatformError as exc:
        if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return None
        raise
