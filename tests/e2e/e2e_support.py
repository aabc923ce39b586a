"""What the end-to-end tests do through the contracts: digits datasets, training specs, copies of a
trained hand-off, and waiting for each step of the loop (version READY, serving choice, promotion,
served by serving).

Held-out digits: the last `HELD_OUT` rows of a fixed permutation of scikit-learn's digits never enter
a dataset; the accuracy of what serving serves is measured on them.

A hand-off copy (`HandOff.register`) registers a trained version's exported program and sample as a
new version of another model, exactly as the trainer's job would (CreateVersion with lineage and
signature, UploadArtifact, FinalizeVersion). Tests whose subject is not training use it, so one
trained version serves them all.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.datasets import load_digits

from e2e_clients import ConverterClient, RegistryClient, ServingClient, TrainerClient, npz, read_npz
from e2e_stack import Stack, wait_until
from splitstack.common.v1 import common_pb2 as common
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as tpb

LOOP_MODEL = "loop"          # the shared stack's trained model
LOOP_DATASET = "digits"      # and its dataset
HELD_OUT = 297
PROMOTION_ACTOR = "registry/promotion-policy"
ACCURACY = common.PrimaryMetric(name="accuracy", direction=common.MAXIMIZE)
LOOP_TIMEOUT = 240.0
BASE_HYPERPARAMETERS = {"hidden": 64, "layers": 1, "lr": 0.01}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits as the recipes read them (inputs N x 64 in [0, 1], labels), permuted once."""

    inputs: np.ndarray
    labels: np.ndarray

    @classmethod
    def load(cls) -> Digits:
        data = load_digits()
        order = np.random.default_rng(7).permutation(len(data.target))
        return cls((data.data[order] / 16.0).astype(np.float32), data.target[order].astype(np.int64))

    def dataset(self, rows: int) -> bytes:
        """An .npz of the first `rows` training rows (never the held-out ones)."""
        assert rows <= len(self.labels) - HELD_OUT
        return npz(inputs=self.inputs[:rows], labels=self.labels[:rows])

    @property
    def held_out(self) -> tuple[np.ndarray, np.ndarray]:
        return self.inputs[-HELD_OUT:], self.labels[-HELD_OUT:]


def auto_policy(margin: float = 0.0) -> rpb.PromotionPolicy:
    return rpb.PromotionPolicy(mode=rpb.PromotionPolicy.AUTO, metric="accuracy", direction=common.MAXIMIZE,
                               margin=margin)


def job_spec(model: str, dataset: str, *, max_epochs: int = 4, targets: tuple[str, ...] = ("cpu",),
             hyperparameters: dict[str, Any] | None = None, batch_size: int = 64, **fields: Any) -> tpb.JobSpec:
    """A digits-mlp job on the CPU (a small batch, so a few epochs take enough steps), promoted AUTO."""
    spec = tpb.JobSpec(model=model, dataset=dataset, recipe="digits-mlp", max_epochs=max_epochs,
                       required_targets=list(targets), promotion_policy=auto_policy(), primary_metric=ACCURACY,
                       profile_override=common.TrainingProfile(name="e2e-cpu", accelerator=common.CPU,
                                                               precision="32-true", batch_size=batch_size,
                                                               devices=1, nodes=1),
                       **fields)
    spec.hyperparameters.update(hyperparameters or BASE_HYPERPARAMETERS)
    return spec


def auto_model(name: str, targets: tuple[str, ...] = ("cpu",)) -> rpb.Model:
    return rpb.Model(name=name, required_targets=list(targets), promotion_policy=auto_policy(), primary_metric=ACCURACY,
                     description="e2e hand-off copy")


