"""Normalized, JSON-able summaries of protobuf file descriptors, and their comparison.

Used by test_inference_wire.py on both sides of a process boundary: tritonclient's and our
generated ``inference`` stubs register the same symbols in protobuf's default descriptor
pool, so they cannot be imported into one process. This module therefore imports neither at
module level. Run as a script with ``--triton`` it imports tritonclient's stubs and prints
their summary as JSON on stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import descriptor_pb2

Summary = dict[str, dict[str, Any]]

TRITON_MODULES = ("tritonclient.grpc.model_config_pb2", "tritonclient.grpc.service_pb2")
EXIT_NO_TRITON = 3

_FDP = descriptor_pb2.FieldDescriptorProto


def _file_proto(file_descriptor: Any) -> descriptor_pb2.FileDescriptorProto:
    """Copy a (python) FileDescriptor into its FileDescriptorProto form."""
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    return proto


def _enum_summary(enum: descriptor_pb2.EnumDescriptorProto, syntax: str) -> dict[str, Any]:
    """Value name -> number of one enum, plus the file syntax (open/closed semantics)."""
    return {"syntax": syntax, "values": {v.name: v.number for v in enum.value}}


def _field_summary(field: _FDP, oneofs: list[str]) -> dict[str, Any]:
    """Everything about a field that affects the wire format or the generated API."""
    in_oneof = field.HasField("oneof_index")
    return {
        "number": field.number,
        "type": _FDP.Type.Name(field.type),
        "label": _FDP.Label.Name(field.label),
        "type_name": field.type_name,
        "oneof": oneofs[field.oneof_index] if in_oneof else None,
        "proto3_optional": field.proto3_optional,
        "options": field.options.SerializeToString(deterministic=True).hex(),
    }


def _message_summary(msg: descriptor_pb2.DescriptorProto, syntax: str) -> dict[str, Any]:
    """Fields, oneofs, nested type names and map-entry flag of one message (not recursive)."""
    oneofs = [o.name for o in msg.oneof_decl]
    return {
        "syntax": syntax,
        "map_entry": msg.options.map_entry,
        "oneofs": oneofs,
        "fields": {f.name: _field_summary(f, oneofs) for f in msg.field},
        "nested_messages": sorted(m.name for m in msg.nested_type),
        "nested_enums": sorted(e.name for e in msg.enum_type),
    }


def _walk_message(
    msg: descriptor_pb2.DescriptorProto, prefix: str, syntax: str, out: Summary
) -> None:
    """Add a message, its nested messages and nested enums to ``out`` by full name."""
    full = f"{prefix}.{msg.name}"
    out["messages"][full] = _message_summary(msg, syntax)
    for enum in msg.enum_type:
        out["enums"][f"{full}.{enum.name}"] = _enum_summary(enum, syntax)
    for nested in msg.nested_type:
        _walk_message(nested, full, syntax, out)


def _add_services(proto: descriptor_pb2.FileDescriptorProto, out: Summary) -> None:
    """Add every method of every service as ``pkg.Service/Method``."""
    for service in proto.service:
        for method in service.method:
            out["methods"][f"{proto.package}.{service.name}/{method.name}"] = {
                "input_type": method.input_type,
                "output_type": method.output_type,
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
            }


def summarize(file_descriptors: Iterable[Any]) -> Summary:
    """Summary {messages, enums, methods} keyed by full name, of the given FileDescriptors."""
    out: Summary = {"messages": {}, "enums": {}, "methods": {}}
    for file_descriptor in file_descriptors:
        proto = _file_proto(file_descriptor)
        syntax = proto.syntax or "proto2"
        for enum in proto.enum_type:
            out["enums"][f"{proto.package}.{enum.name}"] = _enum_summary(enum, syntax)
        for msg in proto.message_type:
            _walk_message(msg, proto.package, syntax, out)
        _add_services(proto, out)
    return out


def _diff(ours: Any, theirs: Any, path: str) -> list[str]:
    """Leaf-level differences between two JSON-like values, as ``path: ours X != ...``."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        problems: list[str] = []
        for key in sorted(set(ours) | set(theirs)):
            where = f"{path}.{key}" if path else str(key)
            if key not in theirs:
                problems.append(f"{where}: only ours has it")
            elif key not in ours:
                problems.append(f"{where}: only the reference has it")
            else:
                problems.extend(_diff(ours[key], theirs[key], where))
        return problems
    return [] if ours == theirs else [f"{path}: ours {ours!r} != reference {theirs!r}"]


def compare(
    ours: Mapping[str, Mapping[str, Any]], theirs: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Describe every item of ``ours`` that is missing from ``theirs`` or differs from it."""
    problems: list[str] = []
    for kind, items in ours.items():
        reference = theirs.get(kind, {})
        for name, item in items.items():
            if name not in reference:
                problems.append(f"{kind[:-1]} {name}: not declared by the reference")
            else:
                diffs = _diff(item, reference[name], "")
                problems.extend(f"{kind[:-1]} {name}: {diff}" for diff in diffs)
    return problems


def _referenced_types(summary: Summary, name: str) -> list[str]:
    """Full names of the types a message's fields use, and of its nested types."""
    msg = summary["messages"].get(name)
    if msg is None:
        return []
    used = [f["type_name"].lstrip(".") for f in msg["fields"].values() if f["type_name"]]
    used += [f"{name}.{n}" for n in msg["nested_messages"] + msg["nested_enums"]]
    return used


def closure(summary: Summary, methods: Iterable[str]) -> set[str]:
    """Full names of all messages and enums the given methods need, transitively."""
    pending = [t.lstrip(".") for m in methods for t in (
        summary["methods"][m]["input_type"], summary["methods"][m]["output_type"])]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending.extend(_referenced_types(summary, name))
    return seen


def _triton_summary() -> Summary:
    """Import tritonclient's stubs (never ours) and summarize them."""
    import importlib

    modules = [importlib.import_module(name) for name in TRITON_MODULES]
    if "inference" in sys.modules:
        raise RuntimeError("the tritonclient side imported our `inference` package")
    return summarize(module.DESCRIPTOR for module in modules)


def main(argv: list[str]) -> int:
    """``--triton``: print tritonclient's summary as JSON; exit EXIT_NO_TRITON if absent."""
    if argv != ["--triton"]:
        print("usage: _wire_summary.py --triton", file=sys.stderr)
        return 2
    try:
        summary = _triton_summary()
    except ImportError as exc:
        print(f"cannot import tritonclient's gRPC stubs: {exc!r}", file=sys.stderr)
        return EXIT_NO_TRITON
    json.dump(summary, sys.stdout, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
