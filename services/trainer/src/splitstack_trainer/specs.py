"""Judging a JobSpec before anything runs: names, code, hyperparameters, profile and executor.

`plan_job` turns a submitted spec into a `TrainingPlan` or raises `InvalidArgument` naming the
problem: an unknown recipe, an import path that is malformed or outside the operator's allow-list
(usercode.py: refused before anything is imported), an import path that does not import, a class
that is not a `LightningModule` / `LightningDataModule`, hyperparameters neither class takes (or of
the wrong type, or refused by the class's own `check_hyperparameters`), an unknown profile or a
`profile_override` past the operator's limits (overrides.py), an executor this trainer does not run.
The cheap checks come first; the code is checked last. The built-in recipes are imported here (the
trainer's own code); any other allowed module only in a short-lived child process
(usercode.CodeChecker), never in the trainer. Classes are never instantiated: that happens in the
job process. The dataset version is checked against the registry by the core, which owns the
registry client.

The same hyperparameter binding (`bind_hyperparameters`) runs in the trainer (built-in recipes) and
in the checking child (any other code), so a spec that passed builds in the job process with
exactly these arguments.
"""

from __future__ import annotations

import importlib
import inspect
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from splitstack.chassis.errors import FailedPrecondition, InvalidArgument
from splitstack.common.v1 import common_pb2
from splitstack.contracts import handoff
from splitstack.contracts.names import InvalidName, check_name
from splitstack.registry.v1 import registry_pb2
from splitstack.trainer.v1 import trainer_pb2 as pb
from splitstack_trainer.overrides import OverrideLimits, check_override
from splitstack_trainer.recipes import RECIPES
from splitstack_trainer.usercode import CodeChecker, split_import_path

# Arguments the trainer itself gives every data module; hyperparameters may not set them.
DATAMODULE_ARGUMENTS = ("dataset_path", "batch_size")


@dataclass(frozen=True)
class TrainingPlan:
    """A checked spec with every default filled in: what the job process will run."""

    model: str
    recipe: str
    module: str
    datamodule: str
    module_hparams: dict[str, Any]
    datamodule_hparams: dict[str, Any]
    profile: common_pb2.TrainingProfile
    executor: str
    max_epochs: int
    seed: int
    dataset: str
    dataset_version: int                 # 0: the latest, resolved by the core
    required_targets: list[str]
    promotion_policy: registry_pb2.PromotionPolicy | None
    primary_metric: common_pb2.PrimaryMetric
    parent_version: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)   # as submitted (after coercion)


@dataclass(frozen=True)
class PlanDefaults:
    """What a spec leaves unset, and what this trainer can run."""

    profiles: Mapping[str, common_pb2.TrainingProfile]
    profile: str
    executor: str
    executors: tuple[str, ...]           # the executors configured here
    max_epochs: int
    required_targets: tuple[str, ...]
    gpu_available: bool
    code: CodeChecker = field(default_factory=CodeChecker)                 # allow-list + checking child
    override_limits: OverrideLimits = field(default_factory=OverrideLimits)


def plan_job(spec: pb.JobSpec, defaults: PlanDefaults, *, need_dataset: bool = True) -> TrainingPlan:
    """Check `spec` and fill its defaults; InvalidArgument (or FailedPrecondition) naming the problem."""
    _check_names(spec, need_dataset)
    module_path, datamodule_path, recipe_defaults = _code_of(spec)
    defaults.code.ensure_allowed("module", module_path)          # before anything is imported
    defaults.code.ensure_allowed("datamodule", datamodule_path)
    profile = _profile_of(spec, defaults)
    executor = spec.executor or defaults.executor
    if executor not in defaults.executors:
        raise InvalidArgument(f"executor {executor!r} is not available on this trainer "
                              f"(available: {', '.join(defaults.executors)})")
    if executor == "local" and profile.accelerator == common_pb2.GPU and not defaults.gpu_available:
        raise FailedPrecondition(f"profile {profile.name!r} needs a GPU and this trainer's machine has none; "
                                 "use the kubernetes executor or a CPU profile")
    if spec.max_epochs < 0:
        raise InvalidArgument(f"max_epochs must be >= 0 (0 = the default), got {spec.max_epochs}")
    if spec.dataset_version < 0:
        raise InvalidArgument(f"dataset_version must be >= 0 (0 = the latest), got {spec.dataset_version}")
    if spec.parent_version < 0:
        raise InvalidArgument(f"parent_version must be >= 0, got {spec.parent_version}")
    given = {**recipe_defaults, **json_format.MessageToDict(spec.hyperparameters)}
    module_kw, datamodule_kw = _bound_hyperparameters(module_path, datamodule_path, given, defaults.code)
    return TrainingPlan(
        model=spec.model, recipe=spec.recipe, module=module_path, datamodule=datamodule_path,
        module_hparams=module_kw, datamodule_hparams=datamodule_kw, profile=profile, executor=executor,
        max_epochs=spec.max_epochs or defaults.max_epochs, seed=spec.seed, dataset=spec.dataset,
        dataset_version=spec.dataset_version,
        required_targets=list(spec.required_targets) or list(defaults.required_targets),
        promotion_policy=_policy_of(spec), primary_metric=_primary_metric_of(spec),
        parent_version=spec.parent_version, hyperparameters={**module_kw, **datamodule_kw})


