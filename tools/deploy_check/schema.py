"""Strict schema validation, offline: Kubernetes' own schemas, and CRDs kept in deploy/k8s/crds/.

Kubernetes objects go through `kubernetes-validate --strict` at the pinned version (unknown fields
are errors). Custom resources (KEDA's ScaledObject) are validated against the openAPIV3Schema of
their CustomResourceDefinition, made strict the way the API server's strict field validation is:
an object with `properties` accepts no other field unless it says `x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
from splitstack.client.manifests import describe, load_documents

log = logging.getLogger(__name__)

KUBERNETES_VERSION = "1.34.0"   # the cluster version the manifests target (kubernetes-validate has 1.25-1.37)
CRD_DIR = Path("deploy/k8s/crds")
Obj = dict[str, Any]


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema where objects with declared properties refuse unknown ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


class CustomResources:
    """Validators for the custom resources whose CRDs are kept in the repository, by (group/version, kind)."""

    def __init__(self, root: Path) -> None:
        self.validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
        for path in sorted((root / CRD_DIR).glob("*.yaml")):
            for crd in load_documents(path):
                self._add(crd)

    def _add(self, crd: Obj) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            schema.setdefault("properties", {})["apiVersion"] = {"type": "string"}
            schema["properties"]["kind"] = {"type": "string"}
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            self.validators[key] = jsonschema.Draft7Validator(schema)

    def validate(self, obj: Obj) -> list[str]:
        validator = self.validators.get((obj.get("apiVersion", ""), obj.get("kind", "")))
        if validator is None:
            return [f"{describe(obj)}: no CRD for {obj.get('apiVersion')} {obj.get('kind')} in {CRD_DIR}"]
        return [f"{describe(obj)}: {_where(e.absolute_path)}{e.message}"
                for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def _where(path: Any) -> str:
    parts = [str(p) for p in path]
    return f"{'.'.join(parts)}: " if parts else ""


def validate_objects(objects: list[Obj], custom: CustomResources) -> list[str]:
    """Problems of every object against its schema (strictly)."""
    problems: list[str] = []
    for obj in objects:
        api_version = obj.get("apiVersion", "")
        group = api_version.split("/")[0] if "/" in api_version else ""
        if "." in group and not group.endswith(".k8s.io"):
            problems.extend(custom.validate(obj))
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            location = ".".join(str(p) for p in exc.path)
            problems.append(f"{describe(obj)}: {location + ': ' if location else ''}{exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            problems.append(f"{describe(obj)}: {exc}")
    return problems
