"""The kubernetes executor: one Indexed Job + one headless Service per training job, from the profile.

`render_training_job` is the one place the manifests are made (the deploy checks render through it
too). A job of N nodes becomes an Indexed Job with N completions run in parallel, one rank per pod:
`NODE_RANK` is the pod's completion index, `MASTER_ADDR` the stable DNS name of pod 0
(`<name>-0.<name>`, through the headless Service with `publishNotReadyAddresses`), `WORLD_SIZE`
nodes x devices. The profile gives node selector, tolerations and resources (GPUs included);
datasets and checkpoints live on a shared PersistentVolumeClaim, so a rescheduled pod resumes
from the last checkpoint. `backoffLimit: 0`: a failed rank fails the Job, and the trainer decides.

Pods are locked down: the pod runs as the image's non-root user (`runAsNonRoot`, uid/gid/fsGroup
10001), with the RuntimeDefault seccomp profile and no service-account token; the container with
no capabilities, no privilege escalation and a read-only root filesystem. Its working directory,
`HOME` and `TMPDIR` are a per-pod `emptyDir` (`/scratch`, plus one on `/tmp`), never the shared
volume, and `PYTHONSAFEPATH=1` keeps any current directory off the import path, so nothing one job
writes can be imported by another.

The executor submits, polls (no watch: polling also works against emulators) and deletes through
the official `kubernetes` client (the `kubernetes` extra), called in threads.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from splitstack.chassis.config import ConfigError
from splitstack.common.v1 import common_pb2
from splitstack_trainer.config import TrainerSettings
from splitstack_trainer.executors import Outcome
from splitstack_trainer.jobconfig import JOB_PYTHON_ENV, JobConfig

log = logging.getLogger(__name__)

JOB_LABEL = "splitstack.io/training-job"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
SHARED_VOLUME = "shared"
SCRATCH_VOLUME, SCRATCH_DIR = "scratch", "/scratch"   # the pod's own: working directory, HOME, TMPDIR
TMP_VOLUME = "tmp"
POD_USER = 10001                                      # the trainer image's user (services/trainer/Dockerfile)
FINISHED_TTL_SECONDS = 86400
HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409


@dataclass(frozen=True)
class Cluster:
    """Where and how training pods run (from TrainerSettings)."""

    namespace: str
    image: str
    pvc: str
    mount_path: str
    python: str
    master_port: int
    nats_url: str
    registry_addr: str
    service_account: str = ""

    @classmethod
    def from_settings(cls, settings: TrainerSettings) -> Cluster:
        return cls(namespace=settings.kubernetes_namespace, image=settings.kubernetes_image,
                   pvc=settings.kubernetes_pvc, mount_path=settings.kubernetes_mount_path,
                   python=settings.kubernetes_python, master_port=settings.kubernetes_master_port,
                   nats_url=settings.kubernetes_nats_url or settings.nats_url,
                   registry_addr=settings.kubernetes_registry_addr or settings.registry_addr,
                   service_account=settings.kubernetes_service_account)


def resource_name(job_id: str) -> str:
    """The Job's and the Service's name (pods are `<name>-<index>`)."""
    return f"train-{job_id}"


def _labels(job_id: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "splitstack-training", "app.kubernetes.io/part-of": "splitstack",
            "app.kubernetes.io/managed-by": "splitstack-trainer", JOB_LABEL: job_id}


def _environment(config: JobConfig, cluster: Cluster, name: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},
        {"name": "MASTER_PORT", "value": str(cluster.master_port)},
        {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "WORLD_SIZE", "value": str(config.world_size)},
        {"name": "SPLITSTACK_NATS_URL", "value": cluster.nats_url},
        {"name": "SPLITSTACK_REGISTRY_ADDR", "value": cluster.registry_addr},
        *({"name": name, "value": value} for name, value in sorted(JOB_PYTHON_ENV.items())),
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
    ]
    return env


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True}


def _pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": POD_USER, "runAsGroup": POD_USER, "fsGroup": POD_USER,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container(config: JobConfig, cluster: Cluster, name: str, profile: common_pb2.TrainingProfile) -> dict[str, Any]:
    argv = config.argv(cluster.python)
    container: dict[str, Any] = {
        "name": "rank", "image": cluster.image, "command": argv[:3], "args": argv[3:], "workingDir": SCRATCH_DIR,
        "env": _environment(config, cluster, name),
        "ports": [{"name": "rendezvous", "containerPort": cluster.master_port, "protocol": "TCP"}],
        "volumeMounts": [{"name": SHARED_VOLUME, "mountPath": cluster.mount_path},
                         {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR},
                         {"name": TMP_VOLUME, "mountPath": "/tmp"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": _container_security(),
    }
    if profile.resources:
        limits = dict(sorted(profile.resources.items()))
        container["resources"] = {"limits": limits, "requests": dict(limits)}
    return container


def render_training_job(config: JobConfig, cluster: Cluster) -> list[dict[str, Any]]:
    """The headless Service and the Indexed Job of one training job (in that order)."""
    profile = config.training_profile
    name = resource_name(config.job_id)
    labels = _labels(config.job_id)
    metadata = {"name": name, "namespace": cluster.namespace, "labels": labels,
                "annotations": {"splitstack.io/model": config.model, "splitstack.io/profile": profile.name}}
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"clusterIP": "None", "selector": {JOB_LABEL: config.job_id}, "publishNotReadyAddresses": True,
                 "ports": [{"name": "rendezvous", "port": cluster.master_port, "targetPort": cluster.master_port,
                            "protocol": "TCP"}]},
    }
    pod: dict[str, Any] = {
        "subdomain": name, "restartPolicy": "Never", "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "containers": [_container(config, cluster, name, profile)],
        "volumes": [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": cluster.pvc}},
                    {"name": SCRATCH_VOLUME, "emptyDir": {}}, {"name": TMP_VOLUME, "emptyDir": {}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if profile.node_selector:
        pod["nodeSelector"] = dict(sorted(profile.node_selector.items()))
    if profile.tolerations:
        pod["tolerations"] = [_toleration(t) for t in profile.tolerations]
    if cluster.service_account:
        pod["serviceAccountName"] = cluster.service_account
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
        "spec": {"completionMode": "Indexed", "completions": profile.nodes, "parallelism": profile.nodes,
                 "backoffLimit": 0, "ttlSecondsAfterFinished": FINISHED_TTL_SECONDS,
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }
    return [service, job]


def _toleration(toleration: common_pb2.Toleration) -> dict[str, str]:
    fields = {"key": toleration.key, "operator": toleration.operator, "value": toleration.value,
              "effect": toleration.effect}
    return {k: v for k, v in fields.items() if v}


def job_outcome(status: Any, completions: int) -> Outcome | None:
    """The outcome a Job's status shows, or None while it runs."""
    for condition in getattr(status, "conditions", None) or []:
        if condition.status != "True":
            continue
        if condition.type in ("Complete", "SuccessCriteriaMet"):
            return Outcome(True)
        if condition.type in ("Failed", "FailureTarget"):
            return Outcome(False, f"Kubernetes Job failed: {condition.reason or 'Failed'}: {condition.message or ''}"
                           .rstrip(": "))
    if (getattr(status, "succeeded", None) or 0) >= completions:
        return Outcome(True)
    if getattr(status, "failed", None):
        return Outcome(False, f"Kubernetes Job failed: {status.failed} pod(s) failed")
    return None


