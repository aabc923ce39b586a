"""`demo`: the whole platform end to end on this machine (what `make demo` runs)."""

from __future__ import annotations

import argparse
from rich.console import Console

from splitstack.client.commands.common import stack_options
from splitstack.client.demo import run_demo
from splitstack.client.stackfile import locate


def _demo(args: argparse.Namespace, out: Console) -> int:
    paths = locate(args.state_dir, args.stack_file)
    state_dir = paths.state_dir if args.state_dir else paths.state_dir / "demo"
    summary = run_demo(out, state_dir, paths.require_stack_file())
    return 0 if summary.swap_failures == 0 else 1


def add_demo_commands(commands: argparse._SubParsersAction) -> None:
    """`demo [--state-dir DIR]`."""
    demo = commands.add_parser(
        "demo", parents=[stack_options()],
        help="run the platform end to end on its own local stack (state/demo, wiped first): data, training, "
             "conversion, promotion, serving, retraining on new data, hot swap under load; a measured summary")
    demo.set_defaults(handler=_demo)
