"""TrainerSettings: read once from the environment; mistakes are named at start."""

from __future__ import annotations

import pytest

from splitstack.chassis.config import ConfigError
from splitstack_trainer.config import load_job_environment, load_trainer_settings
from splitstack_trainer.main import build_executors, load_profiles

BASE = {"SPLITSTACK_REGISTRY_ADDR": "127.0.0.1:1"}


def test_defaults_and_overrides() -> None:
    settings = load_trainer_settings({**BASE, "SPLITSTACK_TRAINER_MAX_LOCAL_JOBS": "3",
                                      "SPLITSTACK_TRAINER_DEFAULT_REQUIRED_TARGETS": "cpu,t4-int8"})
    assert settings.max_local_jobs == 3 and settings.default_required_targets == ("cpu", "t4-int8")
    assert settings.default_executor == "local" and not settings.kubernetes_enabled
    assert set(build_executors(settings)) == {"local"}
    assert "cpu-ddp2" in load_profiles(settings)
    job_env = load_job_environment({**BASE, "SPLITSTACK_NATS_URL": "nats://n:4222"})
    assert job_env.registry_addr == "127.0.0.1:1" and job_env.nats_url == "nats://n:4222"


@pytest.mark.parametrize("env, words", [
    ({"SPLITSTACK_TRAINER_MAX_LOCAL_JOB": "2"}, "SPLITSTACK_TRAINER_MAX_LOCAL_JOB"),
    ({"SPLITSTACK_REGISTRY_ADDR": ""}, "SPLITSTACK_REGISTRY_ADDR"),
    ({"SPLITSTACK_TRAINER_DEFAULT_EXECUTOR": "slurm"}, "DEFAULT_EXECUTOR"),
    ({"SPLITSTACK_TRAINER_MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS"),
    ({"SPLITSTACK_TRAINER_DEFAULT_REQUIRED_TARGETS": "CPU"}, "DEFAULT_REQUIRED_TARGETS"),
])
def test_mistakes_are_named(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_trainer_settings({**BASE, **env})


def test_executor_and_profile_mistakes_are_named_at_start() -> None:
    settings = load_trainer_settings({**BASE, "SPLITSTACK_TRAINER_DEFAULT_EXECUTOR": "kubernetes"})
    with pytest.raises(ConfigError, match="KUBERNETES_NAMESPACE"):
        build_executors(settings)
    with pytest.raises(ConfigError, match="tpu"):
        load_profiles(load_trainer_settings({**BASE, "SPLITSTACK_TRAINER_DEFAULT_PROFILE": "tpu"}))
    enabled = load_trainer_settings({**BASE, "SPLITSTACK_TRAINER_KUBERNETES_NAMESPACE": "training",
                                     "SPLITSTACK_TRAINER_KUBERNETES_IMAGE": "img:1"})
    assert set(build_executors(enabled)) == {"local", "kubernetes"}
