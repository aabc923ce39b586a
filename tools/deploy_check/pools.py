"""Serving and converter pools against their inference targets (libs/contracts stacks/inference/).

- Hardware: a pool's pods carry the target's node selector (the GPU product, so a converter
  builds engines on the GPU its serving pool runs) and tolerations, and request a GPU exactly
  when the target is a GPU target.
- Serving: an autoscaling/v2 HPA with the target's replicas and CPU utilisation (exactly in the
  full-scale overlays, within them elsewhere), CPU requests on every container, a gRPC readiness
  probe, and terminationGracePeriodSeconds above preStop + SHUTDOWN_GRACE_SECONDS.
- Converter: a KEDA ScaledObject whose nats-jetstream trigger names the contracts' durable
  consumer `converter-<target>` on its stream, through the NATS Service's monitoring port.
"""

from __future__ import annotations

from typing import Any

from splitstack.client.manifests import TARGET_LABEL
from splitstack.common.v1 import common_pb2
from splitstack.contracts.events import CONSUMERS
from splitstack.contracts.stacks import inference_targets

from tools.deploy_check.config import ServiceContainer, address_problem
from tools.deploy_check.overlay import Obj, Overlay, pod_labels, pod_spec

GPU_RESOURCE = "nvidia.com/gpu"
FULL_SCALE_OVERLAYS = ("prod",)   # there the HPA policy is exactly the target's; elsewhere within it


def check_pools(overlay: Overlay, entries: list[ServiceContainer]) -> list[str]:
    """Problems of every serving and converter container's pool."""
    targets = inference_targets()
    problems: list[str] = []
    for entry in entries:
        if entry.service not in ("serving", "converter") or entry.settings is None:
            continue
        target = targets.get(entry.settings.target)
        if target is None:
            problems.append(overlay.problem(entry.workload, f"target {entry.settings.target!r} is not an inference "
                                                            f"target (known: {', '.join(sorted(targets))})"))
            continue
        problems.extend(overlay.problem(entry.workload, p) for p in _hardware(entry, target))
        if entry.service == "serving":
            problems.extend(_serving(overlay, entry, target))
        else:
            problems.extend(_converter(overlay, entry))
    problems.extend(_orphan_scalers(overlay))
    return problems


