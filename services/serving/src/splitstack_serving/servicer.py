"""inference.GRPCInferenceService (the Open Inference Protocol, wire-identical to Triton's) over the core.

Inputs come from `raw_input_contents` (one buffer per input, in input order) or, when a request
has none, from each input's typed contents; outputs always go out as `raw_output_contents` in
output order (the requested outputs, in request order, when the request names any). Responses
carry the model version that produced them and its artifact digest (parameter
`artifact_sha256`). A request parameter `timeout` (int64, microseconds) bounds the time a
request may wait in the queue, as Triton's does. Errors are domain exceptions, which the chassis
interceptor turns into status codes; ModelStreamInfer reports them in-stream as error_message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from inference import grpc_service_pb2 as pb
from inference import grpc_service_pb2_grpc as pb_grpc
from splitstack.chassis.errors import InvalidArgument, ResourceExhausted, status_for

from splitstack_serving import __version__, messages
from splitstack_serving.core import InferenceCore, InferenceResult
from splitstack_serving.limits import ServingLimits
from splitstack_serving.repository import ModelRepository
from splitstack_serving.streams import AnswerWindow
from splitstack_serving.tensors import InputTensor, raw_input, shown, typed_input

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "splitstack-serving"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")
TIMEOUT_PARAMETER = "timeout"
SHARED_MEMORY_PARAMETER = "shared_memory_region"


def decode_inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    """The request's inputs as they came (checked against the model and decoded by the core)."""
    inputs = request.inputs
    raw = request.raw_input_contents
    for tensor in (*inputs, *request.outputs):
        if SHARED_MEMORY_PARAMETER in tensor.parameters:
            raise InvalidArgument(f"tensor {shown(tensor.name)} names a shared memory region; this server has no "
                                  "shared memory: send the data in the request")
    if raw:
        if len(raw) != len(inputs):
            raise InvalidArgument(f"{len(raw)} raw_input_contents for {len(inputs)} inputs: send one raw buffer "
                                  "per input, in input order, or none and typed contents")
        for tensor in inputs:
            if tensor.HasField("contents"):
                raise InvalidArgument(f"input {shown(tensor.name)} has typed contents while the request has "
                                      "raw_input_contents; send every input one way")
        return [raw_input(t.name, t.datatype, tuple(t.shape), data) for t, data in zip(inputs, raw)]
    return [typed_input(t.name, t.datatype, tuple(t.shape), t.contents) for t in inputs]


def encode_response(request: pb.ModelInferRequest, result: InferenceResult,
                    max_bytes: int = 0) -> pb.ModelInferResponse:
    """The response: the requested outputs as raw contents, the version and its digest. Outputs
    over `max_bytes` in all (0: no bound) are refused (ResourceExhausted) before they are copied."""
    model = result.model
    if max_bytes:
        _check_response_size(result, max_bytes)
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    response.parameters[messages.SHA256_PARAMETER].string_param = model.sha256
    specs = model.signature.outputs
    outputs = result.outputs
    tensors = response.outputs
    raw = response.raw_output_contents
    for index in result.output_indices:
        array = outputs[index]
        spec = specs[index]
        tensors.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        raw.append(array.tobytes())
    return response


def _check_response_size(result: InferenceResult, max_bytes: int) -> None:
    size = sum(result.outputs[index].nbytes for index in result.output_indices)
    if size > max_bytes:
        raise ResourceExhausted(f"the outputs of {result.model.label} for this request are {size} bytes, more than "
                                f"a message may carry ({max_bytes}); send fewer rows or request fewer outputs")


def _timeout_deadline(request: pb.ModelInferRequest, now: float) -> float | None:
    parameter = request.parameters[TIMEOUT_PARAMETER]
    if parameter.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
        raise InvalidArgument("parameter 'timeout' must be an int64 number of microseconds")
    microseconds = parameter.int64_param or parameter.uint64_param
    return now + microseconds / 1e6 if microseconds > 0 else None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol front end: messages in, core calls, messages out."""

    def __init__(self, core: InferenceCore, repository: ModelRepository, limits: ServingLimits | None = None,
                 max_message_bytes: int = 0) -> None:
        self._core = core
        self._repository = repository
        self._limits = limits or ServingLimits()
        self._max_message_bytes = max_message_bytes

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._core.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._repository.is_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        model = self._repository.resolve(request.name, request.version)
        return messages.model_metadata(model, self._repository.loaded_versions(request.name))

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        model = self._repository.resolve(request.name, request.version)
        return pb.ModelConfigResponse(config=messages.model_config(model))

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    async def _infer(self, request: pb.ModelInferRequest, remaining: float | None) -> pb.ModelInferResponse:
        enforce = False
        deadline = None
        if remaining is not None or request.parameters:
            now = asyncio.get_running_loop().time()
            deadline = None if remaining is None else now + remaining
            if TIMEOUT_PARAMETER in request.parameters:
                timeout = _timeout_deadline(request, now)
                if timeout is not None and (deadline is None or timeout < deadline):
                    deadline, enforce = timeout, True
        result = await self._core.infer(request.model_name, request.model_version, decode_inputs(request),
                                        [o.name for o in request.outputs], deadline, enforce)
        return encode_response(request, result, self._max_message_bytes)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        window = AnswerWindow(self._limits.stream_max_pending, self._limits.stream_max_pending_bytes)
        answers: asyncio.Queue[tuple[pb.ModelStreamInferResponse, int] | None] = asyncio.Queue()
        reader = asyncio.ensure_future(self._read_stream(request_iterator, answers, window))
        try:
            while (item := await answers.get()) is not None:
                answer, size = item
                yield answer
                window.sent(size)
        finally:
            reader.cancel()
            window.close()
        await reader

    async def _read_stream(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                           answers: asyncio.Queue, window: AnswerWindow) -> None:
        """Start each request as it arrives while the stream's window has room (requests computing
        plus answers not yet written); then stop reading, so a client that does not read its answers
        is held back by flow control instead of growing this server's memory. Put every answer,
        then None, on `answers`."""
        running: set[asyncio.Task] = set()
        try:
            while True:
                await window.admit()
                request = await anext(request_iterator, None)
                if request is None:
                    window.cancel_admission()
                    break
                task = asyncio.ensure_future(self._answer(request, answers, window))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            answers.put_nowait(None)

    async def _answer(self, request: pb.ModelInferRequest, answers: asyncio.Queue, window: AnswerWindow) -> None:
        try:
            answer = pb.ModelStreamInferResponse(infer_response=await self._infer(request, None))
        except Exception as exc:  # noqa: BLE001 - in a stream every error becomes an error_message
            if status_for(exc) is None:
                log.error("unexpected %s in a streamed request", type(exc).__name__, exc_info=exc)
                message = f"internal error ({type(exc).__name__}); see server log"
            else:
                message = str(exc)
            answer = pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id))
        size = window.computed(answer)
        answers.put_nowait((answer, size))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ModelStatisticsResponse:
        if request.version:
            versions = [self._repository.resolve(request.name, request.version)]
        else:
            versions = self._repository.all_versions(request.name)
            if request.name and not versions:
                self._repository.resolve(request.name)  # raises NotFound naming the model
        return pb.ModelStatisticsResponse(model_stats=[messages.model_statistics(v) for v in versions])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        return messages.repository_index(await self._repository.index(ready_only=request.ready))

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        options = messages.load_options(request.parameters, self._limits)
        await self._repository.load(request.model_name, options.version, config=options.config,
                                    keep_previous=options.keep_previous)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        await self._repository.unload(request.model_name, messages.unload_version(request.parameters))
        return pb.RepositoryModelUnloadResponse()
