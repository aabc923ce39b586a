"""The gRPC adapter of splitstack.registry.v1.Registry: requests to core.Registry calls and back.

Nothing here decides anything. Client-streaming uploads become (header, chunk iterator) pairs;
a client that sends nothing for `upload_idle_seconds` (before its header or between chunks) is cut
off with DEADLINE_EXCEEDED, and the upload's partial spool file goes with it. Downloads stream the
record first, then the content in chunks. Domain errors pass through to the chassis interceptor,
which turns them into status codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc

from splitstack.chassis.errors import DeadlineExceeded, InvalidArgument
from splitstack.registry.v1 import registry_pb2 as pb
from splitstack.registry.v1 import registry_pb2_grpc
from splitstack_registry.core import Registry

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Registry"].full_name
Context = grpc.aio.ServicerContext
T = TypeVar("T")
DEFAULT_UPLOAD_IDLE_SECONDS = 60.0
IDLE_KNOB = "SPLITSTACK_REGISTRY_UPLOAD_IDLE_SECONDS"


async def idle_limited(messages: AsyncIterator[T], idle_seconds: float, what: str) -> AsyncIterator[T]:
    """`messages`, ended with DeadlineExceeded when the next one takes longer than `idle_seconds`."""
    stream = aiter(messages)
    while True:
        try:
            message = await asyncio.wait_for(anext(stream), idle_seconds)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the {what} stream sent nothing for {idle_seconds:g} s ({IDLE_KNOB}); the "
                                   "upload was stopped and its partial content removed") from None
        yield message


async def split_upload(requests: AsyncIterator[Any], what: str,
                       idle_seconds: float = DEFAULT_UPLOAD_IDLE_SECONDS) -> tuple[Any, AsyncIterator[bytes]]:
    """The header of an upload stream (its first message) and an iterator over the chunks after it;
    a stream idle for `idle_seconds` ends with DeadlineExceeded."""
    stream = aiter(idle_limited(requests, idle_seconds, what))
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        raise InvalidArgument(f"header: the {what} stream is empty; its first message must be the header") from None
    if first.WhichOneof("part") != "header":
        raise InvalidArgument(f"header: the first message of the {what} stream must be the header, not a chunk")

    async def chunks() -> AsyncIterator[bytes]:
        async for message in stream:
            if message.WhichOneof("part") == "header":
                raise InvalidArgument(f"header: the {what} stream carries one header, then only chunks")
            if message.chunk:
                yield message.chunk

    return first.header, chunks()


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Every Registry RPC, delegated to the core."""

    def __init__(self, core: Registry, upload_idle_seconds: float = DEFAULT_UPLOAD_IDLE_SECONDS) -> None:
        self.core = core
        self.upload_idle_seconds = upload_idle_seconds

    async def CreateModel(self, request: pb.CreateModelRequest, context: Context) -> pb.Model:
        return await self.core.create_model(request.model)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.Model:
        return await self.core.get_model(request.name)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        models, token = await self.core.list_models(request.page_size, request.page_token)
        return pb.ListModelsResponse(models=models, next_page_token=token)

    async def SetPromotionPolicy(self, request: pb.SetPromotionPolicyRequest, context: Context) -> pb.Model:
        return await self.core.set_promotion_policy(request.model, request.policy, request.actor)

    async def CreateVersion(self, request: pb.CreateVersionRequest, context: Context) -> pb.ModelVersion:
        return await self.core.create_version(request)

    async def GetVersion(self, request: pb.GetVersionRequest, context: Context) -> pb.ModelVersion:
        return await self.core.get_version(request.model, request.version)

    async def ListVersions(self, request: pb.ListVersionsRequest, context: Context) -> pb.ListVersionsResponse:
        versions, token = await self.core.list_versions(request.model, request.page_size, request.page_token)
        return pb.ListVersionsResponse(versions=versions, next_page_token=token)

    async def FinalizeVersion(self, request: pb.FinalizeVersionRequest, context: Context) -> pb.ModelVersion:
        return await self.core.finalize_version(request.model, request.version)

    async def UploadArtifact(self, request_iterator: AsyncIterator[pb.UploadArtifactRequest],
                             context: Context) -> pb.Artifact:
        header, chunks = await split_upload(request_iterator, "artifact upload", self.upload_idle_seconds)
        return await self.core.upload_artifact(header, chunks)

    async def DownloadArtifact(self, request: pb.DownloadArtifactRequest,
                               context: Context) -> AsyncIterator[pb.DownloadArtifactResponse]:
        artifact, chunks = await self.core.download_artifact(request)
        yield pb.DownloadArtifactResponse(artifact=artifact)
        async for chunk in chunks:
            yield pb.DownloadArtifactResponse(chunk=chunk)

    async def ListArtifacts(self, request: pb.ListArtifactsRequest, context: Context) -> pb.ListArtifactsResponse:
        return pb.ListArtifactsResponse(artifacts=await self.core.list_artifacts(request.model, request.version))

    async def SetServingChoice(self, request: pb.SetServingChoiceRequest, context: Context) -> pb.ServingChoice:
        return await self.core.set_serving_choice(request)

    async def GetServingChoice(self, request: pb.GetServingChoiceRequest, context: Context) -> pb.ServingChoice:
        return await self.core.get_serving_choice(request.model, request.version, request.target)

    async def CreateDataset(self, request: pb.CreateDatasetRequest, context: Context) -> pb.Dataset:
        return await self.core.create_dataset(request.dataset)

    async def GetDataset(self, request: pb.GetDatasetRequest, context: Context) -> pb.Dataset:
        return await self.core.get_dataset(request.name)

    async def ListDatasets(self, request: pb.ListDatasetsRequest, context: Context) -> pb.ListDatasetsResponse:
        found, token = await self.core.list_datasets(request.page_size, request.page_token)
        return pb.ListDatasetsResponse(datasets=found, next_page_token=token)

    async def UploadDatasetVersion(self, request_iterator: AsyncIterator[pb.UploadDatasetVersionRequest],
                                   context: Context) -> pb.DatasetVersion:
        header, chunks = await split_upload(request_iterator, "dataset version upload", self.upload_idle_seconds)
        return await self.core.upload_dataset_version(header, chunks)

    async def GetDatasetVersion(self, request: pb.GetDatasetVersionRequest, context: Context) -> pb.DatasetVersion:
        return await self.core.get_dataset_version(request.dataset, request.version)

    async def ListDatasetVersions(self, request: pb.ListDatasetVersionsRequest,
                                  context: Context) -> pb.ListDatasetVersionsResponse:
        found, token = await self.core.list_dataset_versions(request.dataset, request.page_size, request.page_token)
        return pb.ListDatasetVersionsResponse(versions=found, next_page_token=token)

    async def DownloadDatasetVersion(self, request: pb.DownloadDatasetVersionRequest,
                                     context: Context) -> AsyncIterator[pb.DownloadDatasetVersionResponse]:
        record, chunks = await self.core.download_dataset_version(request.dataset, request.version)
        yield pb.DownloadDatasetVersionResponse(dataset_version=record)
        async for chunk in chunks:
            yield pb.DownloadDatasetVersionResponse(chunk=chunk)

    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.Alias:
        return await self.core.set_alias(request)

    async def DeleteAlias(self, request: pb.DeleteAliasRequest, context: Context) -> pb.DeleteAliasResponse:
        return pb.DeleteAliasResponse(move=await self.core.delete_alias(request))

    async def ResolveAlias(self, request: pb.ResolveAliasRequest, context: Context) -> pb.ResolveAliasResponse:
        alias, version = await self.core.resolve_alias(request.model, request.alias)
        return pb.ResolveAliasResponse(alias=alias, version=version)

    async def ListAliases(self, request: pb.ListAliasesRequest, context: Context) -> pb.ListAliasesResponse:
        return pb.ListAliasesResponse(aliases=await self.core.list_aliases(request.model))

    async def GetAliasHistory(self, request: pb.GetAliasHistoryRequest,
                              context: Context) -> pb.GetAliasHistoryResponse:
        return pb.GetAliasHistoryResponse(moves=await self.core.get_alias_history(request.model, request.alias))

    async def GetLineage(self, request: pb.GetLineageRequest, context: Context) -> pb.GetLineageResponse:
        return await self.core.get_lineage(request.model, request.version)
