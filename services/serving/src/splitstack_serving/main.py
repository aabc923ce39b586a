"""Composition root: settings -> model source -> repository -> core -> gRPC servicer -> runtime.

The server answers (liveness, health, reflection, metrics) from the start; the startup models
load in the background, and ServerReady and the health of inference.GRPCInferenceService turn
SERVING once all of them are loaded and warmed. A startup model that fails to load stops the
process (a configuration error should be loud). On SIGTERM the chassis drains in-flight RPCs
(whose batches still run), then the repository releases every version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inference import grpc_service_pb2_grpc as pb_grpc
from splitstack.chassis.config import load_settings
from splitstack.chassis.server import ServiceRuntime, run_service

from splitstack_serving.backend import BackendOptions
from splitstack_serving.batching import BatchPolicy
from splitstack_serving.config import SERVICE, ServingSettings
from splitstack_serving.core import InferenceCore
from splitstack_serving.repository import ModelRepository
from splitstack_serving.servicer import SERVER_NAME, SERVICE_NAME, InferenceServicer
from splitstack_serving.source import DirectoryModelSource


@dataclass
class ServingService:
    """One serving process's parts, wired."""

    settings: ServingSettings
    runtime: ServiceRuntime
    repository: ModelRepository
    core: InferenceCore

    async def load_startup_models(self) -> None:
        """Load the configured models, then report the inference service SERVING."""
        await self.core.load_startup_models(self.settings.models)
        self.runtime.set_serving(True, SERVICE_NAME)


def default_policy(settings: ServingSettings) -> BatchPolicy:
    """The batch policy every model starts from."""
    return BatchPolicy(max_batch_size=settings.max_batch_size, max_queue_delay_us=settings.max_queue_delay_us,
                       max_queue_size=settings.max_queue_size, batching=settings.batching,
                       instances=settings.model_instances)


def build_service(settings: ServingSettings) -> ServingService:
    """Wire the service; nothing runs until `runtime.start()` / `serve()`."""
    runtime = ServiceRuntime(settings, SERVER_NAME)
    options = BackendOptions(target=settings.target, intra_op_threads=settings.ort_intra_op_threads,
                             inter_op_threads=settings.ort_inter_op_threads)
    repository = ModelRepository(DirectoryModelSource(Path(settings.model_dir)), options,
                                 default_policy(settings), settings.release_timeout_seconds)
    core = InferenceCore(repository)
    runtime.add_service(pb_grpc.add_GRPCInferenceServiceServicer_to_server, InferenceServicer(core, repository),
                        SERVICE_NAME)
    runtime.set_serving(False, SERVICE_NAME)
    runtime.on_shutdown(repository.close)
    return ServingService(settings, runtime, repository, core)


async def serve(settings: ServingSettings | None = None) -> None:
    """Run the service until SIGTERM/SIGINT."""
    service = build_service(settings or load_settings(ServingSettings, SERVICE))
    service.runtime.start_task(service.load_startup_models(), name="startup-models")
    await service.runtime.serve()


def main() -> None:
    """The `splitstack-serving` command."""
    run_service(serve)


if __name__ == "__main__":
    main()
