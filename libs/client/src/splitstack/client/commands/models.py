"""`models`, `versions`, `artifacts`, `lineage`: what the registry holds about models."""

from __future__ import annotations

import argparse
from collections import defaultdict

from rich.console import Console
from rich.table import Table
from rich.text import Text

from splitstack.client.commands.common import (
    json_option, metrics_text, number, platform_options, plain, print_json, session, to_jsonable, when)
from splitstack.common.v1 import common_pb2
from splitstack.registry.v1 import registry_pb2


def decision_text(version: registry_pb2.ModelVersion) -> str:
    """The promotion policy's decision on a version, or '-' while there is none."""
    if not version.HasField("promotion"):
        return "-"
    decision = version.promotion
    outcome = registry_pb2.PromotionDecision.Outcome.Name(decision.outcome)
    return f"{outcome}: {decision.reason}" if decision.reason else outcome


def choices_text(version: registry_pb2.ModelVersion) -> str:
    return " ".join(f"{c.target}:{common_pb2.ModelFormat.Name(c.artifact.format)}"
                    for c in version.serving_choices) or "-"


def primary_text(lineage: registry_pb2.Lineage) -> str:
    name = lineage.primary_metric.name
    return f"{name}={number(lineage.primary_metric_value)}" if name else "-"


def _models(args: argparse.Namespace, out: Console) -> int:
    with session(args) as platform:
        models = list(platform.models())
        aliases = {m.name: list(platform.aliases(m.name)) for m in models}
    if args.json:
        print_json([{**to_jsonable(m), "aliases": to_jsonable(aliases[m.name])} for m in models])
        return 0
    table = Table("model", "required targets", "primary metric", "promotion", "aliases", "created")
    for m in models:
        mode = registry_pb2.PromotionPolicy.Mode.Name(m.promotion_policy.mode)
        named = " ".join(f"{a.alias}->{a.version}" for a in aliases[m.name]) or "-"
        table.add_row(m.name, ",".join(m.required_targets) or "-", m.primary_metric.name or "-", mode, named,
                      when(m.created_at))
    out.print(table)
    return 0


def _versions(args: argparse.Namespace, out: Console) -> int:
    with session(args) as platform:
        versions = list(platform.versions(args.model))
        aliases = list(platform.aliases(args.model))
    if args.json:
        print_json({"versions": versions, "aliases": aliases})
        return 0
    named: dict[int, list[str]] = defaultdict(list)
    for alias in aliases:
        named[alias.version].append(alias.alias)
    table = Table("version", "state", "dataset", "primary", "metrics", "serving", "aliases", "promotion decision")
    for v in versions:
        dataset = f"{v.lineage.dataset}@{v.lineage.dataset_version}" if v.lineage.dataset else "-"
        table.add_row(str(v.version), registry_pb2.VersionState.Name(v.state), dataset, primary_text(v.lineage),
                      metrics_text(v.lineage.metrics), choices_text(v), ",".join(named[v.version]) or "-",
                      Text(decision_text(v)))
    out.print(table)
    return 0


def _artifacts(args: argparse.Namespace, out: Console) -> int:
    with session(args) as platform:
        artifacts = list(platform.artifacts(args.model, args.version))
    if args.json:
        print_json(artifacts)
        return 0
    table = Table("kind", "precision", "target", "format", "bytes", "sha256", "gate", "p50 ms (batch 1)")
    for a in artifacts:
        gate = "-" if not a.HasField("gate") else ("passed" if a.gate.passed else "failed")
        p50 = next((number(p.p50_ms) for p in a.profile.points if p.batch_size == 1), "-")
        fmt = common_pb2.ModelFormat.Name(a.format) if a.format else "-"
        table.add_row(common_pb2.ArtifactKind.Name(a.kind), common_pb2.Precision.Name(a.precision).removeprefix(
            "PRECISION_"), a.target or "-", fmt, str(a.size_bytes), a.sha256[:16], gate, p50)
    out.print(table)
    return 0


def _lineage_lines(answer: registry_pb2.GetLineageResponse) -> list[str]:
    v, lineage = answer.version, answer.version.lineage
    dataset = answer.dataset_version
    lines = [f"{v.model} version {v.version} ({registry_pb2.VersionState.Name(v.state)})",
             f"  training job      {lineage.training_job or '-'}",
             f"  dataset           {lineage.dataset}@{lineage.dataset_version} ({dataset.row_count} rows, "
             f"sha256 {lineage.dataset_digest[:16]})",
             f"  profile           {lineage.training_profile.name or '-'} ({lineage.training_profile.precision})",
             f"  hyperparameters   {' '.join(f'{k}={x}' for k, x in sorted(lineage.hyperparameters.items())) or '-'}",
             f"  metrics           {metrics_text(lineage.metrics)}",
             f"  primary metric    {primary_text(lineage)}",
             f"  code version      {lineage.code_version or '-'}",
             f"  serving choices   {choices_text(v)}",
             f"  aliases           {' '.join(a.alias for a in answer.aliases) or '-'}",
             f"  promotion         {decision_text(v)}"]
    lines += [f"  parent            version {a.version} ({primary_text(a.lineage)}, "
              f"{a.lineage.dataset}@{a.lineage.dataset_version})" for a in answer.ancestors]
    return lines


def _lineage(args: argparse.Namespace, out: Console) -> int:
    with session(args) as platform:
        answer = platform.lineage(args.model, args.version)
    if args.json:
        print_json(answer)
    else:
        for line in _lineage_lines(answer):
            plain(out, line)
    return 0


def add_model_commands(commands: argparse._SubParsersAction) -> None:
    """`models`, `versions MODEL`, `artifacts MODEL VERSION`, `lineage MODEL VERSION`."""
    models = commands.add_parser("models", parents=[platform_options()], help="registered models and their aliases")
    json_option(models)
    models.set_defaults(handler=_models)
    versions = commands.add_parser("versions", parents=[platform_options()],
                                   help="a model's versions: metrics, serving choices, aliases, promotion decision")
    versions.add_argument("model")
    json_option(versions)
    versions.set_defaults(handler=_versions)
    for name, handler, text in (("artifacts", _artifacts, "a version's artifacts with gate results and profiles"),
                                ("lineage", _lineage, "where a version came from")):
        command = commands.add_parser(name, parents=[platform_options()], help=text)
        command.add_argument("model")
        command.add_argument("version", type=int)
        json_option(command)
        command.set_defaults(handler=handler)
