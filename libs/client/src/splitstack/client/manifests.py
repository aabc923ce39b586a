"""Render a kustomize overlay of deploy/k8s into plain Kubernetes objects, without kustomize.

`kubectl kustomize` is not on a fresh machine and `pykustomize` needs Python 3.14, so this module
implements the subset of kustomize the tree uses, with kustomize's meaning, and refuses anything
else (the kustomization files stay valid for real kustomize):

- `resources`: YAML files (several documents each) and directories holding a kustomization.yaml;
- `patches`: JSON 6902 patches (a YAML list of operations, with a `target` kind/name) and
  strategic-merge patches of maps only (a partial object named by kind and metadata.name);
- `namespace`, `labels` (`pairs`, optional `includeTemplates`), `images` (`newName`/`newTag`),
  `replicas` (`name`/`count`), applied in that order after the patches.

Used by `splitstack deploy` and by the deploy checks (tools/deploy_check); imports no service.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

KUSTOMIZATION = "kustomization.yaml"
NAME_LABEL = "app.kubernetes.io/name"
TARGET_LABEL = "splitstack.io/target"
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "labels", "images", "replicas"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass"}
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
Obj = dict[str, Any]


class ManifestError(ValueError):
    """A kustomization or manifest this renderer cannot render; the message names the file."""


def describe(obj: Obj) -> str:
    """`Kind namespace/name` (or `Kind name`), the way every message names an object."""
    meta = obj.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind', '?')} {where}{meta.get('name', '?')}"


def load_documents(path: Path) -> list[Obj]:
    """Every non-empty YAML document of a file."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: {exc}") from None
    for doc in docs:
        if not isinstance(doc, dict):
            raise ManifestError(f"{path}: a document is not a mapping")
    return docs


def render(directory: Path) -> list[Obj]:
    """The objects the kustomization in `directory` builds (its resources, patched and transformed)."""
    directory = Path(directory)
    path = directory / KUSTOMIZATION
    if not path.is_file():
        raise ManifestError(f"{directory}: no {KUSTOMIZATION}")
    docs = load_documents(path)
    spec = docs[0] if docs else {}
    unknown = sorted(set(spec) - SUPPORTED_FIELDS)
    if unknown:
        raise ManifestError(f"{path}: fields {unknown} are not supported by this renderer "
                            f"(supported: {sorted(SUPPORTED_FIELDS)})")
    objects: list[Obj] = []
    for entry in spec.get("resources") or []:
        objects.extend(_resource(directory, entry, path))
    for patch in spec.get("patches") or []:
        _apply_patch(objects, directory, patch, path)
    if spec.get("namespace"):
        _set_namespace(objects, spec["namespace"])
    for label in spec.get("labels") or []:
        _add_labels(objects, label)
    for image in spec.get("images") or []:
        _set_image(objects, image, path)
    for replica in spec.get("replicas") or []:
        _set_replicas(objects, replica, path)
    _refuse_duplicates(objects, path)
    return objects


def _resource(directory: Path, entry: str, source: Path) -> list[Obj]:
    target = (directory / entry).resolve()
    if target.is_dir():
        return render(target)
    if target.is_file():
        return load_documents(target)
    raise ManifestError(f"{source}: resource {entry!r} does not exist")


