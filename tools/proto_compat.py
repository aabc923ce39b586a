"""Contracts only grow: compare proto/ against the committed descriptor snapshot.

    python tools/proto_compat.py check      # fail on a breaking change (make test runs this)
    python tools/proto_compat.py snapshot   # record the current contracts (after a compatible change)

Breaking: a message, enum, service or method removed; a field removed, renumbered or retyped
(type, label, message/enum type); an enum value removed or renumbered; a method's request or
response type or streaming kind changed. Adding is always allowed.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "proto" / "descriptor_snapshot.json"


def build_descriptor_set(proto_root: Path) -> descriptor_pb2.FileDescriptorSet:
    """Compile every .proto under `proto_root` into one FileDescriptorSet (no imports of google/*)."""
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--descriptor_set_out={out}", *files])
        if code != 0:
            raise SystemExit(f"protoc failed ({code}) compiling {proto_root}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _messages(prefix: str, messages, out: dict) -> None:
    for msg in messages:
        name = f"{prefix}.{msg.name}"
        out["messages"][name] = {
            f.name: {"number": f.number, "type": f.type, "label": f.label, "type_name": f.type_name}
            for f in msg.field
        }
        _enums(name, msg.enum_type, out)
        _messages(name, msg.nested_type, out)


def _enums(prefix: str, enums, out: dict) -> None:
    for enum in enums:
        out["enums"][f"{prefix}.{enum.name}"] = {v.name: v.number for v in enum.value}


def summarize(fds: descriptor_pb2.FileDescriptorSet) -> dict:
    """A stable, JSON-able summary of every message, enum and service."""
    out: dict = {"messages": {}, "enums": {}, "services": {}}
    for file in fds.file:
        prefix = f".{file.package}" if file.package else ""
        _messages(prefix, file.message_type, out)
        _enums(prefix, file.enum_type, out)
        for svc in file.service:
            out["services"][f"{prefix}.{svc.name}"] = {
                m.name: {"input": m.input_type, "output": m.output_type,
                         "client_streaming": m.client_streaming, "server_streaming": m.server_streaming}
                for m in svc.method
            }
    return out


def breaking_changes(old: dict, new: dict) -> list[str]:
    """Every way `new` breaks clients of `old` (empty when it only grew)."""
    problems: list[str] = []
    for kind in ("messages", "enums", "services"):
        for name, old_items in old[kind].items():
            if name not in new[kind]:
                problems.append(f"{kind[:-1]} {name} was removed")
                continue
            for item, old_value in old_items.items():
                new_value = new[kind][name].get(item)
                if new_value is None:
                    problems.append(f"{name}.{item} was removed")
                elif new_value != old_value:
                    problems.append(f"{name}.{item} changed: {old_value} -> {new_value}")
    for name, fields in new["messages"].items():
        old_fields = old["messages"].get(name, {})
        old_numbers = {v["number"]: k for k, v in old_fields.items()}
        for field, spec in fields.items():
            previous = old_numbers.get(spec["number"])
            if field not in old_fields and previous is not None:
                problems.append(f"{name}.{field} reuses number {spec['number']} of removed field {previous}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("check", "snapshot"):
        print(__doc__)
        return 2
    current = summarize(build_descriptor_set(ROOT / "proto"))
    if argv[1] == "snapshot":
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        print(f"proto-compat: snapshot written to {SNAPSHOT.relative_to(ROOT)}")
        return 0
    if not SNAPSHOT.exists():
        print(f"proto-compat: {SNAPSHOT.relative_to(ROOT)} is missing; run `make proto-snapshot` and commit it")
        return 1
    problems = breaking_changes(json.loads(SNAPSHOT.read_text()), current)
    if problems:
        print("proto-compat: BREAKING contract changes (contracts may only grow):")
        print("\n".join(f"  - {p}" for p in problems))
        return 1
    grown = current != json.loads(SNAPSHOT.read_text())
    print("proto-compat: contracts are compatible" + (" (they grew: run `make proto-snapshot`)" if grown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
