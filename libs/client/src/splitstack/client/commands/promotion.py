"""`promote`, `rollback`, `aliases`: moving a model's aliases, which serving follows."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table
from rich.text import Text

from splitstack.client.commands.common import json_option, platform_options, plain, print_json, session, when


def _promote(args: argparse.Namespace, out: Console) -> int:
    with session(args) as platform:
        alias = platform.promote(args.model, args.version, args.alias, reason=args.reason, actor=args.actor)
    if args.json:
        print_json(alias)
    else:
        plain(out, f"{alias.model}: {alias.alias} -> version {alias.version} ({alias.reason})")
    return 0


def _rollback(args: argparse.Namespace, out: Console) -> int:
    with session(args) as platform:
        alias = platform.rollback(args.model, args.alias, reason=args.reason, actor=args.actor)
    if args.json:
        print_json(alias)
    else:
        plain(out, f"{alias.model}: {alias.alias} rolled back to version {alias.version} ({alias.reason})")
    return 0


def _aliases(args: argparse.Namespace, out: Console) -> int:
    with session(args) as platform:
        rows = list(platform.alias_history(args.model, args.alias or "") if args.history
                    else platform.aliases(args.model))
    if args.json:
        print_json(rows)
        return 0
    if args.history:
        table = Table("alias", "from", "to", "actor", "reason", "at")
        for m in rows:
            table.add_row(m.alias, str(m.from_version or "-"), str(m.to_version or "-"), m.actor or "-",
                          Text(m.reason or "-"), when(m.at))
    else:
        table = Table("alias", "version", "actor", "reason", "updated")
        for a in rows:
            table.add_row(a.alias, str(a.version), a.actor or "-", Text(a.reason or "-"), when(a.updated_at))
    out.print(table)
    return 0


def add_promotion_commands(commands: argparse._SubParsersAction) -> None:
    """`promote MODEL VERSION`, `rollback MODEL`, `aliases MODEL`."""
    promote = commands.add_parser("promote", parents=[platform_options()],
                                  help="point an alias (default production) at a version; serving follows")
    promote.add_argument("model")
    promote.add_argument("version", type=int)
    rollback = commands.add_parser("rollback", parents=[platform_options()],
                                   help="move an alias back to the version it named before its last move")
    rollback.add_argument("model")
    for command, handler in ((promote, _promote), (rollback, _rollback)):
        command.add_argument("--alias", default="production", help="default %(default)s")
        command.add_argument("--reason", required=True, help="why (recorded in the alias history)")
        command.add_argument("--actor", help="who (default: the SDK's, user@host)")
        json_option(command)
        command.set_defaults(handler=handler)
    aliases = commands.add_parser("aliases", parents=[platform_options()], help="a model's aliases or their history")
    aliases.add_argument("model")
    aliases.add_argument("--history", action="store_true", help="every move, oldest first")
    aliases.add_argument("--alias", help="with --history: only this alias")
    json_option(aliases)
    aliases.set_defaults(handler=_aliases)
