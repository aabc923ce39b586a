"""Settings and targets: read once from the environment, unknown or bad values fail at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitstack.chassis.config import ConfigError
from splitstack.common.v1 import common_pb2 as common
from splitstack.contracts.stacks import inference_targets
from splitstack_converter.config import load_converter_settings
from splitstack_converter.main import load_targets, policy_for
from splitstack_converter.pipeline import tensorrt
from splitstack_converter.pipeline.isolation import MIB, ChildLimits

BASE = {"SPLITSTACK_REGISTRY_ADDR": "127.0.0.1:5000"}


def test_defaults_and_overrides() -> None:
    settings = load_converter_settings(BASE)
    assert (settings.target, settings.profile_min_runs, settings.profile_min_seconds) == ("cpu", 1000, 2.0)
    assert (settings.max_metric_drop, settings.min_top1_agreement, settings.switch_margin) == (0.01, 0.97, 0.10)
    assert settings.producer.startswith("converter/") and settings.engine_cache == Path("work/engines")
    tuned = load_converter_settings({**BASE, "SPLITSTACK_CONVERTER_PROFILE_MIN_RUNS": "50",
                                     "SPLITSTACK_CONVERTER_SWITCH_MARGIN": "0.2"})
    policy = policy_for(tuned, load_targets(tuned)["cpu"])
    assert policy.build.floors.min_runs == 50 and policy.switch_margin == 0.2
    assert policy.build.ort.intra_op_threads == 1 and policy.build.target.max_batch == 64
    assert (settings.registry_retry_seconds, settings.allow_pickled_programs) == (120.0, False)
    limits = policy_for(settings, load_targets(settings)["cpu"])
    assert limits.load_limits == ChildLimits(300.0, 8192 * MIB) and not limits.allow_pickled_programs
    assert limits.build.limits == ChildLimits(300.0, 8192 * MIB)
    unlimited = load_converter_settings({**BASE, "SPLITSTACK_CONVERTER_CHILD_MEMORY_MIB": "0",
                                         "SPLITSTACK_CONVERTER_LOAD_TIMEOUT_SECONDS": "30",
                                         "SPLITSTACK_CONVERTER_ALLOW_PICKLED_PROGRAMS": "true"})
    policy = policy_for(unlimited, load_targets(unlimited)["cpu"])
    assert policy.load_limits == ChildLimits(30.0, 0) and policy.allow_pickled_programs
    gpu_policy = policy_for(settings, inference_targets()["t4-int8"])     # CUDA needs its address space
    assert gpu_policy.build.limits.memory_bytes == 0 == gpu_policy.load_limits.memory_bytes


@pytest.mark.parametrize("env, words", [
    ({"SPLITSTACK_CONVERTER_TARGETT": "cpu"}, "SPLITSTACK_CONVERTER_TARGETT"),
    ({"SPLITSTACK_CONVERTER_TARGET": "CPU!"}, "not a valid name"),
    ({"SPLITSTACK_CONVERTER_PROFILE_MIN_SECONDS": "0"}, "PROFILE_MIN_SECONDS"),
    ({"SPLITSTACK_CONVERTER_OPTIMIZATION_LEVEL": "all"}, "OPTIMIZATION_LEVEL"),
    ({"SPLITSTACK_REGISTRY_ADDR": ""}, "SPLITSTACK_REGISTRY_ADDR"),
    ({"SPLITSTACK_CONVERTER_LOAD_TIMEOUT_SECONDS": "0"}, "LOAD_TIMEOUT_SECONDS"),
    ({"SPLITSTACK_CONVERTER_CHILD_TIMEOUT_SECONDS": "-1"}, "CHILD_TIMEOUT_SECONDS"),
    ({"SPLITSTACK_CONVERTER_CHILD_MEMORY_MIB": "-1"}, "CHILD_MEMORY_MIB"),
    ({"SPLITSTACK_CONVERTER_REGISTRY_RETRY_SECONDS": "-1"}, "REGISTRY_RETRY_SECONDS"),
    ({"SPLITSTACK_CONVERTER_ALLOW_PICKLED_PROGRAMS": "maybe"}, "ALLOW_PICKLED_PROGRAMS"),
])
def test_bad_settings_fail_naming_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_converter_settings({**BASE, **env})


def test_targets_are_data(tmp_path: Path) -> None:
    (tmp_path / "edge.toml").write_text(
        'id = "edge"\naccelerator = "CPU"\ncandidate_formats = ["ONNX_FP32"]\nmax_batch = 8\n'
        'selection_metric = { name = "throughput_rows_per_s", batch_size = 8 }\nreplicas_min = 1\nreplicas_max = 2\n')
    settings = load_converter_settings({**BASE, "SPLITSTACK_CONVERTER_TARGET": "edge",
                                        "SPLITSTACK_CONVERTER_TARGETS_DIR": str(tmp_path)})
    target = load_targets(settings)["edge"]
    assert list(target.candidate_formats) == [common.ONNX_FP32] and target.max_batch == 8
    with pytest.raises(ConfigError, match="'nowhere' is not a known target"):
        load_targets(load_converter_settings({**BASE, "SPLITSTACK_CONVERTER_TARGET": "nowhere"}))


@pytest.mark.skipif(tensorrt.environment_problem("Tesla-T4") == "", reason="this machine can build T4 engines")
def test_a_gpu_pool_needs_tensorrt_and_its_gpu() -> None:
    with pytest.raises(ConfigError, match="t4-int8.*cannot be converted on this machine"):
        load_targets(load_converter_settings({**BASE, "SPLITSTACK_CONVERTER_TARGET": "t4-int8"}))
