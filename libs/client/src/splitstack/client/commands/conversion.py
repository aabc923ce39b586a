"""`convert`: ask a target's converter pool for a version's serving artifacts; show gate and profile."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from splitstack.client.commands.common import (
    json_option, number, platform_options, plain, print_json, session, show)
from splitstack.common.v1 import common_pb2
from splitstack.converter.v1 import converter_pb2
from splitstack.registry.v1 import registry_pb2


def point(profile: common_pb2.MeasuredProfile, batch: int = 1) -> common_pb2.LatencyPoint | None:
    """The profile's measurement at `batch` rows, if it has one."""
    return next((p for p in profile.points if p.batch_size == batch), None)


def candidates_table(candidates: Iterable[registry_pb2.Candidate], chosen: str = "") -> Table:
    """Every candidate with its gate verdict and measured profile, in 80 columns; the chosen one marked
    with * (its reason is the serving choice's, printed by `show_choice`)."""
    numbers = [Column(name, no_wrap=True) for name in ("candidate", "gate", "top-1", "accuracy", "Δ", "p50 ms",
                                                        "p99 ms", "rows/s", "MiB")]
    table = Table(*numbers, Column("verdict", overflow="fold", min_width=8), box=None, padding=(0, 1, 0, 0), header_style="bold underline",
                  pad_edge=False, caption="top-1: agreement with the reference outputs; accuracy on the sample; "
                  "latency at batch 1, rows/s at batch 64, MiB: peak memory", caption_justify="left")
    for c in candidates:
        picked = bool(chosen) and c.artifact_sha256 == chosen
        verdict = "chosen" if picked else "accepted" if c.accepted else f"rejected: {c.reason or c.gate.reason}"
        one, big = point(c.profile, 1), point(c.profile, 64)
        gated = bool(c.gate.metric_name)
        table.add_row(common_pb2.ModelFormat.Name(c.format) + (" *" if picked else ""),
                      "[green]passed[/]" if c.gate.passed else "[red]failed[/]", number(c.gate.top1_agreement),
                      number(c.gate.candidate_metric) if gated else "-", f"{c.gate.metric_delta:+.4f}" if gated else "-",
                      number(one.p50_ms, 3) if one else "-", number(one.p99_ms, 3) if one else "-",
                      f"{big.throughput_rows_per_s:,.0f}" if big else "-",
                      f"{c.profile.peak_memory_bytes / 2**20:.1f}" if c.profile.peak_memory_bytes else "-",
                      Text(verdict))
    return table


def show_choice(out: Console, choice: registry_pb2.ServingChoice) -> None:
    """The candidates table and the serving choice with its reason."""
    out.print(candidates_table(choice.candidates, choice.artifact.sha256))
    fmt = common_pb2.ModelFormat.Name(choice.artifact.format)
    plain(out, f"serving choice for {choice.model} version {choice.version} on {choice.target}: {fmt} "
               f"({choice.artifact.sha256[:16]}) - {choice.reason}")


def _convert(args: argparse.Namespace, out: Console) -> int:
    tolerance = None
    if args.max_metric_drop is not None or args.min_top1_agreement is not None:
        tolerance = common_pb2.GateTolerance(max_metric_drop=args.max_metric_drop or 0.0,
                                             min_top1_agreement=args.min_top1_agreement or 0.0)
    with session(args) as platform:
        conversion = platform.convert(args.model, args.version, args.target, tolerance=tolerance)
        state = converter_pb2.ConversionState.Name(conversion.state)
        if args.detach:
            show(out, args.json, conversion, f"conversion {conversion.id}: {state}")
            return 0
        if not args.json:
            plain(out, f"conversion {conversion.id}: {state}; waiting for the serving choice")
        choice = platform.wait_serving_choice(args.model, args.version, args.target, timeout=args.timeout)
    if args.json:
        print_json(choice)
    else:
        show_choice(out, choice)
    return 0


def add_conversion_commands(commands: argparse._SubParsersAction) -> None:
    """`convert MODEL VERSION --target T`."""
    convert = commands.add_parser("convert", parents=[platform_options()],
                                  help="convert a version for a target; waits and shows gate results and profiles")
    convert.add_argument("model")
    convert.add_argument("version", type=int)
    convert.add_argument("--target", default="cpu", help="inference target (default %(default)s)")
    convert.add_argument("--max-metric-drop", type=float, help="gate: accuracy points it may lose (0.01 = 1 point)")
    convert.add_argument("--min-top1-agreement", type=float, help="gate: minimum top-1 agreement with the reference")
    convert.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default %(default)s)")
    convert.add_argument("--detach", action="store_true", help="request and return at once")
    json_option(convert)
    convert.set_defaults(handler=_convert)
