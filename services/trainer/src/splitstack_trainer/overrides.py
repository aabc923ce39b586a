"""Bounds on a job's `profile_override`: what an ad-hoc profile may ask of the cluster.

Named profiles are the operator's data and used as they are. An override comes from the client, so
it is held to the operator's limits (TrainerSettings `override_max_*`): nodes, devices per node, and
per pod the CPU, memory and `nvidia.com/gpu` it requests (no other resource); its placement (node
selector and tolerations together) must be exactly that of one named profile, so it can only land
where some profile already may. Every refusal is INVALID_ARGUMENT naming the field and the limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from splitstack.chassis.errors import InvalidArgument
from splitstack.common.v1 import common_pb2
from splitstack.contracts.limits import MAX_LONG_TEXT, MAX_SHORT_TEXT, OutOfBounds, check_text
from splitstack.contracts.names import InvalidName, check_name

PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
GPU_RESOURCE = "nvidia.com/gpu"
RESOURCES = ("cpu", "memory", GPU_RESOURCE)
MAX_BATCH_SIZE = 1 << 20
# Kubernetes resource quantities: a decimal number, then an SI or binary suffix or an exponent.
QUANTITY = re.compile(r"\+?(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
                      r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)|[eE](?P<exponent>[+-]?[0-9]{1,2}))?")
SUFFIXES = {"": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6,
            "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
            **{s: Decimal(2) ** (10 * (i + 1)) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))}}


def parse_quantity(text: str) -> Decimal:
    """The value of a Kubernetes quantity (`500m`, `2`, `64Gi`, `1e3`); ValueError otherwise."""
    match = QUANTITY.fullmatch(text) if len(text) <= 32 else None
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)")
    try:
        value = Decimal(match["number"])
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from None
    if match["exponent"] is not None:
        return value * Decimal(10) ** int(match["exponent"])
    return value * SUFFIXES[match["suffix"] or ""]


@dataclass(frozen=True)
class OverrideLimits:
    """The operator's bounds on a profile_override (per pod where it says so)."""

    max_nodes: int = 2
    max_devices: int = 8
    max_cpu: str = "16"
    max_memory: str = "64Gi"
    max_gpus: int = 8

    @classmethod
    def from_settings(cls, settings: Any) -> OverrideLimits:
        return cls(settings.override_max_nodes, settings.override_max_devices, settings.override_max_cpu,
                   settings.override_max_memory, settings.override_max_gpus)

    def resource_limit(self, resource: str) -> tuple[Decimal, str, str]:
        """(bound, as configured, knob) of one resource."""
        if resource == "cpu":
            return parse_quantity(self.max_cpu), self.max_cpu, "SPLITSTACK_TRAINER_OVERRIDE_MAX_CPU"
        if resource == "memory":
            return parse_quantity(self.max_memory), self.max_memory, "SPLITSTACK_TRAINER_OVERRIDE_MAX_MEMORY"
        return Decimal(self.max_gpus), str(self.max_gpus), "SPLITSTACK_TRAINER_OVERRIDE_MAX_GPUS"


def check_override(profile: common_pb2.TrainingProfile, limits: OverrideLimits,
                   profiles: Mapping[str, common_pb2.TrainingProfile]) -> common_pb2.TrainingProfile:
    """An ad-hoc profile within the operator's limits (a copy, named `custom` when unnamed)."""
    checked = common_pb2.TrainingProfile()
    checked.CopyFrom(profile)
    checked.name = checked.name or "custom"
    _check_text(checked)
    if checked.batch_size <= 0 or checked.devices <= 0 or checked.nodes <= 0:
        raise InvalidArgument("profile_override: batch_size, devices and nodes must be positive")
    _at_most("profile_override.batch_size", checked.batch_size, MAX_BATCH_SIZE, "the trainer's bound")
    _at_most("profile_override.nodes", checked.nodes, limits.max_nodes, "SPLITSTACK_TRAINER_OVERRIDE_MAX_NODES")
    _at_most("profile_override.devices", checked.devices, limits.max_devices,
             "SPLITSTACK_TRAINER_OVERRIDE_MAX_DEVICES (per node)")
    if checked.precision not in PRECISIONS:
        raise InvalidArgument(f"profile_override.precision {checked.precision[:40]!r} is not one of {PRECISIONS}")
    if checked.accelerator not in (common_pb2.CPU, common_pb2.GPU):
        raise InvalidArgument("profile_override.accelerator must be CPU or GPU")
    _check_resources(checked.resources, limits)
    _check_placement(checked, profiles)
    return checked


def _check_text(profile: common_pb2.TrainingProfile) -> None:
    try:
        check_name("profile_override.name", profile.name)
        check_text("profile_override.gpu_product", profile.gpu_product, MAX_SHORT_TEXT, single_line=True)
        check_text("profile_override.interconnect", profile.interconnect, MAX_SHORT_TEXT, single_line=True)
        check_text("profile_override.description", profile.description, MAX_LONG_TEXT)
    except (InvalidName, OutOfBounds) as exc:
        raise InvalidArgument(str(exc)) from None


def _at_most(field: str, value: int, limit: int, knob: str) -> None:
    if value > limit:
        raise InvalidArgument(f"{field} is {value}; at most {limit} is allowed ({knob})")


def _check_resources(resources: Mapping[str, str], limits: OverrideLimits) -> None:
    for name, quantity in sorted(resources.items()):
        field = f"profile_override.resources[{name[:64]!r}]"
        if name not in RESOURCES:
            raise InvalidArgument(f"{field}: a profile_override may request only {', '.join(RESOURCES)}")
        try:
            value = parse_quantity(quantity)
        except ValueError as exc:
            raise InvalidArgument(f"{field}: {exc}") from None
        bound, shown, knob = limits.resource_limit(name)
        if name == GPU_RESOURCE and value != value.to_integral_value():
            raise InvalidArgument(f"{field} must be a whole number of GPUs, got {quantity!r}")
        if value > bound:
            raise InvalidArgument(f"{field} is {quantity}; at most {shown} per pod is allowed ({knob})")


def placement(profile: common_pb2.TrainingProfile) -> tuple[tuple, tuple]:
    """Node selector and tolerations of a profile, comparable."""
    tolerations = sorted((t.key, t.operator, t.value, t.effect) for t in profile.tolerations)
    return tuple(sorted(profile.node_selector.items())), tuple(tolerations)


def _check_placement(profile: common_pb2.TrainingProfile, profiles: Mapping[str, common_pb2.TrainingProfile]) -> None:
    wanted = placement(profile)
    if any(placement(named) == wanted for named in profiles.values()):
        return
    raise InvalidArgument("profile_override.node_selector and profile_override.tolerations must be exactly those "
                          f"of a named profile (one of {', '.join(sorted(profiles))}); an override cannot place "
                          "pods where no profile may")
