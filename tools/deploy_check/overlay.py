"""One rendered overlay and what the checks ask of it: objects by kind and name, workloads, their env.

A container's environment is resolved the way the kubelet would: `envFrom` ConfigMaps, `env`
values, ConfigMap keys, the pod's name and namespace from fieldRefs; Secrets are unknown offline,
so each becomes a placeholder naming the Secret (its presence is what is checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitstack.client.manifests import containers, describe, pod_template, render

Obj = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


@dataclass
class Overlay:
    """The objects one overlay renders to."""

    name: str
    directory: Path
    objects: list[Obj] = field(default_factory=list)

    @classmethod
    def load(cls, directory: Path) -> Overlay:
        return cls(directory.name, directory, render(directory))

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o.get("kind") == kind]

    def find(self, kind: str, name: str) -> Obj | None:
        return next((o for o in self.of_kind(kind) if o["metadata"]["name"] == name), None)

    def workloads(self) -> list[Obj]:
        return [o for o in self.objects if o.get("kind") in WORKLOAD_KINDS]

    def problem(self, obj: Obj | None, message: str) -> str:
        return f"[{self.name}] {describe(obj) + ': ' if obj else ''}{message}"


def pod_labels(workload: Obj) -> dict[str, str]:
    return ((pod_template(workload) or {}).get("metadata") or {}).get("labels") or {}


def pod_spec(workload: Obj) -> Obj:
    return (pod_template(workload) or {}).get("spec") or {}


def _field_ref(workload: Obj, path: str) -> str:
    meta = workload["metadata"]
    values = {"metadata.name": f"{meta['name']}-pod", "metadata.namespace": meta.get("namespace", "default")}
    return values.get(path, f"<{path}>")


def container_env(overlay: Overlay, workload: Obj, container: Obj) -> tuple[dict[str, str], list[str]]:
    """The container's environment and the problems found resolving it (missing ConfigMaps or keys)."""
    env: dict[str, str] = {}
    problems: list[str] = []
    where = f"container {container.get('name')}"
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref is None:
            continue
        config_map = overlay.find("ConfigMap", ref["name"])
        if config_map is None:
            if not ref.get("optional"):
                problems.append(overlay.problem(workload, f"{where}: envFrom ConfigMap {ref['name']} does not exist"))
            continue
        prefix = source.get("prefix", "")
        env.update({prefix + k: str(v) for k, v in (config_map.get("data") or {}).items()})
    for var in container.get("env") or []:
        value, problem = _value(overlay, workload, var)
        if problem:
            problems.append(overlay.problem(workload, f"{where}: env {var['name']}: {problem}"))
        env[var["name"]] = value
    return env, problems


def _value(overlay: Overlay, workload: Obj, var: Obj) -> tuple[str, str]:
    if "valueFrom" not in var:
        return str(var.get("value", "")), ""
    source = var["valueFrom"]
    if "fieldRef" in source:
        return _field_ref(workload, source["fieldRef"]["fieldPath"]), ""
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return f"secret:{ref['name']}/{ref['key']}", ""
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        config_map = overlay.find("ConfigMap", ref["name"])
        data = (config_map or {}).get("data") or {}
        if ref["key"] not in data:
            return "", "" if ref.get("optional") else f"ConfigMap {ref['name']} has no key {ref['key']}"
        return str(data[ref["key"]]), ""
    return "1", ""


def container_ports(workload: Obj) -> dict[str, int]:
    """Every named and numbered container port of a workload: name -> port and str(port) -> port."""
    ports: dict[str, int] = {}
    for container in containers(workload):
        for port in container.get("ports") or []:
            ports[str(port["containerPort"])] = port["containerPort"]
            if port.get("name"):
                ports[port["name"]] = port["containerPort"]
    return ports


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()