def _check_names(spec: pb.JobSpec, need_dataset: bool) -> None:
    try:
        check_name("model", spec.model)
        if need_dataset or spec.dataset:
            check_name("dataset", spec.dataset)
        seen: set[str] = set()
        for target in spec.required_targets:
            check_name("required_targets", target)
            if target in seen:
                raise InvalidArgument(f"required_targets: {target!r} is listed twice")
            seen.add(target)
    except InvalidName as exc:
        raise InvalidArgument(str(exc)) from None


def _code_of(spec: pb.JobSpec) -> tuple[str, str, dict[str, Any]]:
    """(module path, datamodule path, recipe defaults) from a recipe or explicit import paths."""
    if spec.recipe:
        if spec.module or spec.datamodule:
            raise InvalidArgument("set either recipe or module + datamodule, not both")
        recipe = RECIPES.get(spec.recipe)
        if recipe is None:
            raise InvalidArgument(f"recipe {spec.recipe!r} is unknown (known: {', '.join(sorted(RECIPES))})")
        return recipe.module, recipe.datamodule, dict(recipe.defaults)
    if not spec.module or not spec.datamodule:
        raise InvalidArgument("a job needs a recipe, or both module and datamodule import paths "
                              "(package.module:Class)")
    return spec.module, spec.datamodule, {}


def _bound_hyperparameters(module_path: str, datamodule_path: str, given: dict[str, Any],
                           code: CodeChecker) -> tuple[dict[str, Any], dict[str, Any]]:
    """Built-in recipes: imported and bound here. Any other (allowed) code: in the checking child."""
    if code.is_builtin(module_path) and code.is_builtin(datamodule_path):
        module_cls = load_class("module", module_path, "lightning.pytorch:LightningModule")
        datamodule_cls = load_class("datamodule", datamodule_path, "lightning.pytorch:LightningDataModule")
        return _bind_or_reject(given, module_cls, datamodule_cls)
    return code.check_in_child(module_path, datamodule_path, given)


def load_class(field_name: str, path: str, base_path: str) -> type:
    """Import `package.module:Class` and check it subclasses `base_path`; InvalidArgument otherwise.
    Only the job process, the checking child and (for built-in recipes) the trainer call this."""
    module_name, qualname = split_import_path(field_name, path)
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except ImportError as exc:
        raise InvalidArgument(f"{field_name} {path!r} cannot be imported: {exc}") from None
    except AttributeError:
        raise InvalidArgument(f"{field_name} {path!r}: module {module_name!r} has no {qualname!r}") from None
    except Exception as exc:  # noqa: BLE001 - user code failing at import time
        raise InvalidArgument(f"{field_name} {path!r} failed to import: {type(exc).__name__}: {exc}") from None
    base_module, _, base_name = base_path.partition(":")
    base = getattr(importlib.import_module(base_module), base_name)
    if not (inspect.isclass(target) and issubclass(target, base)):
        raise InvalidArgument(f"{field_name} {path!r} is not a {base_name} subclass")
    return target


def _bind_or_reject(given: dict[str, Any], module_cls: type, datamodule_cls: type) -> tuple[dict, dict]:
    try:
        return bind_hyperparameters(given, module_cls, datamodule_cls)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"hyperparameters: {exc}") from None


