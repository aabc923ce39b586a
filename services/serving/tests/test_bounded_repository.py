"""Loaded versions and models are bounded: the oldest spare versions of a model are unloaded once no
request uses them (never the current one), and a load past the model cap is RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable

import grpc
import pytest
from serving_support import assert_outputs_match, infer_request, response_arrays, rows

from inference import grpc_service_pb2 as pb


def _load(name: str, version: str, keep_previous: bool = True) -> pb.RepositoryModelLoadRequest:
    return pb.RepositoryModelLoadRequest(model_name=name, parameters={
        "version": pb.ModelRepositoryParameter(string_param=version),
        "keep_previous": pb.ModelRepositoryParameter(bool_param=keep_previous)})


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def test_versions_past_the_cap_are_unloaded_oldest_first_once_idle(serve, model_dir, oracle) -> None:
    for version in ("3", "4"):  # more versions of mlp (same weights as version 1)
        shutil.copytree(model_dir / "mlp" / "1", model_dir / "mlp" / version)
    running = await serve(models=("mlp:1",), max_versions_per_model=2)
    repository, stub = running.repository, running.stub
    await stub.RepositoryModelLoad(_load("mlp", "2"), timeout=60)
    assert repository.loaded_versions("mlp") == ["1", "2"]

    # Requests are using versions 1 and 2 when version 3 is loaded: the oldest, 1, leaves service at
    # once but is released only when its request is done.
    oldest, older = repository.resolve("mlp", "1"), repository.resolve("mlp", "2")
    oldest.acquire()
    older.acquire()
    loading = asyncio.ensure_future(stub.RepositoryModelLoad(_load("mlp", "3"), timeout=60))
    await wait_until(lambda: repository.loaded_versions("mlp") == ["2", "3"], "version 1 leaves service")
    assert repository.current_version("mlp") == "3"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ModelInfer(infer_request("mlp", "1", x=rows(1, 1)), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "loaded: 2, 3" in caught.value.details()
    assert oldest.model._session is not None, "a version in use is not released"
    assert not loading.done(), "the load waits for the versions it takes out of service"
    oldest.release()
    await wait_until(lambda: oldest.model._session is None, "version 1 is released once idle")
    await loading

    # Version 2 is still busy, version 3 is idle: loading 1 again takes the idle spare one out first.
    await stub.RepositoryModelLoad(_load("mlp", "1"), timeout=60)
    assert repository.loaded_versions("mlp") == ["1", "2"] and repository.current_version("mlp") == "1"
    older.release()

    # A fourth version: still two, the current one always among them.
    await stub.RepositoryModelLoad(_load("mlp", "4"), timeout=60)
    assert repository.loaded_versions("mlp") == ["1", "4"], "the oldest spare version (2) went"
    x = rows(2, 3)
    for version, weights in (("1", "1"), ("4", "1"), ("", "1")):
        response = await stub.ModelInfer(infer_request("mlp", version, x=x), timeout=10)
        assert_outputs_match(response_arrays(response), oracle.run("mlp", weights, x=x))
    index = {(m.name, m.version): m.state for m in (await stub.RepositoryIndex(pb.RepositoryIndexRequest())).models}
    assert index[("mlp", "1")] == index[("mlp", "4")] == "READY" and ("mlp", "2") not in index


async def test_a_model_past_the_model_cap_is_resource_exhausted(serve, oracle) -> None:
    running = await serve(models=("mlp", "pair"), max_loaded_models=2)
    stub = running.stub
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="spare"), timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 2" in caught.value.details() and "MAX_LOADED_MODELS" in caught.value.details()
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="spare"))).ready
    # Another version of a loaded model is no new model; after an unload there is room again.
    await stub.RepositoryModelLoad(_load("mlp", "1"), timeout=60)
    await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="pair"), timeout=60)
    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="spare"), timeout=60)
    x = rows(3, 2)
    response = await stub.ModelInfer(infer_request("spare", x=x), timeout=10)
    assert_outputs_match(response_arrays(response), oracle.run("spare", "1", x=x))