@dataclass(frozen=True)
class HandOff:
    """A trained version's code-free hand-off: exported program, sample, signature, metrics."""

    program: bytes
    sample: bytes
    signature: common.Signature
    metrics: dict[str, float]
    metric_value: float
    onnx: bytes = b""              # the cpu pool's FP32 ONNX of the trained version

    @classmethod
    def of(cls, registry: RegistryClient, model: str, version: int) -> HandOff:
        found = registry.version(model, version)
        digest = {a.kind: a.sha256 for a in found.artifacts}
        _, program = registry.download(digest[common.EXPORTED_PROGRAM])
        _, sample = registry.download(digest[common.SAMPLE])
        cpu = next(c for c in found.serving_choices if c.target == "cpu")
        _, onnx = registry.download(cpu.artifact.sha256)
        return cls(program, sample, found.signature, dict(found.lineage.metrics), found.lineage.primary_metric_value,
                   onnx)

    def with_calibration(self, calibration: np.ndarray) -> HandOff:
        """The same hand-off whose sample carries `calibration_inputs` for INT8 calibration."""
        arrays = read_npz(self.sample)
        sample = npz(**arrays, calibration_inputs=calibration.astype(np.float32))
        return HandOff(self.program, sample, self.signature, self.metrics, self.metric_value, self.onnx)

    def register(self, registry: RegistryClient, model: str, accuracy: float | None = None) -> int:
        """A new READY version of `model` holding this hand-off (the trainer's registration steps);
        `accuracy` replaces the recorded metric (a deliberately modest champion that any real training beats)."""
        metrics = {**self.metrics, "accuracy": accuracy} if accuracy is not None else self.metrics
        lineage = rpb.Lineage(training_job=unique("copy"), metrics=metrics, primary_metric=ACCURACY,
                              primary_metric_value=metrics.get("accuracy", self.metric_value))
        version = registry.create_version(model, lineage.training_job, lineage, self.signature)
        for kind, data, filename in ((common.EXPORTED_PROGRAM, self.program, "model.pt2"),
                                     (common.SAMPLE, self.sample, "sample.npz")):
            registry.upload(rpb.ArtifactHeader(model=model, version=version, kind=kind, filename=filename,
                                               precision=common.PRECISION_FP32), data)
        registry.finalize(model, version)
        return version

    def seed(self, registry: RegistryClient, model: str, accuracy: float | None = None) -> int:
        """A new version of `model` complete for target cpu without a converter: the registration, then its
        FP32 ONNX and cpu serving choice written as the cpu converter pool would (a stack's starting point)."""
        version = self.register(registry, model, accuracy)
        onnx = registry.upload(rpb.ArtifactHeader(model=model, version=version, kind=common.ONNX, target="cpu",
                                                  precision=common.PRECISION_FP32, format=common.ONNX_FP32,
                                                  filename="model.onnx"), self.onnx)
        registry.set_serving_choice(model, version, "cpu", onnx.sha256, "e2e seed: the trained champion's FP32 ONNX")
        return version


@dataclass
class Clients:
    """The contract clients of one stack."""

    registry: RegistryClient
    trainer: TrainerClient
    converter: ConverterClient
    serving: ServingClient

    def close(self) -> None:
        for client in (self.registry, self.trainer, self.converter, self.serving):
            client.close()


def clients_of(stack: Stack) -> Clients:
    """Clients of every service of `stack` (channels connect lazily: a service may start later)."""
    return Clients(RegistryClient(stack.address("registry")), TrainerClient(stack.address("trainer")),
                   ConverterClient(stack.address("converter")), ServingClient(stack.address("serving")))


@dataclass
class Champion:
    """The trained base version on the shared stack."""

    model: str
    version: int
    job: tpb.Job
    handoff: HandOff
    sha256: str


NewStack = Callable[..., tuple[Stack, Clients]]   # `new_stack(models, services, crash_points, seed)`


# ---- waiting for the loop --------------------------------------------------------------------------------

def wait_job(trainer: Any, job_id: str, timeout: float = LOOP_TIMEOUT) -> tpb.Job:
    """The job once it has ended; it must have succeeded."""
    job = wait_until(lambda: (j := trainer.job(job_id)).state in (tpb.SUCCEEDED, tpb.FAILED, tpb.CANCELLED) and j,
                     timeout, f"job {job_id} to end")
    assert job.state == tpb.SUCCEEDED, job
    return job


def wait_choice(registry: RegistryClient, model: str, version: int, target: str = "cpu",
                timeout: float = LOOP_TIMEOUT) -> rpb.ServingChoice:
    def found() -> rpb.ServingChoice | None:
        return next((c for c in registry.version(model, version).serving_choices if c.target == target), None)
    return wait_until(found, timeout, f"a {target} serving choice for {model} v{version}")


def wait_alias(registry: RegistryClient, model: str, version: int, alias: str = "production",
               timeout: float = LOOP_TIMEOUT) -> int:
    return wait_until(lambda: registry.alias(model, alias) == version, timeout,
                      f"{model}@{alias} -> v{version} (now v{registry.alias(model, alias)})")


def wait_served(serving: ServingClient, model: str, version: int, timeout: float = LOOP_TIMEOUT) -> str:
    """The artifact digest serving answers with once `model` is served at `version`."""
    found = wait_until(lambda: (got := serving.served(model))[0] == str(version) and got, timeout,
                       f"serving {model} v{version} (serves {serving.served(model)})")
    return found[1]


def settle(seconds: float = 1.5) -> None:
    """Let relays, consumers and serving act on anything still in flight before counting events."""
    time.sleep(seconds)


def copy_and_serve(registry: RegistryClient, serving: ServingClient, handoff: HandOff, model: str,
                   accuracy: float | None = None) -> tuple[int, str]:
    """Register `handoff` as a new version of `model`; wait until it is converted, promoted and served.
    The version and the digest serving answers with."""
    version = handoff.register(registry, model, accuracy)
    wait_choice(registry, model, version)
    wait_alias(registry, model, version)
    return version, wait_served(serving, model, version)
