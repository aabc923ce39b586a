"""The trainer's controller and the training Jobs its kubernetes executor creates.

The training Job is never written by hand: `render_training_job` (the executor's own function)
renders it from the training profile and the trainer's settings as this overlay configures them.
Each overlay keeps what that gives for an example job of its default profile in
`training-job.yaml` (documentation for reviewers, not applied); the check renders it again and
refuses any difference, validates it strictly, and checks that what it needs exists: the claim,
the pods' service account, the controller's RBAC, and the controller's own image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splitstack.client.manifests import containers, dump, load_documents
from splitstack.common.v1 import common_pb2
from splitstack.contracts.stacks import training_profiles
from splitstack_trainer.executors.kubernetes import Cluster, render_training_job
from splitstack_trainer.jobconfig import JobConfig, message_json

from tools.deploy_check.config import ServiceContainer
from tools.deploy_check.overlay import Obj, Overlay, pod_spec

TRAINING_JOB_FILE = "training-job.yaml"
EXAMPLE_JOB_ID = "example"
# What executors/kubernetes.py calls: (API group, resource) -> verbs.
EXECUTOR_NEEDS = {("batch", "jobs"): {"create", "get", "delete"}, ("batch", "jobs/status"): {"get"},
                  ("", "services"): {"create", "delete"}}


def example_job(settings: Any) -> list[Obj]:
    """The Service and Indexed Job the executor renders for an example job of the default profile."""
    profile = training_profiles()[settings.default_profile]
    cluster = Cluster.from_settings(settings)
    digest = "0" * 64
    config = JobConfig(
        job_id=EXAMPLE_JOB_ID, model="digits", module="splitstack_trainer.recipes.digits:DigitsMLP",
        datamodule="splitstack_trainer.recipes.digits:DigitsDataModule", module_hparams={}, datamodule_hparams={},
        profile=message_json(profile), max_epochs=settings.default_max_epochs, seed=0, dataset="digits",
        dataset_version=1, dataset_sha256=digest, dataset_size=1,
        dataset_path=f"{cluster.mount_path}/datasets/{digest}.npz",
        work_dir=f"{cluster.mount_path}/jobs/{EXAMPLE_JOB_ID}",
        required_targets=list(settings.default_required_targets),
        primary_metric={"name": "accuracy", "direction": "MAXIMIZE"},
        promotion_policy=None, parent_version=0, code_version="example")
    return render_training_job(config, cluster)


def trainer_entries(entries: list[ServiceContainer]) -> list[ServiceContainer]:
    return [e for e in entries if e.service == "trainer" and e.settings is not None]


def check_trainer(overlay: Overlay, entries: list[ServiceContainer]) -> tuple[list[str], list[Obj]]:
    """Problems of the trainer's set-up, and the training Job objects rendered for this overlay."""
    problems: list[str] = []
    rendered: list[Obj] = []
    for entry in trainer_entries(entries):
        settings = entry.settings
        if not settings.kubernetes_enabled:
            problems.append(overlay.problem(entry.workload, "the kubernetes executor is off (set "
                                                            "SPLITSTACK_TRAINER_KUBERNETES_IMAGE and _NAMESPACE)"))
            continue
        problems.extend(overlay.problem(entry.workload, p) for p in _cluster_needs(overlay, entry))
        rendered = example_job(settings)
        problems.extend(_compare(overlay, rendered, settings.default_profile))
    return problems, rendered


def _cluster_needs(overlay: Overlay, entry: ServiceContainer) -> list[str]:
    settings, problems = entry.settings, []
    if settings.kubernetes_image != entry.container["image"]:
        problems.append(f"training pods would run {settings.kubernetes_image}, not the controller's image "
                        f"{entry.container['image']} (SPLITSTACK_TRAINER_KUBERNETES_IMAGE)")
    if overlay.find("PersistentVolumeClaim", settings.kubernetes_pvc) is None:
        problems.append(f"the training claim {settings.kubernetes_pvc} (SPLITSTACK_TRAINER_KUBERNETES_PVC) "
                        "does not exist")
    account = settings.kubernetes_service_account
    if account and overlay.find("ServiceAccount", account) is None:
        problems.append(f"the training pods' ServiceAccount {account} does not exist")
    controller = pod_spec(entry.workload).get("serviceAccountName", "default")
    granted = _granted(overlay, controller)
    for (group, resource), verbs in sorted(EXECUTOR_NEEDS.items()):
        missing = verbs - granted.get((group, resource), set()) - granted.get((group, "*"), set())
        if missing:
            problems.append(f"ServiceAccount {controller} may not {'/'.join(sorted(missing))} "
                            f"{resource} ({group or 'core'}), which the kubernetes executor does")
    return problems


def _granted(overlay: Overlay, account: str) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for binding in overlay.of_kind("RoleBinding"):
        subjects = binding.get("subjects") or []
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == account for s in subjects):
            continue
        role = overlay.find(binding["roleRef"]["kind"], binding["roleRef"]["name"]) or {}
        for rule in role.get("rules") or []:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    granted.setdefault((group, resource), set()).update(rule.get("verbs") or [])
    return granted


def _compare(overlay: Overlay, rendered: list[Obj], profile: str) -> list[str]:
    path = overlay.directory / TRAINING_JOB_FILE
    job = rendered[-1]
    if not path.is_file():
        return [overlay.problem(job, f"{path} is missing (python -m tools.deploy_check --write-training-jobs)")]
    if load_documents(path) != rendered:
        return [overlay.problem(job, f"{path} is not what the trainer's render_training_job makes from profile "
                                     f"{profile} and this overlay's trainer settings (regenerate it: "
                                     f"python -m tools.deploy_check --write-training-jobs)")]
    gpu = any("nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {}) for c in containers(job))
    if training_profiles()[profile].accelerator == common_pb2.GPU and not gpu:
        return [overlay.problem(job, f"profile {profile} is a GPU profile but its pods ask for no GPU")]
    return []


def write_training_job(overlay: Overlay, entries: list[ServiceContainer]) -> Path | None:
    """Write the overlay's training-job.yaml from render_training_job (None without a trainer)."""

    for entry in trainer_entries(entries):
        if entry.settings.kubernetes_enabled:
            path = overlay.directory / TRAINING_JOB_FILE
            header = (f"# What the trainer's kubernetes executor creates for a job of profile "
                      f"{entry.settings.default_profile} in this overlay: rendered by render_training_job\n"
                      "# (python -m tools.deploy_check --write-training-jobs). Not applied; make deploy-check "
                      "refuses any difference.\n")
            path.write_text(header + dump(example_job(entry.settings)))
            return path
    return None
