"""The `splitstack` command line.

Each command group is one `add_*_commands(commands)` function in `splitstack.client.commands`
that adds its subcommands and sets `handler(args, out) -> exit code` on each; `COMMAND_GROUPS`
lists them, and that is the only place a new group is registered. Expected failures — a stack
problem (`StackError`), a service's answer (`PlatformError`: `<service>: <CODE>: <message>`), a
bad argument (`CommandError`, or the SDK's `ValueError`) or a wait that ran out (`TimeoutError`) —
print one `splitstack: error:` line and exit 1, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from rich.console import Console

from splitstack.client.commands.common import CommandError
from splitstack.client.commands.conversion import add_conversion_commands
from splitstack.client.commands.data import add_data_commands
from splitstack.client.commands.demo import add_demo_commands
from splitstack.client.commands.events import add_event_commands
from splitstack.client.commands.inference import add_inference_commands
from splitstack.client.commands.models import add_model_commands
from splitstack.client.commands.promotion import add_promotion_commands
from splitstack.client.commands.stack import add_stack_commands
from splitstack.client.commands.training import add_training_commands
from splitstack.client.deploy import add_deploy_commands
from splitstack.client.sdk import PlatformError
from splitstack.client.stackfile import StackError

CommandGroup = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

COMMAND_GROUPS: tuple[CommandGroup, ...] = (
    add_stack_commands, add_demo_commands, add_data_commands, add_training_commands, add_model_commands,
    add_promotion_commands, add_conversion_commands, add_inference_commands, add_event_commands,
    add_deploy_commands)
# The SDK raises ValueError for bad local input and TimeoutError for waits that ran out; both are
# meant for the user as they are.
EXPECTED_ERRORS = (StackError, PlatformError, CommandError, ValueError, TimeoutError)


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
    except EXPECTED_ERRORS as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"splitstack: error: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:
        Console(stderr=True).print("splitstack: interrupted", markup=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
