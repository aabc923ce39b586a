"""The registry process reports SERVING and lists its API through server reflection (grpcurl-style)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

REGISTRY_SERVICE = "splitstack.registry.v1.Registry"


async def _reflect(channel: grpc.aio.Channel,
                   request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await call.write(request)
    response = await call.read()
    await call.done_writing()
    return response


async def test_health_reports_serving_for_the_server_and_the_registry(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", REGISTRY_SERVICE):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_reflection_lists_the_registry_and_serves_its_descriptor(channel: grpc.aio.Channel) -> None:
    listed = await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {service.name for service in listed.list_services_response.service}
    assert {REGISTRY_SERVICE, "grpc.health.v1.Health"} <= names, names
    found = await _reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=REGISTRY_SERVICE))
    assert found.file_descriptor_response.file_descriptor_proto, found
