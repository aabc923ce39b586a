"""`up`, `down`, `status`: the embedded stack (NATS + every installed service) on this machine."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict

from rich.console import Console
from rich.table import Table
from rich.text import Text

from splitstack.client import stack
from splitstack.client.commands.common import stack_options
from splitstack.client.stackfile import StackPaths, locate


def _paths(args: argparse.Namespace) -> StackPaths:
    return locate(args.state_dir, args.stack_file)


def _printer(out: Console) -> Callable[[str], None]:
    return lambda line: out.print(line, markup=False, highlight=False)


def _up(args: argparse.Namespace, out: Console) -> int:
    only = [name for value in args.only for name in value.split(",") if name] if args.only else None
    stack.up(_paths(args), report=_printer(out), only=only)
    return 0


def _down(args: argparse.Namespace, out: Console) -> int:
    stack.down(_paths(args), report=_printer(out), stop_timeout=args.timeout)
    return 0


def _status_table(report: stack.StackStatus) -> Table:
    table = Table("component", "pid", "address", "health", "detail")
    for row in report.components:
        health = ("[green]healthy[/]" if row.health.healthy
                  else "[red]down[/]" if row.pid is None else "[red]unhealthy[/]")
        table.add_row(row.name, str(row.pid or "-"), row.address, health, Text(row.health.detail))
    for name, reason in report.skipped.items():
        table.add_row(name, "-", "-", "[dim]skipped[/]", Text(reason))
    return table


def _status(args: argparse.Namespace, out: Console) -> int:
    paths = _paths(args)
    report = stack.status(paths, timeout=args.timeout)
    if args.json:
        rows = [{**asdict(c), "health": c.health.healthy, "detail": c.health.detail} for c in report.components]
        print(json.dumps({"healthy": report.healthy, "nats_url": report.nats_url, "state_dir": str(paths.state_dir),
                          "components": rows, "skipped": report.skipped}, indent=2))
    elif not report.components:
        out.print(f"the stack is not up (nothing recorded in {paths.stack_json})", markup=False, highlight=False)
    else:
        out.print(_status_table(report))
        out.print("all healthy" if report.healthy else "[red]something is down[/]")
    return 0 if report.healthy else 1


def add_stack_commands(commands: argparse._SubParsersAction) -> None:
    """`up`, `down`, `status`: the embedded stack (NATS + every installed service) on this machine."""
    options = stack_options()
    up = commands.add_parser("up", parents=[options], help="start NATS and every installed service (idempotent)")
    up.add_argument("--only", action="append", metavar="SERVICE[,SERVICE]",
                    help="start only these services and what they depend on; the others keep running or stay down")
    up.set_defaults(handler=_up)
    down = commands.add_parser("down", parents=[options], help="stop everything the stack started")
    down.add_argument("--timeout", type=float, default=stack.STOP_TIMEOUT_SECONDS,
                      help="seconds to wait after SIGTERM before SIGKILL (default %(default)s)")
    down.set_defaults(handler=_down)
    status = commands.add_parser("status", parents=[options],
                                 help="health of every component; exits 1 when something is down")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds per health check (default %(default)s)")
    status.set_defaults(handler=_status)
