"""The `splitstack` command line.

Each command group is one `add_*_commands(commands)` function that adds its subcommands and sets
`handler(args, out) -> exit code` on each; `COMMAND_GROUPS` lists them, and that is the only
place a new group is registered. Expected failures (`StackError`) print one `splitstack: error:`
message and exit 1, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict

from rich.console import Console
from rich.table import Table
from rich.text import Text

from splitstack.client import stack
from splitstack.client.stackfile import STACK_FILE_ENV, STATE_DIR_ENV, StackError, StackPaths, locate

CommandGroup = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# --- up / down / status: the local stack ----------------------------------------------------------

def _stack_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--state-dir", help=f"where the stack keeps its state (env {STATE_DIR_ENV}; "
                                             "default: state/ in the project root)")
    options.add_argument("--stack-file", help=f"the stack definition (env {STACK_FILE_ENV}; "
                                              "default: deploy/local/stack.toml in the project root)")
    return options


def _paths(args: argparse.Namespace) -> StackPaths:
    return locate(args.state_dir, args.stack_file)


def _printer(out: Console) -> Callable[[str], None]:
    return lambda line: out.print(line, markup=False, highlight=False)


def _up(args: argparse.Namespace, out: Console) -> int:
    stack.up(_paths(args), report=_printer(out))
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
    options = _stack_options()
    up = commands.add_parser("up", parents=[options], help="start NATS and every installed service (idempotent)")
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


# --- Registration ---------------------------------------------------------------------------------

COMMAND_GROUPS: tuple[CommandGroup, ...] = (add_stack_commands,)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command group registered."""
    parser = argparse.ArgumentParser(prog="splitstack", description="splitstack: train, convert, register, serve.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add_group in COMMAND_GROUPS:
        add_group(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `splitstack` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="splitstack: %(message)s")
    try:
        return args.handler(args, Console(highlight=False, soft_wrap=True))
    except StackError as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"splitstack: error: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
