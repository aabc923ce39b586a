"""The kubernetes executor: manifests rendered from each profile validate strictly against the Kubernetes
schema; against an emulated API server (kmock) the trainer submits, polls and cancels Indexed Jobs; and the
pods' exact command, run as two local processes with the variables the Indexed Job gives its pods
(CPU, gloo), trains one model together and registers one version.

What ran against an emulator: the API calls (kmock stores objects; nothing schedules pods, so the test
runs the pod commands itself and sets the Job's status, as the Job controller would). What ran for
real: the manifests' schema validation, the two-rank DDP training and registration. Only the pod DNS
name of rank 0 (`MASTER_ADDR`) is replaced by 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes import client
from kubernetes_validate.utils import latest_version
from trainer_support import name, spec

from splitstack.chassis.testing.servers import free_port
from splitstack.contracts.stacks import training_profiles
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.executors.kubernetes import Cluster, render_training_job, resource_name
from splitstack_trainer.jobconfig import JobConfig, message_json

NAMESPACE = "training"
CLUSTER = Cluster(namespace=NAMESPACE, image="registry.example/splitstack-trainer:0.1.0", pvc="splitstack-training",
                  mount_path="/var/lib/splitstack", python="python", master_port=29500,
                  nats_url="nats://nats.splitstack:4222", registry_addr="registry.splitstack:50051")
JOBS = "batch/v1/jobs"
SERVICES = "v1/services"


def config_for(profile_name: str, job_id: str = "job-0123456789abcdef") -> JobConfig:
    profile = training_profiles()[profile_name]
    return JobConfig(
        job_id=job_id, model="digits", module="splitstack_trainer.recipes.digits:DigitsMLP",
        datamodule="splitstack_trainer.recipes.digits:DigitsDataModule", module_hparams={}, datamodule_hparams={},
        profile=message_json(profile), max_epochs=3, seed=0, dataset="digits", dataset_version=1, dataset_sha256="0" * 64,
        dataset_size=1, dataset_path=f"{CLUSTER.mount_path}/datasets/{'0' * 64}.npz",
        work_dir=f"{CLUSTER.mount_path}/jobs/{job_id}", required_targets=["cpu"],
        primary_metric={"name": "accuracy", "direction": "MAXIMIZE"}, promotion_policy=None, parent_version=0,
        code_version="test")


def validate_strictly(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, latest_version(), strict=True)
    model = client.V1Job if doc["kind"] == "Job" else client.V1Service
    model.model_validate(doc)   # the client's own models reject unknown fields too


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("profile_name", sorted(training_profiles()))
def test_rendered_manifests_validate_strictly(profile_name: str) -> None:
    config = config_for(profile_name)
    profile = config.training_profile
    service, job = render_training_job(config, CLUSTER)
    for doc in (service, job):
        validate_strictly(doc)
    name_ = resource_name(config.job_id)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == profile.nodes
    assert job["spec"]["parallelism"] == profile.nodes and job["spec"]["backoffLimit"] == 0
    assert pod["subdomain"] == service["metadata"]["name"] == name_ and pod["restartPolicy"] == "Never"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert container["command"] + container["args"] == config.argv("python")   # the local executor's command
    env = env_of(container)
    assert env["MASTER_ADDR"] == f"{name_}-0.{name_}" and env["WORLD_SIZE"] == str(profile.nodes * profile.devices)
    assert env["NODE_RANK"] == {"fieldRef": {"fieldPath":
                                             "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["SPLITSTACK_REGISTRY_ADDR"] == CLUSTER.registry_addr and env["SPLITSTACK_NATS_URL"] == CLUSTER.nats_url
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [CLUSTER.pvc]
    assert config.work_dir.startswith(container["volumeMounts"][0]["mountPath"])
    # Locked down: non-root, no capabilities or escalation, read-only root, RuntimeDefault seccomp, no API token;
    # the working directory, HOME and TMPDIR are the pod's own emptyDir, never the shared volume.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": True, "runAsNonRoot": True}
    assert env["PYTHONSAFEPATH"] == "1" and env["HOME"] == env["TMPDIR"] == container["workingDir"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[container["workingDir"]]] and "emptyDir" in volumes[mounts["/tmp"]]
    assert not container["workingDir"].startswith(CLUSTER.mount_path)
    if profile_name == "a100-bf16":
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8" and env["WORLD_SIZE"] == "256"
    else:
        assert "nodeSelector" not in pod and "resources" not in container


def test_strict_validation_rejects_a_misspelled_field() -> None:
    _, job = render_training_job(config_for("cpu-ddp2"), CLUSTER)
    broken = copy.deepcopy(job)
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, latest_version(), strict=True)


async def run_pods(job: dict[str, Any], scratch: Path, timeout: float = 120.0) -> None:
    """What the Job controller and kubelet would do: one process per completion index, the pod's command
    and environment (NODE_RANK from the index; rank 0's DNS name replaced by the loopback address), in
    the pod's working directory (its emptyDir, here a directory of its own under `scratch`)."""
    container = job["spec"]["template"]["spec"]["containers"][0]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPLITSTACK_")}
    procs = []
    for index in range(job["spec"]["completions"]):
        own = scratch / f"pod-{index}"
        own.mkdir(parents=True)
        env = dict(base)
        for name_, value in env_of(container).items():
            env[name_] = str(index) if isinstance(value, dict) else value
            if value == container["workingDir"]:
                env[name_] = str(own)
        env["MASTER_ADDR"] = "127.0.0.1"
        procs.append(await asyncio.create_subprocess_exec(*container["command"], *container["args"], env=env, cwd=own,
                                                          stdout=asyncio.subprocess.PIPE,
                                                          stderr=asyncio.subprocess.STDOUT))
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), timeout)
    for index, (proc, (out, _)) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"pod {index} exited {proc.returncode}:\n{out.decode(errors='replace')[-6000:]}"


