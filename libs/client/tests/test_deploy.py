"""`splitstack deploy` against an emulated Kubernetes API (kmock), and the manifest renderer it uses.

What ran against an emulator: kmock stores objects for create/get/list/patch but has no server-side
apply and no controllers. So here the apply falls back to create / merge-patch (the report says
so, and these tests check that it does), and the tests set each Deployment's status themselves,
as the Deployment controller would, to drive the rollout wait. Server-side apply and real
rollouts have not run against a real cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from splitstack.client import manifests
from splitstack.client.deploy import (
    DeployError,
    DeployRequest,
    KubernetesApi,
    add_deploy_commands,
    deploy,
    rollout,
)

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
DEV = K8S / "overlays" / "dev"
NAMESPACE = "splitstack-dev"
RESOURCES = {"v1/serviceaccounts": "ServiceAccount", "v1/configmaps": "ConfigMap", "v1/services": "Service",
             "v1/persistentvolumeclaims": "PersistentVolumeClaim", "apps/v1/deployments": "Deployment",
             "policy/v1/poddisruptionbudgets": "PodDisruptionBudget", "rbac.authorization.k8s.io/v1/roles": "Role",
             "rbac.authorization.k8s.io/v1/rolebindings": "RoleBinding",
             "autoscaling/v2/horizontalpodautoscalers": "HorizontalPodAutoscaler"}
DEPLOYMENTS = "apps/v1/deployments"


@pytest.fixture
def cluster(kmock: Any) -> Any:
    """The emulated API server, knowing every kind the registry and serving manifests hold (not KEDA's)."""
    for resource, kind in RESOURCES.items():
        kmock.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=True)
    return kmock


def run_deploy(cluster: Any, service: str, lines: list[str], timeout: float = 30.0, target: str = "") -> Any:
    """deploy() in a thread (the client is synchronous; kmock serves on this test's event loop)."""
    def call() -> Any:
        api = KubernetesApi(str(cluster.url))
        try:
            return deploy(api, DeployRequest(service, DEV, target, timeout=timeout, poll=0.05), lines.append)
        finally:
            api.close()
    return asyncio.to_thread(call)