class KubernetesExecutor:
    """Runs jobs as Indexed Jobs on a cluster."""

    name = "kubernetes"

    def __init__(self, settings: TrainerSettings) -> None:
        if importlib.util.find_spec("kubernetes") is None:
            raise ConfigError("the kubernetes executor needs the kubernetes client: "
                              "pip install 'splitstack-trainer[kubernetes]'")
        self.capacity = settings.max_kubernetes_jobs
        self.cluster = Cluster.from_settings(settings)
        self._poll = settings.kubernetes_poll_seconds
        self._api_url = settings.kubernetes_api_url
        self._api_client: Any = None

    def job_paths(self, job_id: str, dataset_sha256: str) -> tuple[PurePosixPath, PurePosixPath]:
        root = PurePosixPath(self.cluster.mount_path)
        return root / "jobs" / job_id, root / "datasets" / f"{dataset_sha256}.npz"

    def _apis(self) -> tuple[Any, Any]:
        from kubernetes import client, config

        if self._api_client is None:
            if self._api_url:
                configuration = client.Configuration()
                configuration.host = self._api_url.rstrip("/")
                self._api_client = client.ApiClient(configuration)
            else:
                try:
                    config.load_incluster_config()
                except config.ConfigException:
                    config.load_kube_config()
                self._api_client = client.ApiClient()
        return client.BatchV1Api(self._api_client), client.CoreV1Api(self._api_client)

    async def start(self, config: JobConfig) -> str:
        service, job = render_training_job(config, self.cluster)
        namespace = self.cluster.namespace
        batch, core = await asyncio.to_thread(self._apis)
        await _tolerating(HTTP_CONFLICT, core.create_namespaced_service, namespace, service)
        await _tolerating(HTTP_CONFLICT, batch.create_namespaced_job, namespace, job)
        log.info("job %s: submitted Indexed Job %s/%s (%d pods)", config.job_id, namespace,
                 job["metadata"]["name"], job["spec"]["completions"])
        return json.dumps({"namespace": namespace, "name": job["metadata"]["name"]})

    async def wait(self, config: JobConfig, handle: str) -> Outcome:
        where = json.loads(handle)
        batch, _ = await asyncio.to_thread(self._apis)
        completions = config.training_profile.nodes
        while True:
            try:
                job = await asyncio.to_thread(batch.read_namespaced_job_status, where["name"], where["namespace"])
            except Exception as exc:  # noqa: BLE001 - ApiException without importing it at module level
                if getattr(exc, "status", None) == HTTP_NOT_FOUND:
                    return Outcome(False, f"the Kubernetes Job {where['namespace']}/{where['name']} disappeared",
                                   transient=True)
                log.warning("job %s: reading its Kubernetes Job failed: %s; retrying", config.job_id, exc)
            else:
                outcome = job_outcome(job.status, completions)
                if outcome is not None:
                    await self._delete_service(where)
                    return outcome
            await asyncio.sleep(self._poll)

    async def cancel(self, config: JobConfig, handle: str) -> None:
        where = json.loads(handle)
        batch, _ = await asyncio.to_thread(self._apis)
        await _tolerating(HTTP_NOT_FOUND, batch.delete_namespaced_job, where["name"], where["namespace"],
                          propagation_policy="Background")
        await self._delete_service(where)

    async def _delete_service(self, where: dict[str, str]) -> None:
        _, core = await asyncio.to_thread(self._apis)
        await _tolerating(HTTP_NOT_FOUND, core.delete_namespaced_service, where["name"], where["namespace"])

    async def recover(self, config: JobConfig, handle: str) -> bool:
        if not handle:
            return False
        where = json.loads(handle)
        batch, _ = await asyncio.to_thread(self._apis)
        try:
            await asyncio.to_thread(batch.read_namespaced_job, where["name"], where["namespace"])
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "status", None) == HTTP_NOT_FOUND:
                return False
            raise
        return True

    def resumable(self, config: JobConfig) -> bool:
        return True  # checkpoints live on the shared volume; a resubmitted Job resumes from them

    async def close(self) -> None:
        if self._api_client is not None:
            await asyncio.to_thread(self._api_client.close)


async def _tolerating(status: int, call: Any, *args: Any, **kwargs: Any) -> Any:
    """`call(*args)` in a thread; an ApiException with HTTP `status` (already there / gone) is fine."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "status", None) == status:
            return None
        raise
