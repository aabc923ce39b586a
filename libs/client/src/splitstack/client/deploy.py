"""`splitstack deploy SERVICE`: apply one service's rendered manifests to a cluster and wait for its rollout.

The manifests are deploy/k8s's overlay (default `dev`) rendered by `splitstack.client.manifests`,
the same renderer `make deploy-check` checks; the objects of SERVICE are those labelled
`app.kubernetes.io/name: SERVICE` (`--target` narrows converter and serving to one pool). Each
is applied with server-side apply (field manager `splitstack`, conflicts forced: the manifests
are the truth). An API server that cannot apply (an emulator) gets create-then-merge-patch
instead, and the report says so. Then every Deployment and StatefulSet is polled (no watch) until
its rollout is complete, as `kubectl rollout status` judges it, or `--timeout` passes.

Needs the `kubernetes` extra (`pip install 'splitstack-client[kubernetes]'`). The cluster is
`--api-url` (no credentials), else in-cluster configuration, else ~/.kube/config (`--context`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitstack.client.manifests import ManifestError, describe, render, select, service_of
from splitstack.client.stackfile import StackError, find_project_root

log = logging.getLogger(__name__)

MANIFESTS_IN_PROJECT = Path("deploy/k8s")
FIELD_MANAGER = "splitstack"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
# kind -> plural of every kind the manifests hold; applied in this order (dependencies first).
RESOURCES = {
    "Namespace": "namespaces", "ServiceAccount": "serviceaccounts", "Secret": "secrets", "ConfigMap": "configmaps",
    "Role": "roles", "RoleBinding": "rolebindings", "PersistentVolumeClaim": "persistentvolumeclaims",
    "Service": "services", "StatefulSet": "statefulsets", "Deployment": "deployments", "Job": "jobs",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers", "ScaledObject": "scaledobjects",
    "PodDisruptionBudget": "poddisruptionbudgets",
}
ORDER = {kind: index for index, kind in enumerate(RESOURCES)}
NOT_FOUND, UNSUPPORTED_MEDIA_TYPE = 404, 415
Report = Callable[[str], None]


class DeployError(StackError):
    """A deployment that cannot go on; the message names the object (printed as one CLI error line)."""


def collection_path(obj: dict[str, Any]) -> str:
    """The REST path of an object's collection (where it is created)."""
    kind, api_version = obj.get("kind", ""), obj.get("apiVersion", "")
    if kind not in RESOURCES:
        raise DeployError(f"{describe(obj)}: splitstack deploy does not know the kind {kind}")
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    namespace = obj["metadata"].get("namespace")
    scope = f"/namespaces/{namespace}" if namespace and kind != "Namespace" else ""
    return f"{prefix}{scope}/{RESOURCES[kind]}"


def object_path(obj: dict[str, Any]) -> str:
    return f"{collection_path(obj)}/{obj['metadata']['name']}"