async def test_kubernetes_executor_against_kmock_runs_two_rank_ddp_and_cancels(fresh_stack, kmock, tmp_path) -> None:  # noqa: ANN001
    kmock.resources[JOBS] = kmock.ResourceInfo(kind="Job", namespaced=True)
    kmock.resources[SERVICES] = kmock.ResourceInfo(kind="Service", namespaced=True)
    dataset, _ = await fresh_stack.upload_digits()
    fresh_stack.trainers.start(
        SPLITSTACK_TRAINER_KUBERNETES_NAMESPACE=NAMESPACE, SPLITSTACK_TRAINER_KUBERNETES_IMAGE=CLUSTER.image,
        SPLITSTACK_TRAINER_KUBERNETES_API_URL=str(kmock.url), SPLITSTACK_TRAINER_KUBERNETES_PYTHON=sys.executable,
        SPLITSTACK_TRAINER_KUBERNETES_MOUNT_PATH=str(tmp_path / "pvc"),
        SPLITSTACK_TRAINER_KUBERNETES_MASTER_PORT=str(free_port()))
    model = name("ddp")
    async with fresh_stack.clients() as api:
        # Two ranks: submitted as an Indexed Job of 2 pods, run here, finished by the Job's status.
        job = await api.trainer.submit(spec(model, dataset, profile="cpu-ddp2", executor="kubernetes", max_epochs=3))
        await api.trainer.wait(job.id, [pb.RUNNING])
        name_ = resource_name(job.id)
        manifest = await until_stored(kmock, JOBS, name_)
        service = await until_stored(kmock, SERVICES, name_)
        for doc in (manifest, service):
            validate_strictly(doc)
        await run_pods(manifest, tmp_path / "pods")
        versions = await api.registry.versions(model)
        assert [v.version for v in versions] == [1] and versions[0].idempotency_key == job.id
        assert versions[0].lineage.hyperparameters["world_size"] == "2"
        assert versions[0].lineage.training_profile.nodes == 2
        kmock.objects[JOBS, NAMESPACE, name_].patch(
            {"status": {"succeeded": 2, "conditions": [{"type": "Complete", "status": "True"}]}})
        done = await api.trainer.wait(job.id)
        assert done.state == pb.SUCCEEDED and done.model_version == 1 and done.metrics["accuracy"] > 0
        assert kmock.objects[SERVICES, NAMESPACE, name_].deleted

        # Cancel: the Job and its Service are deleted.
        cancelled = await api.trainer.submit(spec(name("cancel"), dataset, executor="kubernetes"))
        await api.trainer.wait(cancelled.id, [pb.RUNNING])
        await until_stored(kmock, JOBS, resource_name(cancelled.id))
        assert (await api.trainer.cancel(cancelled.id, "no cluster time")).state == pb.CANCELLED
        assert kmock.objects[JOBS, NAMESPACE, resource_name(cancelled.id)].deleted
        assert kmock.objects[SERVICES, NAMESPACE, resource_name(cancelled.id)].deleted

        # A Job the cluster failed: FAILED with the controller's reason.
        failing = await api.trainer.submit(spec(name("fails"), dataset, executor="kubernetes"))
        await api.trainer.wait(failing.id, [pb.RUNNING])
        await until_stored(kmock, JOBS, resource_name(failing.id))
        kmock.objects[JOBS, NAMESPACE, resource_name(failing.id)].patch({"status": {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "Job has reached the specified backoff limit"}]}})
        failed = await api.trainer.wait(failing.id)
        assert failed.state == pb.FAILED and "BackoffLimitExceeded" in failed.error, failed.error


async def until_stored(emulator: Any, resource: str, name_: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return dict(emulator.objects[resource, NAMESPACE, name_].raw)
        except KeyError:   # `in` compares unparsed keys; lookup parses "batch/v1/jobs"
            assert asyncio.get_running_loop().time() < deadline, f"{resource} {name_} was not created"
            await asyncio.sleep(0.05)
