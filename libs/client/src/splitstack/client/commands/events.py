"""`events tail [SUBJECT...]`: the platform's events as they happen, until Ctrl-C or `--count`."""

from __future__ import annotations

import argparse
import json
import threading
from typing import Any

from rich.console import Console

from splitstack.client.commands.common import CommandError, platform_options, plain, session, to_jsonable

PAYLOAD_CHARS = 240


def _occurred(event: Any) -> str:
    at = event.occurred_at
    return at.isoformat(timespec="milliseconds") if hasattr(at, "isoformat") else str(at)


def event_record(event: Any) -> dict[str, Any]:
    """One event as JSON-ready data."""
    return {"subject": event.subject, "event_id": event.event_id, "producer": event.producer,
            "occurred_at": _occurred(event), "payload": to_jsonable(event.payload)}


def event_line(event: Any) -> str:
    """One event on one line: time, subject, producer, payload (shortened)."""
    payload = json.dumps(to_jsonable(event.payload), separators=(",", ":"))
    if len(payload) > PAYLOAD_CHARS:
        payload = payload[:PAYLOAD_CHARS - 3] + "..."
    return f"{_occurred(event)}  {event.subject}  {event.producer}  {payload}"


def _tail(args: argparse.Namespace, out: Console) -> int:
    if args.count is not None and args.count < 1:
        raise CommandError(f"--count {args.count}: must be at least 1")
    stop = threading.Event()
    seen = 0
    with session(args) as platform:
        try:
            for event in platform.tail_events(tuple(args.subjects) or (">",), since_start=args.since_start, stop=stop):
                if args.json:
                    print(json.dumps(event_record(event)), flush=True)
                else:
                    plain(out, event_line(event))
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
    return 0


def add_event_commands(commands: argparse._SubParsersAction) -> None:
    """`events tail [SUBJECT...]`."""
    events = commands.add_parser("events", help="the platform's NATS events")
    sub = events.add_subparsers(title="events commands", metavar="COMMAND", required=True)
    tail = sub.add_parser("tail", parents=[platform_options()],
                          help="print events as they happen (default every subject) until Ctrl-C")
    tail.add_argument("subjects", nargs="*", metavar="SUBJECT",
                      help="NATS subjects with wildcards, e.g. 'model.promoted.>' (default '>')")
    tail.add_argument("--count", type=int, help="stop after this many events")
    tail.add_argument("--since-start", action="store_true",
                      help="replay the stored (JetStream) events first, then follow")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.set_defaults(handler=_tail)
