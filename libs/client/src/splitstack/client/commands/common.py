"""What every platform command shares: where the platform is, the one CLI error, and output helpers.

A command finds the platform either from the local stack (`--state-dir` / `--stack-file`, or the
environment, or the project root: the addresses `splitstack up` recorded) or from explicit
addresses (`--registry`, `--trainer`, `--converter [TARGET=]ADDR`, `--serving [TARGET=]ADDR`,
`--nats-url`). When any address is given, only the given ones are used (a command that needs
another says which is missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

from splitstack.client.sdk import Platform
from splitstack.client.stackfile import STACK_FILE_ENV, STATE_DIR_ENV

DEFAULT_TARGET = "cpu"


class CommandError(Exception):
    """A bad argument or input file the CLI itself detected; printed as one `splitstack: error:` line."""


def stack_options() -> argparse.ArgumentParser:
    """`--state-dir` and `--stack-file`: where the local stack keeps its state and definition."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--state-dir", help=f"where the stack keeps its state (env {STATE_DIR_ENV}; "
                                             "default: state/ in the project root)")
    options.add_argument("--stack-file", help=f"the stack definition (env {STACK_FILE_ENV}; "
                                              "default: deploy/local/stack.toml in the project root)")
    return options


def platform_options() -> argparse.ArgumentParser:
    """The stack options plus explicit service addresses and the RPC deadline."""
    options = argparse.ArgumentParser(add_help=False, parents=[stack_options()])
    where = options.add_argument_group("platform addresses (default: the local stack's)")
    where.add_argument("--registry", metavar="ADDR", help="registry gRPC address host:port")
    where.add_argument("--trainer", metavar="ADDR", help="trainer gRPC address host:port")
    where.add_argument("--converter", metavar="[TARGET=]ADDR", action="append", default=[],
                       help=f"converter pool address (target {DEFAULT_TARGET} when not named); repeatable")
    where.add_argument("--serving", metavar="[TARGET=]ADDR", action="append", default=[],
                       help=f"serving address (target {DEFAULT_TARGET} when not named); repeatable")
    where.add_argument("--nats-url", metavar="URL", help="NATS URL, for `events tail`")
    where.add_argument("--rpc-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="deadline of each call (default %(default)s)")
    return options


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def targets(values: Iterable[str], flag: str) -> dict[str, str]:
    """`[TARGET=]ADDR` values of a repeatable flag as {target: address}."""
    found: dict[str, str] = {}
    for value in values:
        target, _, address = value.rpartition("=") if "=" in value else (DEFAULT_TARGET, "", value)
        if not target or not address or ":" not in address:
            raise CommandError(f"{flag} {value!r}: expected [TARGET=]HOST:PORT")
        found[target] = address
    return found


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    given = {"registry": args.registry, "trainer": args.trainer, "nats_url": args.nats_url,
             "converters": targets(args.converter, "--converter"), "serving": targets(args.serving, "--serving")}
    return {key: value for key, value in given.items() if value}


def connect(args: argparse.Namespace) -> Platform:
    """The platform at the explicit addresses when any is given, else the local stack's."""
    explicit = _explicit(args)
    if explicit:
        return Platform(**explicit, timeout=args.rpc_timeout)
    return Platform.from_stack(args.state_dir, args.stack_file, timeout=args.rpc_timeout)


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[Platform]:
    """`connect`, closed afterwards."""
    platform = connect(args)
    try:
        yield platform
    finally:
        platform.close()


# --- Output ------------------------------------------------------------------------------------

def plain(out: Console, text: str) -> None:
    """Print text as is: no markup, no highlighting."""
    out.print(text, markup=False, highlight=False)


def message_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as JSON-ready data (proto field names, enums by name, int64 as numbers)."""
    return _int64_as_numbers(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _int64_as_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _int64_as_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int64_as_numbers(v) for v in value]
    if isinstance(value, str) and value.lstrip("-").isdigit() and len(value) < 20:
        return int(value)
    return value


def to_jsonable(value: Any) -> Any:
    """Messages, arrays, mappings and sequences as JSON-ready data."""
    if isinstance(value, Message):
        return message_dict(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def print_json(value: Any) -> None:
    print(json.dumps(to_jsonable(value), indent=2, sort_keys=False))


def show(out: Console, as_json: bool, value: Any, text: str) -> None:
    """`value` as JSON when asked for, else `text` as is."""
    if as_json:
        print_json(value)
    else:
        plain(out, text)


def when(stamp: Timestamp) -> str:
    """A protobuf timestamp as `YYYY-MM-DD HH:MM:SS` UTC, or '-' when unset."""
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return datetime.fromtimestamp(stamp.seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def number(value: float, digits: int = 4) -> str:
    """A metric for a table: up to `digits` significant decimals, '-' for NaN."""
    return "-" if math.isnan(value) else f"{value:.{digits}g}"


def metrics_text(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{name}={number(value)}" for name, value in sorted(metrics.items())) or "-"


def key_values(values: Iterable[str], flag: str) -> dict[str, str]:
    """`KEY=VALUE` values of a repeatable flag."""
    found = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise CommandError(f"{flag} {value!r}: expected KEY=VALUE")
        found[key] = text
    return found
