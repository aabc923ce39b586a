"""`data publish` and `data list`: dataset versions in the registry."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from splitstack.client.commands.common import (
    CommandError, json_option, key_values, platform_options, plain, print_json, session, when)


def _publish(args: argparse.Namespace, out: Console) -> int:
    source = Path(args.file)
    if not source.is_file():
        raise CommandError(f"{source}: no such file")
    with session(args) as platform:
        version = platform.publish_dataset(args.dataset, source, metadata=key_values(args.metadata, "--metadata"),
                                           idempotency_key=args.idempotency_key or None,
                                           description=args.description)
    if args.json:
        print_json(version)
    else:
        plain(out, f"published {version.dataset} version {version.version}: {version.row_count} rows, "
                   f"{version.size_bytes} bytes, sha256 {version.sha256[:16]}")
    return 0


def _list(args: argparse.Namespace, out: Console) -> int:
    with session(args) as platform:
        rows = platform.dataset_versions(args.dataset) if args.dataset else platform.datasets()
    if args.json:
        print_json(list(rows))
        return 0
    if args.dataset:
        table = Table("version", "rows", "bytes", "sha256", "metadata", "created")
        for v in rows:
            meta = " ".join(f"{k}={val}" for k, val in sorted(v.metadata.items())) or "-"
            table.add_row(str(v.version), str(v.row_count), str(v.size_bytes), v.sha256[:16], meta, when(v.created_at))
    else:
        table = Table("dataset", "latest version", "description", "created")
        for d in rows:
            table.add_row(d.name, str(d.latest_version), d.description or "-", when(d.created_at))
    out.print(table)
    return 0


def add_data_commands(commands: argparse._SubParsersAction) -> None:
    """`data publish DATASET FILE`, `data list [DATASET]`."""
    data = commands.add_parser("data", help="dataset versions (publish, list)")
    sub = data.add_subparsers(title="data commands", metavar="COMMAND", required=True)
    publish = sub.add_parser("publish", parents=[platform_options()],
                             help="publish FILE (.npz with `inputs` and `labels`) as DATASET's next version; "
                                  "announces data.updated")
    publish.add_argument("dataset")
    publish.add_argument("file")
    publish.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    publish.add_argument("--description", default="", help="the dataset's description when it is created")
    publish.add_argument("--idempotency-key", default="", help="a retried publish with this key is stored once")
    json_option(publish)
    publish.set_defaults(handler=_publish)
    listing = sub.add_parser("list", parents=[platform_options()], help="datasets, or one dataset's versions")
    listing.add_argument("dataset", nargs="?")
    json_option(listing)
    listing.set_defaults(handler=_list)
