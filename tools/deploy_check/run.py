"""The deploy check over a tree: every overlay under deploy/k8s/overlays, then the Dockerfiles."""

from __future__ import annotations

import logging
from pathlib import Path

from splitstack.client.manifests import ManifestError

from tools.deploy_check.config import (
    check_addresses,
    check_ports,
    check_services,
    service_containers,
)
from tools.deploy_check.images import check_image_sources, lint_dockerfiles
from tools.deploy_check.overlay import Overlay
from tools.deploy_check.pools import check_pools
from tools.deploy_check.schema import CustomResources, validate_objects
from tools.deploy_check.training import check_trainer, write_training_job

log = logging.getLogger(__name__)

OVERLAYS_DIR = Path("deploy/k8s/overlays")


def overlay_dirs(root: Path, names: list[str] | None = None) -> list[Path]:
    """The overlays to check: the named ones, or every folder under deploy/k8s/overlays."""
    base = root / OVERLAYS_DIR
    if names:
        return [base / n for n in names]
    return sorted(p for p in base.iterdir() if (p / "kustomization.yaml").is_file())


def check_overlay(root: Path, directory: Path, custom: CustomResources) -> tuple[list[str], int]:
    """Every problem of one overlay, and how many objects it renders to."""
    try:
        overlay = Overlay.load(directory)
    except ManifestError as exc:
        return [f"[{directory.name}] cannot render: {exc}"], 0
    problems = validate_objects(overlay.objects, custom)
    problems = [f"[{overlay.name}] {p}" for p in problems]
    entries = service_containers(overlay, problems)
    for entry in entries:
        problems.extend(check_ports(overlay, entry))
        problems.extend(check_addresses(overlay, entry))
    problems.extend(check_services(overlay))
    problems.extend(check_pools(overlay, entries))
    trainer_problems, jobs = check_trainer(overlay, entries)
    problems.extend(trainer_problems)
    problems.extend(f"[{overlay.name}] (training Job) {p}" for p in validate_objects(jobs, custom))
    problems.extend(check_image_sources(root, overlay))
    return problems, len(overlay.objects)


def check_tree(root: Path, names: list[str] | None = None, lint: bool = True) -> tuple[list[str], str]:
    """All problems of the tree (empty when it passes) and a one-line summary of what was checked."""
    root = Path(root)
    custom = CustomResources(root)
    problems: list[str] = []
    counts = []
    for directory in overlay_dirs(root, names):
        found, count = check_overlay(root, directory, custom)
        problems.extend(found)
        counts.append(f"{directory.name} {count} objects")
    if lint:
        problems.extend(lint_dockerfiles(root))
    return problems, ", ".join(counts) + (", Dockerfiles linted" if lint else "")


def write_training_jobs(root: Path, names: list[str] | None = None) -> list[Path]:
    """Regenerate every overlay's training-job.yaml from the trainer's own rendering."""
    written = []
    for directory in overlay_dirs(Path(root), names):
        overlay = Overlay.load(directory)
        path = write_training_job(overlay, service_containers(overlay, []))
        if path is not None:
            written.append(path)
    return written