async def stored(cluster: Any, resource: str, name: str, timeout: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return cluster.objects[resource, NAMESPACE, name]
        except KeyError:
            assert asyncio.get_running_loop().time() < deadline, f"{resource} {name} was not created"
            await asyncio.sleep(0.02)


def rolled_out(replicas: int) -> dict[str, Any]:
    return {"status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                       "availableReplicas": replicas, "readyReplicas": replicas}}


async def test_deploy_registry_to_kmock_emulated_api_creates_objects_and_waits_for_rollout(cluster: Any) -> None:
    lines: list[str] = []
    task = asyncio.ensure_future(run_deploy(cluster, "registry", lines))
    deployment = await stored(cluster, DEPLOYMENTS, "registry")
    await asyncio.sleep(0.3)
    assert not task.done(), "deploy returned before the Deployment was rolled out"
    deployment.patch(rolled_out(1))
    applied = await asyncio.wait_for(task, 30)

    rendered = manifests.select(manifests.render(DEV), "registry")
    assert sorted(name for name, _ in applied) == sorted(manifests.describe(o) for o in rendered)
    assert [name for name, _ in applied][:2] == [f"ServiceAccount {NAMESPACE}/registry",
                                                f"ConfigMap {NAMESPACE}/registry-config"]
    assert all(action == "created (no server-side apply)" for _, action in applied), applied
    live = cluster.objects[DEPLOYMENTS, NAMESPACE, "registry"].raw
    expected = next(o for o in rendered if o["kind"] == "Deployment")
    assert live["spec"] == expected["spec"] and live["spec"]["replicas"] == 1   # the dev overlay's count
    assert cluster.objects["v1/configmaps", NAMESPACE, "registry-config"].raw["data"]["SPLITSTACK_REGISTRY_GRPC_PORT"] \
        == "50051"
    assert f"Deployment {NAMESPACE}/registry: rolled out (1/1 updated, 1/1 available)" in lines


async def test_redeploy_to_kmock_patches_what_exists(cluster: Any) -> None:
    first: list[str] = []
    task = asyncio.ensure_future(run_deploy(cluster, "serving", first, target="cpu"))
    (await stored(cluster, DEPLOYMENTS, "serving-cpu")).patch(rolled_out(1))
    await asyncio.wait_for(task, 30)
    config = cluster.objects["v1/configmaps", NAMESPACE, "serving-cpu-config"]
    config.patch({"data": {"SPLITSTACK_SERVING_MODELS": "x"}})

    again: list[str] = []
    applied = await asyncio.wait_for(run_deploy(cluster, "serving", again, target="cpu"), 30)
    assert applied and all(action == "patched (no server-side apply)" for _, action in applied), applied
    assert cluster.objects["v1/configmaps", NAMESPACE, "serving-cpu-config"].raw["data"]["SPLITSTACK_SERVING_MODELS"] \
        == "digits"   # the manifests are the truth again
    hpa = cluster.objects["autoscaling/v2/horizontalpodautoscalers", NAMESPACE, "serving-cpu"].raw
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 1


async def test_deploy_to_kmock_times_out_naming_the_deployment_not_rolled_out(cluster: Any) -> None:
    lines: list[str] = []
    task = asyncio.ensure_future(run_deploy(cluster, "registry", lines, timeout=1.0))
    (await stored(cluster, DEPLOYMENTS, "registry")).patch(
        {"status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 0}})
    with pytest.raises(DeployError, match=rf"Deployment {NAMESPACE}/registry: rollout not complete after 1 s: "
                                          r"1/1 updated, 0/1 available"):
        await asyncio.wait_for(task, 30)


async def test_deploy_to_kmock_without_keda_names_the_scaled_object(cluster: Any) -> None:
    with pytest.raises(DeployError, match=rf"ScaledObject {NAMESPACE}/converter-cpu: the cluster does not serve "
                                          r"keda.sh/v1alpha1 scaledobjects \(is KEDA installed\?\)"):
        await asyncio.wait_for(run_deploy(cluster, "converter", []), 30)
    assert not cluster.objects   # refused before anything was applied


async def test_unknown_service_is_one_clear_error(cluster: Any) -> None:
    with pytest.raises(DeployError, match=r"overlay dev has no objects of regsitry \(services: converter, nats, "
                                          r"registry, serving, trainer\)"):
        await asyncio.wait_for(run_deploy(cluster, "regsitry", []), 30)


def test_unreachable_api_is_one_clear_error() -> None:
    api = KubernetesApi("http://127.0.0.1:9")
    with pytest.raises(DeployError, match="cannot reach the Kubernetes API at http://127.0.0.1:9"):
        deploy(api, DeployRequest("registry", DEV, timeout=1), print)


def test_the_deploy_command_dry_run_prints_the_rendered_objects(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_deploy_commands(parser.add_subparsers())
    args = parser.parse_args(["deploy", "serving", "--overlay", "prod", "--target", "t4-int8", "--manifests", str(K8S),
                              "--dry-run"])
    assert args.handler(args, Console()) == 0
    names = [manifests.describe(o) for o in manifests.yaml.safe_load_all(capsys.readouterr().out)]
    assert names[0] == "ServiceAccount splitstack/serving" and "Deployment splitstack/serving-t4-int8" in names
    assert not any("serving-cpu" in n for n in names)
    args = parser.parse_args(["deploy", "serving", "--overlay", "staging", "--manifests", str(K8S)])
    with pytest.raises(DeployError, match="no overlay 'staging'"):
        args.handler(args, Console())


@pytest.mark.parametrize(("status", "done", "detail"), [
    ({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}, True, "2/2 updated, 2/2"),
    ({"observedGeneration": 1, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2}, False, "2/2 updated"),
    ({"observedGeneration": 0, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}, False, "new spec"),
    ({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 1, "availableReplicas": 2}, False, "1/2 updated"),
])
def test_rollout_is_judged_as_kubectl_does(status: dict[str, Any], done: bool, detail: str) -> None:
    live = {"kind": "Deployment", "metadata": {"generation": 1}, "spec": {"replicas": 2}, "status": status}
    finished, said = rollout(live)
    assert finished is done and detail in said


# --- the renderer ---------------------------------------------------------------------------------

def test_overlays_render_with_kustomize_semantics() -> None:
    dev, prod = manifests.render(DEV), manifests.render(K8S / "overlays" / "prod")
    assert {o["metadata"]["namespace"] for o in dev} == {"splitstack-dev"}
    assert not any("t4-int8" in o["metadata"]["name"] for o in dev)          # dev is CPU only
    nats = next(o for o in prod if o["kind"] == "StatefulSet")
    assert nats["spec"]["replicas"] == 3                                        # replicas transformer
    config = next(o for o in prod if o["metadata"]["name"] == "nats-config")
    assert "routes" in config["data"]["nats.conf"]                              # strategic-merge patch
    images = {c["image"] for o in prod for c in manifests.containers(o)}
    assert "registry.example.com/splitstack/serving-gpu:0.1.0" in images     # images transformer
    hpa = next(o for o in dev if o["kind"] == "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 1)  # JSON 6902 patch
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "splitstack" for o in dev)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    write(tmp_path / "kustomization.yaml", "resources: [cm.yaml]\nnamePrefix: x-\n")
    write(tmp_path / "cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    with pytest.raises(manifests.ManifestError, match=r"fields \['namePrefix'\] are not supported"):
        manifests.render(tmp_path)
    write(tmp_path / "kustomization.yaml",
          "resources: [cm.yaml]\npatches:\n- path: p.yaml\n  target: {kind: ConfigMap, name: a}\n")
    write(tmp_path / "p.yaml", "- op: move\n  from: /a\n  path: /b\n")
    with pytest.raises(manifests.ManifestError, match="op 'move' is not supported"):
        manifests.render(tmp_path)
    write(tmp_path / "p.yaml", "- op: replace\n  path: /data/missing\n  value: 1\n")
    with pytest.raises(manifests.ManifestError, match="path /data/missing does not exist in ConfigMap a"):
        manifests.render(tmp_path)
    write(tmp_path / "kustomization.yaml", "resources: [cm.yaml, cm.yaml]\n")
    with pytest.raises(manifests.ManifestError, match="ConfigMap a is defined twice"):
        manifests.render(tmp_path)


def test_image_names_lose_only_their_tag() -> None:
    assert manifests.image_name("registry.example.com:5000/splitstack/serving:0.1.0") == \
        "registry.example.com:5000/splitstack/serving"
    assert manifests.image_name("splitstack/serving@sha256:" + "0" * 64) == "splitstack/serving"
    objs = [{"kind": "Deployment", "metadata": {"name": "d"},
             "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "splitstack/serving:1"}]}}}}]
    moved = copy.deepcopy(objs)
    manifests._set_image(moved, {"name": "splitstack/serving", "newName": "r.io/s"}, Path("k"))
    assert manifests.containers(moved[0])[0]["image"] == "r.io/s:1"
