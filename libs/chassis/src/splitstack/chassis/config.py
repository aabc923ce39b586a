"""One frozen settings object per service, read once from the environment.

A service subclasses `ChassisSettings` with its own fields; `load_settings(RegistrySettings,
"registry")` reads `SPLITSTACK_REGISTRY_<FIELD>` for each field, except fields declared with
`shared_env(...)`, which read one platform-wide variable (`SPLITSTACK_NATS_URL`, peers'
`SPLITSTACK_<PEER>_ADDR`). An unknown `SPLITSTACK_<SERVICE>_*` variable is an error, so a typo
in a manifest fails at start instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

PREFIX = "SPLITSTACK_"


class ConfigError(ValueError):
    """A setting is missing, unknown or malformed; the message names the variable."""


def shared_env(var: str, default: Any = None, *, default_factory: Any = None) -> Any:
    """A field read from one platform-wide variable (not prefixed by the service name)."""
    meta = {"env": var}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def peer_addr(peer: str) -> Any:
    """A field holding a peer service's gRPC address, from SPLITSTACK_<PEER>_ADDR."""
    return shared_env(f"{PREFIX}{peer.upper()}_ADDR", "")


def _default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass(frozen=True)
class ChassisSettings:
    """Settings every service has. Subclasses add their own (all with defaults)."""

    instance: str = dataclasses.field(default_factory=_default_instance)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0                      # 0: pick a free port (see ready_file)
    metrics_port: int = -1                  # -1: no Prometheus endpoint; 0: pick a free port
    ready_file: str = ""                    # JSON {pid, grpc_port, metrics_port} written once serving
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    max_message_bytes: int = 64 * 1024 * 1024
    # Concurrent RPCs (HTTP/2 streams) one client connection may hold open; with a per-stream
    # window (serving's ModelStreamInfer) this bounds what one connection can make a server buffer.
    max_concurrent_streams: int = 256
    # Server TLS: cert + key turn TLS on; a client CA on top requires client certificates (mTLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Client side, when calling peers: a CA turns TLS on; cert + key present a client certificate.
    peer_tls_ca_file: str = shared_env(f"{PREFIX}TLS_CA_FILE", "")
    peer_tls_cert_file: str = shared_env(f"{PREFIX}TLS_CLIENT_CERT_FILE", "")
    peer_tls_key_file: str = shared_env(f"{PREFIX}TLS_CLIENT_KEY_FILE", "")
    # NATS: the URL(s) and, when the server requires them, credentials.
    nats_url: str = shared_env(f"{PREFIX}NATS_URL", "nats://127.0.0.1:4222")
    nats_user: str = shared_env(f"{PREFIX}NATS_USER", "")
    nats_password: str = shared_env(f"{PREFIX}NATS_PASSWORD", "")
    nats_token: str = shared_env(f"{PREFIX}NATS_TOKEN", "")
    nats_nkey_seed_file: str = shared_env(f"{PREFIX}NATS_NKEY_SEED_FILE", "")
    nats_tls_ca_file: str = shared_env(f"{PREFIX}NATS_TLS_CA_FILE", "")
    nats_connect_timeout_seconds: float = shared_env(f"{PREFIX}NATS_CONNECT_TIMEOUT_SECONDS", 30.0)


S = TypeVar("S", bound=ChassisSettings)


def env_name(service: str, field: dataclasses.Field) -> str:
    """The environment variable a field is read from."""
    return field.metadata.get("env") or f"{PREFIX}{service.upper()}_{field.name.upper()}"


def env_vars(cls: type[ChassisSettings], service: str) -> dict[str, str]:
    """Every variable a settings class reads, mapped to its field name (used by deploy checks)."""
    return {env_name(service, f): f.name for f in dataclasses.fields(cls)}


def _convert(var: str, raw: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError("expected true/false")
            return raw.lower() in ("1", "true", "yes", "on")
        if kind in (int, float, str, Path):
            return kind(raw)
        if origin is tuple:
            return tuple(s.strip() for s in raw.split(",") if s.strip())
    except ValueError as exc:
        raise ConfigError(f"{var}={raw!r}: {exc}") from None
    raise ConfigError(f"{var}: unsupported setting type {kind!r}")


def load_settings(cls: type[S], service: str, env: Mapping[str, str] | None = None) -> S:
    """Read `cls` from `env` (default os.environ) once; raise ConfigError naming any bad variable."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    known = {env_name(service, f) for f in fields}
    own_prefix = f"{PREFIX}{service.upper()}_"
    own_addr = f"{own_prefix}ADDR"  # the stack tells every service every address, its own included
    unknown = sorted(v for v in env if v.startswith(own_prefix) and v not in known and v != own_addr)
    if unknown:
        raise ConfigError(f"unknown {service} settings: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(v for v in known if v.startswith(own_prefix)))})")
    values = {f.name: _convert(env_name(service, f), env[env_name(service, f)], hints[f.name])
              for f in fields if env_name(service, f) in env}
    return cls(**values)
