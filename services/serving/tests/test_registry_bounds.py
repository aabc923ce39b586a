"""Registry mode within bounds, against a real registry and nats-server: the followed alias's version
is never unloaded to make room for other versions, the artifact cache stays within its size (never
evicting a loaded version's artifact), and registry calls ride out a registry restart; a registry that
stays away is UNAVAILABLE to the client, never INTERNAL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from registry_support import registry_client, sha256_of
from serving_support import infer_request, rows

from inference import grpc_service_pb2 as pb


def _load(name: str, version: int, keep_previous: bool = True) -> pb.RepositoryModelLoadRequest:
    return pb.RepositoryModelLoadRequest(model_name=name, parameters={
        "version": pb.ModelRepositoryParameter(int64_param=version),
        "keep_previous": pb.ModelRepositoryParameter(bool_param=keep_previous)})


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


def cached_digests(cache_dir: Path) -> set[str]:
    base = cache_dir / "sha256"
    return {d.name for d in base.iterdir() if (d / "model.onnx").is_file()} if base.is_dir() else set()


async def test_the_alias_target_stays_loaded_and_the_cache_stays_bounded(registry, follow, model_name, onnx_models,
                                                                         tmp_path) -> None:
    await registry.create_model(model_name)
    for seed in (1, 2, 3):
        await registry.register(model_name, {"cpu": onnx_models[seed]})
    await registry.promote(model_name, 1)
    size = len(onnx_models[1])
    cache_dir = tmp_path / "bounded-cache"
    running = await follow(models=(model_name,), instance="bounded", max_versions_per_model=2,
                           cache_max_bytes=int(size * 2.5), cache_dir=str(cache_dir))
    await wait_until(lambda: running.service.core.ready, "serving is ready")
    repository, stub = running.repository, running.stub
    digest = {v: sha256_of(onnx_models[v]) for v in (1, 2, 3)}

    # Versions 2 and 3 loaded beside the alias's version 1, two versions at most: 2 goes, 1 stays.
    await stub.RepositoryModelLoad(_load(model_name, 2), timeout=60)
    await stub.RepositoryModelLoad(_load(model_name, 3), timeout=60)
    assert repository.loaded_versions(model_name) == ["1", "3"]
    assert cached_digests(cache_dir) == {digest[1], digest[3]}, "2 was released: the cache made room"
    response = await stub.ModelInfer(infer_request(model_name, "1", x=rows(1, 2)), timeout=10)
    assert response.model_version == "1"

    # The alias moves to 3 (loaded already: nothing reloads); loading 2 again now lets 1 go, not 3.
    await registry.promote(model_name, 3)
    await wait_until(lambda: repository.current_version(model_name) == "3", "following the alias to 3")
    await stub.RepositoryModelLoad(_load(model_name, 2), timeout=60)
    assert repository.loaded_versions(model_name) == ["2", "3"] and repository.current_version(model_name) == "2"
    assert cached_digests(cache_dir) == {digest[2], digest[3]}, "the cache never evicts a loaded version"
    total = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file())
    assert total <= size * 2.5


async def test_registry_calls_ride_out_a_restart_and_a_registry_that_stays_away_is_unavailable(
        restartable, follow, model_name, onnx_models) -> None:
    async with registry_client(restartable.registry_address) as registry:
        await registry.create_model(model_name)
        for seed in (1, 2, 3):
            await registry.register(model_name, {"cpu": onnx_models[seed]})
        await registry.promote(model_name, 1)
    running = await follow(models=(model_name,), instance="retrying", nats_url=restartable.nats_url,
                           registry_addr=restartable.registry_address, registry_retry_seconds=60.0)
    await wait_until(lambda: running.service.core.ready, "serving is ready")

    restartable.registry.stop()
    loading = asyncio.ensure_future(running.stub.RepositoryModelLoad(_load(model_name, 2), timeout=120))
    await asyncio.sleep(0)  # the load starts while the registry is down and keeps retrying
    await asyncio.to_thread(restartable.start_registry)
    await loading
    assert running.repository.current_version(model_name) == "2"

    impatient = await follow(models=(), instance="impatient", nats_url=restartable.nats_url,
                             registry_addr=restartable.registry_address, registry_retry_seconds=1.0)
    restartable.registry.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await impatient.stub.RepositoryModelLoad(_load(model_name, 3), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "the registry answered UNAVAILABLE" in caught.value.details()
