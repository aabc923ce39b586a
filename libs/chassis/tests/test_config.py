"""load_settings: per-service and shared variables, type conversion, and typos that fail loudly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from splitstack.chassis.config import ChassisSettings, ConfigError, env_vars, load_settings, peer_addr, shared_env


@dataclasses.dataclass(frozen=True)
class WidgetSettings(ChassisSettings):
    """A service's own settings on top of the chassis ones."""

    batch_size: int = 8
    learning_rate: float = 0.1
    warm_start: bool = False
    targets: tuple[str, ...] = ("cpu",)
    artifact_dir: Path = Path("/tmp/artifacts")
    region: str = shared_env("SPLITSTACK_REGION", "local")
    registry_addr: str = peer_addr("registry")


@dataclasses.dataclass(frozen=True)
class OddSettings(ChassisSettings):
    weights: list[int] = dataclasses.field(default_factory=list)


def test_defaults_when_nothing_is_set() -> None:
    settings = load_settings(WidgetSettings, "widget", {})
    assert (settings.batch_size, settings.warm_start, settings.targets) == (8, False, ("cpu",))
    assert settings.grpc_port == 0 and settings.metrics_port == -1
    assert settings.nats_url == "nats://127.0.0.1:4222"


def test_unknown_service_variable_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(WidgetSettings, "widget", {"SPLITSTACK_WIDGET_BATCH_SIZ": "4"})
    assert "SPLITSTACK_WIDGET_BATCH_SIZ" in str(caught.value)
    assert "SPLITSTACK_WIDGET_BATCH_SIZE" in str(caught.value)  # the known names are listed


def test_shared_field_is_not_read_from_the_service_prefix() -> None:
    with pytest.raises(ConfigError, match="SPLITSTACK_WIDGET_NATS_URL"):
        load_settings(WidgetSettings, "widget", {"SPLITSTACK_WIDGET_NATS_URL": "nats://x:1"})


def test_other_services_variables_are_ignored() -> None:
    env = {"SPLITSTACK_TRAINER_BATCH_SIZ": "1", "SPLITSTACK_REGISTRY_ADDR": "10.0.0.1:50051", "HOME": "/root"}
    assert load_settings(WidgetSettings, "widget", env).batch_size == 8


def test_values_are_converted_to_the_field_types() -> None:
    settings = load_settings(WidgetSettings, "widget", {
        "SPLITSTACK_WIDGET_BATCH_SIZE": "1024", "SPLITSTACK_WIDGET_LEARNING_RATE": "3e-4",
        "SPLITSTACK_WIDGET_WARM_START": "yes", "SPLITSTACK_WIDGET_TARGETS": " cpu, t4-int8 ,,",
        "SPLITSTACK_WIDGET_ARTIFACT_DIR": "/data/a", "SPLITSTACK_WIDGET_SHUTDOWN_GRACE_SECONDS": "2.5"})
    assert settings.batch_size == 1024
    assert settings.learning_rate == pytest.approx(3e-4)
    assert settings.warm_start is True
    assert settings.targets == ("cpu", "t4-int8")
    assert settings.artifact_dir == Path("/data/a")
    assert settings.shutdown_grace_seconds == 2.5


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("TRUE", True), ("on", True), ("0", False),
                                               ("false", False), ("No", False), ("off", False)])
def test_bool_spellings(raw: str, expected: bool) -> None:
    assert load_settings(WidgetSettings, "widget", {"SPLITSTACK_WIDGET_WARM_START": raw}).warm_start is expected


@pytest.mark.parametrize(("var", "raw"), [("SPLITSTACK_WIDGET_BATCH_SIZE", "eight"),
                                          ("SPLITSTACK_WIDGET_LEARNING_RATE", "fast"),
                                          ("SPLITSTACK_WIDGET_WARM_START", "maybe"),
                                          ("SPLITSTACK_WIDGET_GRPC_PORT", "50051.5")])
def test_malformed_value_is_an_error_naming_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=var):
        load_settings(WidgetSettings, "widget", {var: raw})


def test_unsupported_field_type_is_an_error_when_set() -> None:
    assert load_settings(OddSettings, "odd", {}).weights == []
    with pytest.raises(ConfigError, match="SPLITSTACK_ODD_WEIGHTS"):
        load_settings(OddSettings, "odd", {"SPLITSTACK_ODD_WEIGHTS": "1,2"})


def test_shared_fields_read_the_platform_wide_variable() -> None:
    settings = load_settings(WidgetSettings, "widget", {
        "SPLITSTACK_NATS_URL": "nats://bus:4222", "SPLITSTACK_NATS_CONNECT_TIMEOUT_SECONDS": "3",
        "SPLITSTACK_TLS_CA_FILE": "/etc/ca.pem", "SPLITSTACK_REGION": "eu", "SPLITSTACK_REGISTRY_ADDR": "reg:50051"})
    assert settings.nats_url == "nats://bus:4222"
    assert settings.nats_connect_timeout_seconds == 3.0
    assert settings.peer_tls_ca_file == "/etc/ca.pem"
    assert settings.region == "eu"
    assert settings.registry_addr == "reg:50051"


def test_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITSTACK_WIDGET_BATCH_SIZE", "16")
    assert load_settings(WidgetSettings, "widget").batch_size == 16


def test_settings_are_frozen() -> None:
    settings = load_settings(WidgetSettings, "widget", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch_size = 1  # type: ignore[misc]


def test_env_vars_lists_every_variable_with_its_field() -> None:
    names = env_vars(WidgetSettings, "widget")
    assert names["SPLITSTACK_WIDGET_BATCH_SIZE"] == "batch_size"
    assert names["SPLITSTACK_WIDGET_GRPC_PORT"] == "grpc_port"
    assert names["SPLITSTACK_NATS_URL"] == "nats_url"
    assert names["SPLITSTACK_TLS_CA_FILE"] == "peer_tls_ca_file"
    assert names["SPLITSTACK_REGISTRY_ADDR"] == "registry_addr"
    assert names["SPLITSTACK_REGION"] == "region"
    assert sorted(names.values()) == sorted(f.name for f in dataclasses.fields(WidgetSettings))
    assert "SPLITSTACK_WIDGET_NATS_URL" not in names
