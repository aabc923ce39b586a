"""The converter through its gRPC API, and waiting for a version's serving choice on a target.

`wait_serving_choice` asks the registry for the choice and, while there is none, the target's
converter pool for the conversion's state: a FAILED conversion raises a PlatformError carrying
the converter's stage and reason; no choice in time raises TimeoutError naming what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import grpc

from splitstack.client.sdk.errors import PlatformError, call
from splitstack.client.sdk.registry import RegistryClient, paged, to_message
from splitstack.common.v1 import common_pb2
from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.converter.v1 import converter_pb2_grpc
from splitstack.registry.v1 import registry_pb2 as rpb

log = logging.getLogger(__name__)

SERVICE = "converter"
POLL_SECONDS = 0.5


class ConverterClient:
    """One converter pool's RPCs (any pool accepts requests for any target)."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self.stub = converter_pb2_grpc.ConverterStub(channel)
        self.timeout = timeout

    def _call(self, method: str, request: Any) -> Any:
        return call(SERVICE, getattr(self.stub, method), request, self.timeout)

    def convert(self, model: str, version: int, target: str, *,
                tolerance: common_pb2.GateTolerance | Mapping[str, float] | None = None,
                requested_by: str = "sdk") -> cpb.Conversion:
        request = cpb.RequestConversionRequest(model=model, version=version, target=target, requested_by=requested_by)
        if tolerance is not None:
            request.tolerance.CopyFrom(to_message(tolerance, common_pb2.GateTolerance, "tolerance"))
        return self._call("RequestConversion", request)

    def conversion(self, model: str, version: int, target: str) -> cpb.Conversion:
        return self._call("GetConversion", cpb.GetConversionRequest(model=model, version=version, target=target))

    def conversions(self, *, model: str = "", target: str = "") -> list[cpb.Conversion]:
        return list(paged(lambda token: self._call("ListConversions", cpb.ListConversionsRequest(
            model=model, target=target, page_token=token)), "conversions"))

    def targets(self) -> list[common_pb2.InferenceTarget]:
        return list(self._call("ListTargets", cpb.ListTargetsRequest()).targets)


def _missing(error: PlatformError) -> bool:
    return error.code == grpc.StatusCode.NOT_FOUND


def conversion_failure(conversion: cpb.Conversion) -> PlatformError:
    """The PlatformError of a FAILED conversion: where (stage) and why (the converter's error)."""
    rejected = "; ".join(f"{common_pb2.ModelFormat.Name(c.format)}: {c.reason}"
                         for c in conversion.candidates if not c.accepted and c.reason)
    message = (f"conversion of {conversion.model} version {conversion.version} for target {conversion.target} "
               f"failed at stage {conversion.stage or '?'}: {conversion.error or 'no reason given'}")
    return PlatformError(SERVICE, grpc.StatusCode.FAILED_PRECONDITION, message + (f" ({rejected})" if rejected else ""),
                         stage=conversion.stage, reason=conversion.error)


def wait_serving_choice(registry: RegistryClient, converter: ConverterClient | None, model: str, version: int,
                        target: str, timeout: float) -> rpb.ServingChoice:
    """Poll until the registry holds the serving choice of (model, version, target)."""
    deadline = time.monotonic() + timeout
    state = "no conversion record seen" if converter else "no converter of this target to ask"
    while True:
        try:
            return registry.serving_choice(model, version, target)
        except PlatformError as exc:
            if not _missing(exc):
                raise
        if converter is not None:
            state = _conversion_state(converter, model, version, target) or state
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no serving choice for {model} version {version} on target {target} after "
                               f"{timeout:g}s ({state})")
        time.sleep(POLL_SECONDS)


def _conversion_state(converter: ConverterClient, model: str, version: int, target: str) -> str | None:
    """The conversion's state in words; raises its failure when it FAILED."""
    try:
        conversion = converter.conversion(model, version, target)
    except PlatformError as exc:
        if _missing(exc):
            return None
        raise
    if conversion.state == cpb.FAILED:
        raise conversion_failure(conversion)
    return f"conversion {cpb.ConversionState.Name(conversion.state)} at stage {conversion.stage or '-'}"
