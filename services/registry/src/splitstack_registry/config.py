"""RegistrySettings: the registry's one frozen settings object, read once from SPLITSTACK_REGISTRY_*."""

from __future__ import annotations

import dataclasses

from splitstack.chassis.config import ChassisSettings, ConfigError, load_settings

SERVICE_NAME = "registry"
GIB = 1024 ** 3
MIB = 1024 ** 2


@dataclasses.dataclass(frozen=True)
class RegistrySettings(ChassisSettings):
    """Where metadata and blobs live, upload limits, orphan sweeping, and how often the outbox relay polls."""

    database_url: str = "sqlite:///registry.db"    # or postgresql+psycopg://user:pw@host/db
    artifact_dir: str = "artifacts"                # local blob directory (when s3_bucket is empty)
    s3_bucket: str = ""                            # non-empty: blobs live in this S3 bucket
    s3_endpoint_url: str = ""                      # empty: AWS; else any S3-compatible endpoint
    s3_region: str = "us-east-1"
    s3_prefix: str = "blobs"
    s3_access_key_id: str = ""                     # empty: boto3's default credential chain
    s3_secret_access_key: str = ""
    spool_dir: str = ""                            # in-flight uploads; default beside the blobs / temp
    max_upload_bytes: int = 2 * GIB                # largest artifact or dataset blob accepted
    max_dataset_array_bytes: int = 8 * GIB         # largest total of a dataset .npz's arrays, uncompressed
    upload_idle_seconds: float = 60.0              # an upload stream silent this long is cut off
    spool_min_free_bytes: int = 1 * GIB            # uploads are refused rather than leave less free in the spool
    orphan_grace_seconds: float = 3600.0           # an unreferenced blob younger than this is never swept
    orphan_sweep_seconds: float = 3600.0           # sweep unreferenced blobs at start and this often
    chunk_bytes: int = 1 * MIB                     # download chunk size
    relay_poll_seconds: float = 0.5                # outbox relay poll interval (it is also woken on commit)

    def __post_init__(self) -> None:
        for knob in ("max_upload_bytes", "max_dataset_array_bytes", "upload_idle_seconds", "orphan_sweep_seconds"):
            if getattr(self, knob) <= 0:
                raise ConfigError(f"SPLITSTACK_REGISTRY_{knob.upper()} must be > 0, got {getattr(self, knob)}")
        for knob in ("spool_min_free_bytes", "orphan_grace_seconds"):
            if getattr(self, knob) < 0:
                raise ConfigError(f"SPLITSTACK_REGISTRY_{knob.upper()} must be >= 0, got {getattr(self, knob)}")
        if not 0 < self.chunk_bytes <= self.max_message_bytes // 2:
            raise ConfigError(f"SPLITSTACK_REGISTRY_CHUNK_BYTES must be in 1..{self.max_message_bytes // 2} "
                              f"(half of max_message_bytes), got {self.chunk_bytes}")
        if self.relay_poll_seconds <= 0:
            raise ConfigError(f"SPLITSTACK_REGISTRY_RELAY_POLL_SECONDS must be > 0, got {self.relay_poll_seconds}")
        if not self.database_url:
            raise ConfigError("SPLITSTACK_REGISTRY_DATABASE_URL must not be empty")
        if bool(self.s3_access_key_id) != bool(self.s3_secret_access_key):
            raise ConfigError("set both SPLITSTACK_REGISTRY_S3_ACCESS_KEY_ID and "
                              "SPLITSTACK_REGISTRY_S3_SECRET_ACCESS_KEY, or neither")

    @property
    def producer(self) -> str:
        """The producer name stamped on every event envelope (service/instance)."""
        return f"{SERVICE_NAME}/{self.instance}"


def load_registry_settings(env: dict[str, str] | None = None) -> RegistrySettings:
    """Read RegistrySettings from `env` (default: the process environment)."""
    return load_settings(RegistrySettings, SERVICE_NAME, env)