def _hardware(entry: ServiceContainer, target: Any) -> list[str]:
    spec, name = pod_spec(entry.workload), entry.settings.target
    problems = []
    if pod_labels(entry.workload).get(TARGET_LABEL) != name:
        problems.append(f"pod label {TARGET_LABEL} is {pod_labels(entry.workload).get(TARGET_LABEL)!r}, "
                        f"not the pool's target {name!r}")
    selector = spec.get("nodeSelector") or {}
    for key, value in target.node_selector.items():
        if selector.get(key) != value:
            problems.append(f"nodeSelector {key}={selector.get(key)!r}, target {name} needs {value!r}")
    tolerations = [{k: v for k, v in t.items() if k != "tolerationSeconds"} for t in spec.get("tolerations") or []]
    for wanted in target.tolerations:
        item = {k: v for k, v in (("key", wanted.key), ("operator", wanted.operator), ("value", wanted.value),
                                  ("effect", wanted.effect)) if v}
        if item not in tolerations:
            problems.append(f"tolerations lack {item} (target {name})")
    gpus = ((entry.container.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE)
    gpu_target = target.accelerator == common_pb2.GPU
    if gpu_target and not gpus:
        problems.append(f"container {entry.container['name']}: target {name} is a GPU target but no "
                        f"{GPU_RESOURCE} limit")
    if not gpu_target and gpus:
        problems.append(f"container {entry.container['name']}: target {name} is a CPU target but asks for "
                        f"{GPU_RESOURCE}")
    return problems


# --- serving --------------------------------------------------------------------------------------

def _serving(overlay: Overlay, entry: ServiceContainer, target: Any) -> list[str]:
    problems = []
    container, name = entry.container, entry.container["name"]
    if not ((container.get("resources") or {}).get("requests") or {}).get("cpu"):
        problems.append(f"container {name}: no CPU request (resources.requests.cpu); the HPA scales on CPU "
                        f"utilisation, which needs it")
    if "grpc" not in (container.get("readinessProbe") or {}):
        problems.append(f"container {name}: readinessProbe must be the gRPC health check (ready = models loaded "
                        f"and warmed)")
    drain = entry.settings.shutdown_grace_seconds + _pre_stop_seconds(container)
    grace = pod_spec(entry.workload).get("terminationGracePeriodSeconds", 30)
    if grace <= drain:
        problems.append(f"terminationGracePeriodSeconds {grace} is not above the drain time {drain:g} s "
                        f"(preStop + SPLITSTACK_SERVING_SHUTDOWN_GRACE_SECONDS)")
    problems = [overlay.problem(entry.workload, p) for p in problems]
    return problems + _hpa(overlay, entry.workload, target)


def _pre_stop_seconds(container: Obj) -> float:
    pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = (pre_stop.get("exec") or {}).get("command") or []
    return float(command[1]) if len(command) == 2 and command[0] == "sleep" else 0.0


def _hpa(overlay: Overlay, deployment: Obj, target: Any) -> list[str]:
    name = deployment["metadata"]["name"]
    hpas = [h for h in overlay.of_kind("HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"].get("kind") == "Deployment" and h["spec"]["scaleTargetRef"]["name"] == name]
    if not hpas:
        return [overlay.problem(deployment, "no HorizontalPodAutoscaler scales it")]
    problems = []
    if "replicas" in deployment["spec"]:
        problems.append(overlay.problem(deployment, "sets spec.replicas, which the HPA owns (every apply would "
                                                    "reset the scale)"))
    for hpa in hpas:
        problems.extend(overlay.problem(hpa, p) for p in _hpa_policy(overlay.name, hpa, target))
    return problems


def _hpa_policy(overlay_name: str, hpa: Obj, target: Any) -> list[str]:
    spec, problems = hpa["spec"], []
    if hpa["apiVersion"] != "autoscaling/v2":
        problems.append(f"apiVersion {hpa['apiVersion']}, expected autoscaling/v2")
    low, high = spec.get("minReplicas", 1), spec["maxReplicas"]
    if overlay_name in FULL_SCALE_OVERLAYS and (low, high) != (target.replicas_min, target.replicas_max):
        problems.append(f"replicas {low}..{high}, target {target.id} says {target.replicas_min}..{target.replicas_max}")
    elif not 1 <= low <= high <= target.replicas_max:
        problems.append(f"replicas {low}..{high} outside 1..{target.replicas_max} (target {target.id})")
    utilisation = [m["resource"]["target"].get("averageUtilization") for m in spec.get("metrics") or []
                   if m.get("type") == "Resource" and m["resource"]["name"] == target.scaling_metric]
    if utilisation != [target.scaling_target]:
        problems.append(f"{target.scaling_metric} utilisation targets {utilisation}, target {target.id} says "
                        f"[{target.scaling_target}]")
    return problems


# --- converter ------------------------------------------------------------------------------------

def _scalers_of(overlay: Overlay, deployment: Obj) -> list[Obj]:
    name = deployment["metadata"]["name"]
    return [s for s in overlay.of_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name
            and s["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"]


def _converter(overlay: Overlay, entry: ServiceContainer) -> list[str]:
    scalers = _scalers_of(overlay, entry.workload)
    if not scalers:
        return [overlay.problem(entry.workload, "no KEDA ScaledObject scales it")]
    consumer = CONSUMERS["converter"].for_target(entry.settings.target)
    problems = []
    if "replicas" in entry.workload["spec"]:
        problems.append(overlay.problem(entry.workload, "sets spec.replicas, which KEDA owns"))
    for scaler in scalers:
        triggers = [t for t in scaler["spec"]["triggers"] if t["type"] == "nats-jetstream"]
        if not triggers:
            problems.append(overlay.problem(scaler, "no nats-jetstream trigger"))
        for trigger in triggers:
            problems.extend(overlay.problem(scaler, p) for p in _trigger(overlay, trigger["metadata"], consumer,
                                                                          entry.settings.target))
    return problems


def _trigger(overlay: Overlay, metadata: dict[str, str], consumer: Any, target: str) -> list[str]:
    problems = []
    if metadata.get("consumer") != consumer.durable:
        problems.append(f"nats-jetstream consumer {metadata.get('consumer')!r} is not {consumer.durable!r}, the "
                        f"contracts' durable consumer of target {target} (KEDA scales a missing consumer to the "
                        f"maximum)")
    if metadata.get("stream") != consumer.stream:
        problems.append(f"nats-jetstream stream {metadata.get('stream')!r} is not {consumer.stream!r} (contracts)")
    endpoint = metadata.get("natsServerMonitoringEndpoint", "")
    problem = address_problem(overlay, endpoint)
    if problem:
        problems.append(f"natsServerMonitoringEndpoint {endpoint}: {problem}")
    return problems


def _orphan_scalers(overlay: Overlay) -> list[str]:
    deployments = {d["metadata"]["name"] for d in overlay.of_kind("Deployment")}
    return [overlay.problem(s, f"scaleTargetRef {s['spec']['scaleTargetRef']['name']} is no Deployment")
            for s in overlay.of_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] not in deployments]