def bind_hyperparameters(given: Mapping[str, Any], module_cls: type,
                         datamodule_cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `given` between the module's and the data module's constructors, coerced to their
    annotated types and checked by their `check_hyperparameters`; ValueError/TypeError on a problem."""
    module_params = _parameters(module_cls)
    datamodule_params = _parameters(datamodule_cls)
    module_kw: dict[str, Any] = {}
    datamodule_kw: dict[str, Any] = {}
    for name, value in given.items():
        if name in DATAMODULE_ARGUMENTS:
            raise ValueError(f"{name!r} is given by the trainer (the dataset version and the training "
                             "profile's batch size), not a hyperparameter; use profile_override for another batch size")
        in_module, in_datamodule = _accepts(module_params, name), _accepts(datamodule_params, name)
        if not in_module and not in_datamodule:
            raise ValueError(f"{name!r} is not a parameter of {module_cls.__name__} "
                             f"({_names(module_params)}) or {datamodule_cls.__name__} ({_names(datamodule_params)})")
        if in_module:
            module_kw[name] = _coerce(module_cls, module_params, name, value)
        if in_datamodule:
            datamodule_kw[name] = _coerce(datamodule_cls, datamodule_params, name, value)
    _require(module_cls, module_params, module_kw, ())
    _require(datamodule_cls, datamodule_params, datamodule_kw, DATAMODULE_ARGUMENTS)
    _class_check(module_cls, module_kw)
    _class_check(datamodule_cls, datamodule_kw)
    return module_kw, datamodule_kw


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls).parameters
    return dict(params)


def _names(params: dict[str, inspect.Parameter]) -> str:
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
             and n not in DATAMODULE_ARGUMENTS]
    return "takes " + (", ".join(named) if named else "nothing")


def _accepts(params: dict[str, inspect.Parameter], name: str) -> bool:
    """Named explicitly; a **kwargs catch-all accepts only what no named parameter claims."""
    if name in params:
        return params[name].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)
    return any(p.kind == p.VAR_KEYWORD for p in params.values())


def _coerce(cls: type, params: dict[str, inspect.Parameter], name: str, value: Any) -> Any:
    """`value` as the annotated type when that is int, float, bool or str (JSON numbers are floats)."""
    if name not in params:
        return value
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: take the value as it is
        hints = {}
    kind = hints.get(name)
    where = f"{cls.__name__}.{name}"
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise TypeError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise TypeError(f"{where} must be a string, got {value!r}")
    return value


def _require(cls: type, params: dict[str, inspect.Parameter], given: dict[str, Any], supplied: tuple) -> None:
    for name, param in params.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in supplied:
            continue
        if param.default is param.empty and name not in given:
            raise ValueError(f"{cls.__name__} needs the hyperparameter {name!r}")
    if supplied and not all(_accepts(params, name) for name in supplied):
        raise ValueError(f"{cls.__name__} must accept {', '.join(supplied)} (given by the trainer)")


def _class_check(cls: type, kwargs: dict[str, Any]) -> None:
    check = getattr(cls, "check_hyperparameters", None)
    if callable(check):
        check(**kwargs)


def _profile_of(spec: pb.JobSpec, defaults: PlanDefaults) -> common_pb2.TrainingProfile:
    if spec.HasField("profile_override"):
        return check_override(spec.profile_override, defaults.override_limits, defaults.profiles)
    name = spec.profile or defaults.profile
    profile = defaults.profiles.get(name)
    if profile is None:
        raise InvalidArgument(f"profile {name!r} is unknown (known: {', '.join(sorted(defaults.profiles))})")
    return profile


def _policy_of(spec: pb.JobSpec) -> registry_pb2.PromotionPolicy | None:
    if not spec.HasField("promotion_policy"):
        return None
    policy = spec.promotion_policy
    modes = (registry_pb2.PromotionPolicy.MANUAL, registry_pb2.PromotionPolicy.AUTO)
    if policy.mode not in modes:
        raise InvalidArgument("promotion_policy.mode must be MANUAL or AUTO")
    if policy.mode == registry_pb2.PromotionPolicy.AUTO and (not policy.metric or not policy.direction):
        raise InvalidArgument("promotion_policy: an AUTO policy names its metric and direction")
    if not math.isfinite(policy.margin) or policy.margin < 0:
        raise InvalidArgument(f"promotion_policy.margin must be a finite number >= 0, got {policy.margin}")
    return policy


def _primary_metric_of(spec: pb.JobSpec) -> common_pb2.PrimaryMetric:
    metric = spec.primary_metric
    if not metric.name:
        if metric.direction:
            raise InvalidArgument("primary_metric.name must be set when primary_metric.direction is")
        return handoff.DEFAULT_PRIMARY_METRIC
    if metric.direction not in (common_pb2.MAXIMIZE, common_pb2.MINIMIZE):
        raise InvalidArgument("primary_metric.direction must be MAXIMIZE or MINIMIZE")
    return metric
