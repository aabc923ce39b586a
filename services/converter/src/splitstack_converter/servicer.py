"""gRPC `splitstack.converter.v1.Converter` -> core adapter (no logic of its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from splitstack.converter.v1 import converter_pb2 as pb
from splitstack.converter.v1 import converter_pb2_grpc
from splitstack_converter.core import Converter

SERVICE_NAME = "splitstack.converter.v1.Converter"


class ConverterServicer(converter_pb2_grpc.ConverterServicer):
    """Each RPC calls the core; domain errors become statuses in the chassis interceptor."""

    def __init__(self, core: Converter) -> None:
        self.core = core

    async def RequestConversion(self, request: pb.RequestConversionRequest,
                                context: grpc.aio.ServicerContext) -> pb.Conversion:
        return await self.core.request(request.model, request.version, request.target, request.tolerance,
                                       request.requested_by)

    async def GetConversion(self, request: pb.GetConversionRequest,
                            context: grpc.aio.ServicerContext) -> pb.Conversion:
        return await self.core.get(request.model, request.version, request.target)

    async def ListConversions(self, request: pb.ListConversionsRequest,
                              context: grpc.aio.ServicerContext) -> pb.ListConversionsResponse:
        rows, token = await self.core.list(request.model, request.target, request.page_size, request.page_token)
        return pb.ListConversionsResponse(conversions=rows, next_page_token=token)

    async def WatchConversion(self, request: pb.WatchConversionRequest,
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Conversion]:
        async for conversion in self.core.watch(request.model, request.version, request.target):
            yield conversion

    async def ListTargets(self, request: pb.ListTargetsRequest,
                          context: grpc.aio.ServicerContext) -> pb.ListTargetsResponse:
        return pb.ListTargetsResponse(targets=self.core.list_targets())
