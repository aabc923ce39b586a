"""Where the platform's services are, and the gRPC channels to them.

`Endpoints` is plain data (registry, trainer, converter and serving addresses per target, the NATS
URL); `Endpoints.from_stack` reads them from a running local stack's `<state>/stack.json`.
`Channels` opens one insecure gRPC channel per address on first use and closes them all.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from splitstack.client import stack
from splitstack.client.stackfile import StackError, locate

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TARGET = "cpu"
# What each service's console script is called, and the variable naming its target (if any).
PROGRAMS = {"splitstack-registry": "registry", "splitstack-trainer": "trainer",
            "splitstack-converter": "converter", "splitstack-serving": "serving"}
TARGET_VARIABLES = {"converter": "SPLITSTACK_CONVERTER_TARGET", "serving": "SPLITSTACK_SERVING_TARGET"}


@dataclass(frozen=True)
class Endpoints:
    """Addresses (host:port) of every service the SDK may call, plus NATS."""

    registry: str
    trainer: str | None = None
    converters: Mapping[str, str] = field(default_factory=dict)   # target -> address
    serving: Mapping[str, str] = field(default_factory=dict)      # target -> address
    nats_url: str | None = None

    @classmethod
    def from_stack(cls, state_dir: str | os.PathLike[str] | None = None,
                   stack_file: str | os.PathLike[str] | None = None) -> "Endpoints":
        """The running local stack's addresses (ValueError when it is not running)."""
        try:
            paths = locate(state_dir, stack_file)
            state = stack.read_state(paths)
        except StackError as exc:
            raise ValueError(str(exc)) from None
        if state is None:
            raise ValueError(f"no local stack has run in {paths.state_dir} (no stack.json); start it with "
                             f"`splitstack up`")
        return cls.from_components(state.components.values(), paths.state_dir)

    @classmethod
    def from_components(cls, components: object, state_dir: Path) -> "Endpoints":
        found: dict[str, dict[str, str]] = {"registry": {}, "trainer": {}, "converter": {}, "serving": {}}
        nats_url = None
        for component in components:     # type: ignore[attr-defined]
            if not stack.is_running(component):
                log.debug("%s of the stack in %s is not running; ignored", component.name, state_dir)
                continue
            if component.kind == stack.NATS:
                nats_url = f"nats://{component.address}"
                continue
            role = PROGRAMS.get(Path(component.argv[0]).name) if component.argv else None
            role = role or (component.name if component.name in found else None)
            if role is not None:
                target = component.env.get(TARGET_VARIABLES.get(role, ""), DEFAULT_TARGET)
                found[role][target] = component.address
        if not found["registry"]:
            raise ValueError(f"the local stack in {state_dir} has no running registry; start it with `splitstack up`")
        return cls(registry=next(iter(found["registry"].values())),
                   trainer=next(iter(found["trainer"].values()), None),
                   converters=found["converter"], serving=found["serving"], nats_url=nats_url)


class Channels:
    """One gRPC channel per address, opened on first use (thread-safe), closed together."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def get(self, address: str) -> grpc.Channel:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = grpc.insecure_channel(address, options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
            return self._channels[address]

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
