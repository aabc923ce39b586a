"""Manifests against each service's own configuration: env vars, listening ports, probes, addresses.

A container of service `x` (pod label app.kubernetes.io/name) may only be given SPLITSTACK_*
variables that `env_vars(<x's settings class>, x)` lists (plus SPLITSTACK_X_ADDR, which the
platform gives every service); its settings must load from them; its container ports must be the
ports those settings make it listen on, and its probes must probe them. Services' target ports
and the peer addresses in the env (SPLITSTACK_*_ADDR, SPLITSTACK_NATS_URL) must reach a port.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from splitstack.chassis.config import (
    ChassisSettings,
    ConfigError,
    env_vars,
    load_settings,
)
from splitstack.client.manifests import containers

from tools.deploy_check.overlay import (
    Obj,
    Overlay,
    container_env,
    container_ports,
    pod_labels,
    selects,
)

SETTINGS = {
    "registry": ("splitstack_registry.config", "RegistrySettings"),
    "trainer": ("splitstack_trainer.config", "TrainerSettings"),
    "converter": ("splitstack_converter.config", "ConverterSettings"),
    "serving": ("splitstack_serving.config", "ServingSettings"),
}
PREFIX = "SPLITSTACK_"
PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


@dataclass
class ServiceContainer:
    """One container of one of our services, with its resolved env and loaded settings."""

    service: str
    workload: Obj
    container: Obj
    env: dict[str, str]
    settings: Any = None


def settings_class(service: str) -> type[ChassisSettings]:
    module, name = SETTINGS[service]
    return getattr(importlib.import_module(module), name)


def service_containers(overlay: Overlay, problems: list[str]) -> list[ServiceContainer]:
    """Every container of our services in the overlay, its env checked and its settings loaded."""
    found = []
    for workload in overlay.workloads():
        service = pod_labels(workload).get("app.kubernetes.io/name", "")
        if service not in SETTINGS:
            continue
        for container in containers(workload):
            env, env_problems = container_env(overlay, workload, container)
            problems.extend(env_problems)
            entry = ServiceContainer(service, workload, container, env)
            problems.extend(_check_names(overlay, entry))
            entry.settings = _load(overlay, entry, problems)
            found.append(entry)
    return found


def _check_names(overlay: Overlay, entry: ServiceContainer) -> list[str]:
    cls = settings_class(entry.service)
    known = set(env_vars(cls, entry.service)) | {f"{PREFIX}{entry.service.upper()}_ADDR"}
    return [overlay.problem(entry.workload, f"container {entry.container['name']}: env {var} is not a setting of "
                                            f"{entry.service} ({cls.__module__}.{cls.__name__})")
            for var in sorted(entry.env) if var.startswith(PREFIX) and var not in known]


def _load(overlay: Overlay, entry: ServiceContainer, problems: list[str]) -> Any:
    known = set(env_vars(settings_class(entry.service), entry.service))
    env = {k: v for k, v in entry.env.items() if k in known}
    try:
        return load_settings(settings_class(entry.service), entry.service, env)
    except (ConfigError, TypeError, ValueError) as exc:
        problems.append(overlay.problem(entry.workload, f"container {entry.container['name']}: "
                                                        f"{entry.service} settings do not load: {exc}"))
        return None


def check_ports(overlay: Overlay, entry: ServiceContainer) -> list[str]:
    """Container ports and probes against the ports the settings make the service listen on."""
    settings, name = entry.settings, entry.container["name"]
    if settings is None:
        return []
    problems = []
    var = f"{PREFIX}{entry.service.upper()}"
    listening = {"grpc": settings.grpc_port, "metrics": settings.metrics_port}
    if settings.grpc_port <= 0:
        problems.append(f"container {name}: {var}_GRPC_PORT is not set (0 picks a random port no Service can reach)")
    if settings.grpc_host not in WILDCARD_HOSTS:
        problems.append(f"container {name}: {var}_GRPC_HOST={settings.grpc_host} is not reachable from other pods "
                        f"(use 0.0.0.0)")
    for port in entry.container.get("ports") or []:
        number, port_name = port["containerPort"], port.get("name", "")
        if port_name in listening and listening[port_name] != number:
            problems.append(f"container {name}: containerPort {port_name}={number} but {var}_{port_name.upper()}_PORT="
                            f"{listening[port_name]}")
        elif number not in listening.values():
            problems.append(f"container {name}: containerPort {number} ({port_name or 'unnamed'}) is not a port "
                            f"{entry.service} listens on (grpc {settings.grpc_port}, metrics {settings.metrics_port})")
    problems.extend(_check_probes(entry, listening))
    return [overlay.problem(entry.workload, p) for p in problems]


def _check_probes(entry: ServiceContainer, listening: dict[str, int]) -> list[str]:
    problems = []
    ports = container_ports(entry.workload)
    for kind in PROBES:
        probe = entry.container.get(kind) or {}
        for action in ("grpc", "tcpSocket", "httpGet"):
            if action not in probe:
                continue
            port = ports.get(str(probe[action]["port"]))
            wanted = listening["grpc"] if action in ("grpc", "tcpSocket") else listening["metrics"]
            if port != wanted:
                problems.append(f"container {entry.container['name']}: {kind} {action} port {probe[action]['port']} "
                                f"is not the {entry.service}'s {'gRPC' if wanted == listening['grpc'] else 'metrics'}"
                                f" port {wanted}")
    return problems


def check_services(overlay: Overlay) -> list[str]:
    """Every Service selects pods, and each of its target ports is a port of those pods."""
    problems = []
    for service in overlay.of_kind("Service"):
        selector = service["spec"].get("selector") or {}
        pods = [w for w in overlay.workloads() if selects(selector, pod_labels(w))]
        if not pods:
            problems.append(overlay.problem(service, f"selector {selector} matches no pod template"))
            continue
        for port in service["spec"].get("ports") or []:
            target = str(port.get("targetPort", port["port"]))
            for pod in pods:
                if target not in container_ports(pod):
                    label = port.get("name", port["port"])
                    problems.append(overlay.problem(service, f"port {label}: targetPort {target} is not a container "
                                                             f"port of {pod['metadata']['name']}"))
    return problems


def check_addresses(overlay: Overlay, entry: ServiceContainer) -> list[str]:
    """Peer addresses and the NATS URL in the env name a Service port of this overlay."""
    problems = []
    for var, value in sorted(entry.env.items()):
        if not (var.startswith(PREFIX) and (var.endswith("_ADDR") or var.endswith("_NATS_URL"))) or not value:
            continue
        for address in value.split(","):
            problem = address_problem(overlay, address.strip())
            if problem:
                problems.append(overlay.problem(entry.workload, f"container {entry.container['name']}: env "
                                                                f"{var}={value}: {problem}"))
    return problems


def address_problem(overlay: Overlay, address: str) -> str:
    """Why `host:port` (or a URL) reaches no Service port of the overlay ("" when it does)."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    host, port = parts.hostname or "", parts.port
    labels = host.split(".")
    service = overlay.find("Service", labels[0])
    if service is None:
        return f"no Service named {labels[0]}"
    namespace = service["metadata"].get("namespace", "")
    if len(labels) > 1 and labels[1] != namespace:
        return f"Service {labels[0]} is in namespace {namespace}, not {labels[1]}"
    ports = [p["port"] for p in service["spec"].get("ports") or []]
    if port not in ports:
        return f"Service {labels[0]} has no port {port} (ports: {', '.join(map(str, ports))})"
    return ""