class KubernetesApi:
    """The few REST calls deploy makes, through the official client's ApiClient (its auth and TLS)."""

    def __init__(self, api_url: str = "", context: str | None = None) -> None:
        try:
            from kubernetes import client, config
        except ImportError:
            raise DeployError("splitstack deploy needs the kubernetes client: "
                              "pip install 'splitstack-client[kubernetes]'") from None
        if api_url:
            configuration = client.Configuration()
            configuration.host = api_url.rstrip("/")
            self.client = client.ApiClient(configuration)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    config.load_kube_config(context=context)
                except (config.ConfigException, OSError) as exc:
                    raise DeployError(f"no cluster configured (give --api-url, or a kubeconfig): {exc}") from None
            self.client = client.ApiClient()
        self.can_apply = True
        self._served: dict[str, set[str]] = {}

    def request(self, method: str, path: str, body: Any = None, query: list[tuple[str, str]] | None = None,
                content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
        """(HTTP status, decoded body) of one call; transport failures become DeployError."""
        params = self.client.param_serialize(method=method, resource_path=path, query_params=query or [],
                                             header_params={"Accept": "application/json", "Content-Type": content_type},
                                             body=body, auth_settings=["BearerToken"])
        try:
            response = self.client.call_api(*params, _request_timeout=30)
            response.read()
        except Exception as exc:  # noqa: BLE001 - urllib3 / ssl errors: the cluster is unreachable
            raise DeployError(f"cannot reach the Kubernetes API at {self.client.configuration.host}: {exc}") from None
        try:
            data = json.loads(response.data or b"{}")
        except ValueError:
            data = {"message": response.data.decode(errors="replace")[:200]}
        return response.status, data

    def serves(self, obj: dict[str, Any]) -> bool:
        """Whether the cluster serves the object's kind (API discovery, once per group/version)."""
        api_version = obj.get("apiVersion", "")
        if api_version not in self._served:
            status, data = self.request("GET", "/api/v1" if api_version == "v1" else f"/apis/{api_version}")
            self._served[api_version] = {r["name"] for r in data.get("resources") or []} if status == 200 else set()
        return RESOURCES.get(obj.get("kind", "")) in self._served[api_version]

    def get(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        status, data = self.request("GET", object_path(obj))
        if status == NOT_FOUND:
            return None
        _raise_unless_ok(obj, status, data, "read")
        return data

    def close(self) -> None:
        self.client.close()


def _raise_unless_ok(obj: dict[str, Any], status: int, data: dict[str, Any], what: str) -> None:
    if not 200 <= status < 300:
        hint = " (is KEDA installed?)" if obj.get("kind") == "ScaledObject" and status == NOT_FOUND else ""
        raise DeployError(f"{describe(obj)}: {what} failed: HTTP {status} {data.get('message', '')}".rstrip() + hint)


def _applied_by_us(live: dict[str, Any]) -> bool:
    """Whether the server recorded our server-side apply (a real API server lists it in managedFields)."""
    fields = (live.get("metadata") or {}).get("managedFields") or []
    return any(f.get("manager") == FIELD_MANAGER and f.get("operation") == "Apply" for f in fields)


def apply(api: KubernetesApi, obj: dict[str, Any]) -> str:
    """Server-side apply one object; against an API without apply, create or merge-patch it. Returns what was done."""
    if api.can_apply:
        status, data = api.request("PATCH", object_path(obj), obj, [("fieldManager", FIELD_MANAGER), ("force", "true")],
                                   APPLY)
        if 200 <= status < 300 and _applied_by_us(data):
            return "applied (server-side)"
        if 200 <= status < 300:   # an emulator took the apply body as a merge patch: say so, and merge from now on
            api.can_apply = False
            return "patched (no server-side apply)"
        missing_namespace = (data.get("details") or {}).get("kind") == "namespaces"
        if status not in (NOT_FOUND, UNSUPPORTED_MEDIA_TYPE) or missing_namespace:
            _raise_unless_ok(obj, status, data, "server-side apply")
        # A real API server creates on apply; 404/415 here mean this server cannot apply.
        api.can_apply = False
        log.warning("the API server did not take a server-side apply (HTTP %d); creating / merge-patching", status)
    if api.get(obj) is None:
        status, data = api.request("POST", collection_path(obj), obj, [("fieldManager", FIELD_MANAGER)])
        _raise_unless_ok(obj, status, data, "create")
        return "created (no server-side apply)"
    status, data = api.request("PATCH", object_path(obj), obj, [("fieldManager", FIELD_MANAGER)], MERGE)
    _raise_unless_ok(obj, status, data, "merge patch")
    return "patched (no server-side apply)"


def rollout(live: dict[str, Any]) -> tuple[bool, str]:
    """Whether a Deployment's or StatefulSet's rollout is complete (kubectl's rules), and how far it is."""
    spec, status = live.get("spec") or {}, live.get("status") or {}
    if (live["metadata"].get("generation") or 0) > (status.get("observedGeneration") or 0):
        return False, "waiting for the controller to see the new spec"
    wanted = spec.get("replicas", 1)
    updated = status.get("updatedReplicas") or 0
    ready_key = "availableReplicas" if live["kind"] == "Deployment" else "readyReplicas"
    ready = status.get(ready_key) or 0
    detail = f"{updated}/{wanted} updated, {ready}/{wanted} {ready_key.removesuffix('Replicas')}"
    if updated < wanted or ready < wanted or (status.get("replicas") or 0) > updated:
        return False, detail
    if live["kind"] == "StatefulSet" and status.get("updateRevision", "") != status.get("currentRevision", ""):
        return False, detail + ", revision not yet current"
    return True, detail


def wait_for_rollouts(api: KubernetesApi, objects: list[dict[str, Any]], timeout: float, poll: float,
                      report: Report) -> list[tuple[str, str]]:
    """Poll every workload until rolled out; DeployError naming the first one still rolling at the deadline."""
    pending = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    deadline = time.monotonic() + timeout
    done: list[tuple[str, str]] = []
    while pending:
        for obj in list(pending):
            live = api.get(obj)
            finished, detail = rollout(live) if live else (False, "not found")
            if finished:
                report(f"{describe(obj)}: rolled out ({detail})")
                done.append((describe(obj), detail))
                pending.remove(obj)
            elif time.monotonic() >= deadline:
                raise DeployError(f"{describe(obj)}: rollout not complete after {timeout:g} s: {detail}")
        if pending:
            time.sleep(poll)
    return done


@dataclass(frozen=True)
class DeployRequest:
    """What to deploy where."""

    service: str
    overlay: Path
    target: str = ""
    timeout: float = 600.0
    poll: float = 2.0


def objects_of(request: DeployRequest) -> list[dict[str, Any]]:
    """The service's rendered objects in apply order; DeployError when there are none."""
    try:
        objects = render(request.overlay)
    except ManifestError as exc:
        raise DeployError(f"cannot render {request.overlay}: {exc}") from None
    picked = select(objects, request.service, request.target)
    if not picked:
        services = sorted({service_of(o) for o in objects if service_of(o)})
        raise DeployError(f"overlay {request.overlay.name} has no objects of {request.service}"
                          f"{' target ' + request.target if request.target else ''} (services: {', '.join(services)})")
    return sorted(picked, key=lambda o: ORDER.get(o.get("kind", ""), len(ORDER)))


def deploy(api: KubernetesApi, request: DeployRequest, report: Report) -> list[tuple[str, str]]:
    """Apply the service's objects, wait for its rollouts; returns (object, outcome) for each applied object."""
    objects = objects_of(request)
    for obj in objects:   # refuse a kind unknown here or to the cluster before changing anything
        collection_path(obj)
        if not api.serves(obj):
            hint = " (is KEDA installed?)" if obj["kind"] == "ScaledObject" else ""
            raise DeployError(f"{describe(obj)}: the cluster does not serve {obj['apiVersion']} "
                              f"{RESOURCES[obj['kind']]}{hint}")
    applied = []
    for obj in objects:
        action = apply(api, obj)
        report(f"{describe(obj)}: {action}")
        applied.append((describe(obj), action))
    wait_for_rollouts(api, objects, request.timeout, request.poll, report)
    return applied


# --- command line ---------------------------------------------------------------------------------

def _overlay_dir(args: argparse.Namespace) -> Path:
    if args.manifests:
        base = Path(args.manifests)
    else:
        root = find_project_root(Path.cwd().absolute())
        if root is None:
            raise DeployError("no project root above the working directory: give --manifests DIR (deploy/k8s)")
        base = root / MANIFESTS_IN_PROJECT
    overlay = base / "overlays" / args.overlay
    if not (overlay / "kustomization.yaml").is_file():
        raise DeployError(f"no overlay {args.overlay!r} in {base / 'overlays'}")
    return overlay


def _deploy(args: argparse.Namespace, out: Any) -> int:
    request = DeployRequest(args.service, _overlay_dir(args), args.target or "", args.timeout, args.poll)
    printer = lambda line: out.print(line, markup=False, highlight=False)  # noqa: E731
    if args.dry_run:
        from splitstack.client.manifests import dump

        print(dump(objects_of(request)), end="")
        return 0
    api = KubernetesApi(args.api_url or "", args.context)
    started = time.monotonic()
    try:
        applied = deploy(api, request, printer)
    finally:
        api.close()
    printer(f"{args.service}: {len(applied)} objects applied from overlay {request.overlay.name}, "
            f"rolled out in {time.monotonic() - started:.1f} s")
    return 0


def add_deploy_commands(commands: argparse._SubParsersAction) -> None:
    """`deploy`: apply a service's rendered Kubernetes manifests and wait for its rollout."""
    parser = commands.add_parser("deploy", help="apply a service's manifests (deploy/k8s) to a cluster and wait "
                                               "for its rollout")
    parser.add_argument("service", help="registry, trainer, converter, serving or nats")
    parser.add_argument("--overlay", default="dev", help="deploy/k8s/overlays/<name> (default %(default)s)")
    parser.add_argument("--target", help="only this inference target's pool (converter, serving)")
    parser.add_argument("--manifests", help="the deploy/k8s directory (default: the project's)")
    parser.add_argument("--api-url", help="the API server URL (default: in-cluster config, else ~/.kube/config)")
    parser.add_argument("--context", help="the kubeconfig context (default: the current one)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the rollout (default %(default)s)")
    parser.add_argument("--poll", type=float, default=2.0, help="seconds between status reads (default %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the rendered objects instead of applying them")
    parser.set_defaults(handler=_deploy)