def _refuse_duplicates(objects: list[Obj], source: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (obj.get("kind", ""), (obj.get("metadata") or {}).get("namespace", ""), obj["metadata"]["name"])
        if key in seen:
            raise ManifestError(f"{source}: {describe(obj)} is defined twice")
        seen.add(key)


# --- patches --------------------------------------------------------------------------------------

def _apply_patch(objects: list[Obj], directory: Path, patch: dict[str, Any], source: Path) -> None:
    if "path" not in patch:
        raise ManifestError(f"{source}: only patches with a `path` are supported")
    file = directory / patch["path"]
    try:
        body = yaml.safe_load(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{source}: patch {patch['path']!r}: {exc}") from None
    if isinstance(body, list):
        _json6902(_targets(objects, patch.get("target"), source), body, file)
    elif isinstance(body, dict):
        target = {"kind": body.get("kind"), "name": (body.get("metadata") or {}).get("name")}
        for obj in _targets(objects, patch.get("target") or target, source):
            _merge_maps(obj, body, file)
    else:
        raise ManifestError(f"{file}: a patch is a list of JSON 6902 operations or a partial object")


def _targets(objects: list[Obj], target: dict[str, Any] | None, source: Path) -> list[Obj]:
    if not target:
        raise ManifestError(f"{source}: a JSON 6902 patch needs a target (kind and name)")
    kind, name = target.get("kind"), target.get("name")
    found = [o for o in objects if o.get("kind") == kind and o["metadata"].get("name") == name]
    if not found:
        raise ManifestError(f"{source}: patch target {kind} {name} is not among the resources")
    return found


def _merge_maps(obj: Obj, patch: dict[str, Any], source: Path) -> None:
    for key, value in patch.items():
        if isinstance(value, list):
            raise ManifestError(f"{source}: lists in strategic-merge patches are not supported by this renderer "
                                f"(field {key!r}); use a JSON 6902 patch")
        if isinstance(value, dict) and isinstance(obj.get(key), dict):
            _merge_maps(obj[key], value, source)
        else:
            obj[key] = copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def _json6902(objects: Iterable[Obj], operations: list[dict[str, Any]], source: Path) -> None:
    for obj in objects:
        for op in operations:
            if op.get("op") not in ("add", "replace", "remove"):
                raise ManifestError(f"{source}: JSON 6902 op {op.get('op')!r} is not supported (add, replace, remove)")
            *parents, last = _pointer(op["path"])
            node: Any = obj
            try:
                for part in parents:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                _set_pointer(node, last, op)
            except (KeyError, IndexError, ValueError, TypeError):
                raise ManifestError(f"{source}: path {op['path']} does not exist in {describe(obj)}") from None


def _set_pointer(node: Any, last: str, op: dict[str, Any]) -> None:
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op["op"] == "remove":
            del node[index]
        elif op["op"] == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        else:
            node[index] = copy.deepcopy(op["value"])
        return
    if op["op"] == "remove":
        del node[last]
    elif op["op"] == "replace" and last not in node:
        raise KeyError(last)
    else:
        node[last] = copy.deepcopy(op["value"])


# --- transformers ---------------------------------------------------------------------------------

def _set_namespace(objects: list[Obj], namespace: str) -> None:
    for obj in objects:
        if obj.get("kind") not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace


def _add_labels(objects: list[Obj], spec: dict[str, Any]) -> None:
    pairs = spec.get("pairs") or {}
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        template = pod_template(obj)
        if spec.get("includeTemplates") and template is not None:
            template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def pod_template(obj: Obj) -> Obj | None:
    """The pod template of a workload (None for other kinds)."""
    if obj.get("kind") not in POD_OWNERS:
        return None
    return (obj.get("spec") or {}).get("template")


def containers(obj: Obj) -> list[Obj]:
    """The containers (init containers first) of a workload's pod template."""
    template = pod_template(obj) or {}
    spec = template.get("spec") or {}
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def image_name(image: str) -> str:
    """The image without its tag or digest."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def _set_image(objects: list[Obj], spec: dict[str, Any], source: Path) -> None:
    if "name" not in spec:
        raise ManifestError(f"{source}: an images entry needs a name")
    for obj in objects:
        for container in containers(obj):
            if image_name(container.get("image", "")) != spec["name"]:
                continue
            tag = container["image"][len(spec["name"]):]
            name = spec.get("newName", spec["name"])
            if "digest" in spec:
                tag = f"@{spec['digest']}"
            elif "newTag" in spec:
                tag = f":{spec['newTag']}"
            container["image"] = f"{name}{tag}"


def _set_replicas(objects: list[Obj], spec: dict[str, Any], source: Path) -> None:
    found = [o for o in objects if o["metadata"].get("name") == spec.get("name")
             and o.get("kind") in ("Deployment", "StatefulSet", "ReplicaSet")]
    if not found:
        raise ManifestError(f"{source}: replicas: no Deployment or StatefulSet named {spec.get('name')!r}")
    for obj in found:
        obj["spec"]["replicas"] = int(spec["count"])


# --- selection ------------------------------------------------------------------------------------

def service_of(obj: Obj) -> str:
    """The service an object belongs to (its app.kubernetes.io/name label)."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(NAME_LABEL, "")


def select(objects: list[Obj], service: str, target: str = "") -> list[Obj]:
    """The objects of one service (and, when given, one inference target's pool)."""
    picked = [o for o in objects if service_of(o) == service]
    if target:
        picked = [o for o in picked if (o["metadata"].get("labels") or {}).get(TARGET_LABEL) in (None, target)]
    return picked


class _PlainDumper(yaml.SafeDumper):
    """Writes shared sub-objects out in full (no &anchors / *aliases), as kubectl does."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(objects: list[Obj]) -> str:
    """The objects as one multi-document YAML stream."""
    return yaml.dump_all(objects, Dumper=_PlainDumper, sort_keys=False)
