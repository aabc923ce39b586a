"""Hypothesis strategies that build a message of any protobuf descriptor, biased to hostile values.

`messages(descriptor, seeds)` fills a random subset of the fields of a message (oneofs, maps, repeated
fields with 0..many items, nested messages down to `MAX_DEPTH`, well-known types such as Struct and Any
included) with values chosen to hurt a server:

- strings: trailing newline, NUL, control characters, right-to-left marks, non-ASCII, NATS wildcards,
  path traversal, 70 KB and 2 MB strings, names that almost match the naming rule
  `[a-z0-9][a-z0-9_-]{0,62}` (one character off: a newline, an upper-case letter, 64 characters, a dot, a
  Cyrillic look-alike), plus the real names in `seeds` so a message sometimes gets past the first check;
- integers: 0, -1, 1, 2^31 - 1, 2^31, 2^62, 2^63 - 1, 2^64 - 1, ... clamped to each field's range;
- floats: NaN, +-inf, -0.0, the largest and the smallest double;
- enums: every defined value and undefined ones (proto3 enums are open: any int32 is on the wire);
- bytes: empty, NUL, a ZIP (.npz) header followed by garbage, random, 70 KB and 2 MB;
- repeated fields of 0..4 items, sometimes 3000 scalars or 300 messages; maps of 0..4 entries, sometimes 2000.

Big values are rare (one choice among dozens) and repeated fields and map values never draw them, so a
message stays a few MiB at most. `nasty_strings`, `near_miss_names` and `nasty_ints` are reused by the
per-RPC strategies (`fuzz_rpcs.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

MAX_DEPTH = 6              # nested messages below this depth are left empty
MAX_REPEATED = 4           # items of a repeated message field (scalars: also "many")
MANY_SCALARS = 3000        # the "many" length of a repeated scalar field
MANY_MESSAGES = 300        # ... of a repeated message field (copies of one drawn message)
MANY_ENTRIES = 2000        # ... of a map (distinct keys, one drawn value)
KB70 = 70 * 1024
MB2 = 2 * 1024 * 1024
NAME_RULE = r"[a-z0-9][a-z0-9_-]{0,62}"

BIG_STRINGS = ("n" * KB70, "m" * MB2)
SMALL_NASTY_STRINGS = (
    "", " ", "\n", "a\n", "prod\n", "production\n", "\x00", "a\x00b", "\r\n", "a\rb", "\t", "\x1b[31m",
    "é", "模型", "🙂", "\u202eevil", "\ufeffbom", "Ａ", "a b", "a.b", "a*", "a>", "*", ">", ".", "..",
    "../../etc/passwd", "/abs/path", "C:\\win", "%s%n%x", "{}", "{{7*7}}", "' OR 1=1 --", '"', "\\",
    "a" * 63, "a" * 64, "-", "_", "-a", "_a", "A", "Production", "prod-", "0", "-1", "NaN", "null",
    "os:system", "builtins:eval", "json:JSONDecoder", "a:b", ":", "x" * 1025, "ü" * 300,
)
NASTY_BYTES = (b"", b"\x00", b"\xff" * 8, b"PK\x03\x04" + b"\x00" * 26 + b"garbage",
               b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2**62,), }",
               b"\n\x03abc", b"b" * KB70, b"c" * MB2)

INT_EDGES = (0, -1, 1, 2, 7, 64, 65, 1024, 2**31 - 1, 2**31, -(2**31), 2**32 - 1, 2**32, 2**53 + 1, 2**62,
             -(2**62), 2**63 - 1, -(2**63), 2**64 - 1)
FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, float("nan"), float("inf"), float("-inf"), 1e308, -1e308,
               5e-324, 3.4028235e38, 1e-45)
UNDEFINED_ENUMS = (-1, 99, 2**31 - 1, -(2**31))

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def is_repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def is_map(field: FieldDescriptor) -> bool:
    return (field.type == FieldDescriptor.TYPE_MESSAGE and is_repeated(field)
            and field.message_type.GetOptions().map_entry)


# ---- scalar values ------------------------------------------------------------------------------------

def near_miss_names(base: Sequence[str] = ("digits", "production", "cpu")) -> st.SearchStrategy[str]:
    """Names one edit away from the naming rule: a newline, a capital, a dot, 64 chars, a look-alike."""
    edits = (lambda n: n + "\n", lambda n: "\n" + n, lambda n: n.upper(), lambda n: n + ".x", lambda n: n + " ",
             lambda n: n + "\x00", lambda n: "-" + n, lambda n: "_" + n, lambda n: (n * 64)[:64],
             lambda n: n.replace("a", "\u0430") if "a" in n else "\u0430" + n, lambda n: n + "*", lambda n: n + ">",
             lambda n: n + "/..", lambda n: n + "\t", lambda n: n + "é", lambda n: n[:-1] if len(n) > 1 else "")
    return st.builds(lambda name, edit: edit(name), st.sampled_from(list(base) or ["digits"]), st.sampled_from(edits))


def nasty_strings(seeds: Sequence[str] = (), big: bool = True) -> st.SearchStrategy[str]:
    """Strings that hurt: edge cases, near-miss names, valid names, short random text, the seeds."""
    options = [st.sampled_from(SMALL_NASTY_STRINGS + (BIG_STRINGS if big else ())), near_miss_names(seeds or ()),
               st.from_regex(NAME_RULE, fullmatch=True), st.text(max_size=24)]
    if seeds:
        options.append(st.sampled_from(list(seeds)))
    return st.one_of(options)


def nasty_ints(low: int = -(2**63), high: int = 2**63 - 1, extra: Sequence[int] = ()) -> st.SearchStrategy[int]:
    """Integers in [low, high] biased to the edges (and `extra`, e.g. real version numbers)."""
    edges = [v for v in (*INT_EDGES, *extra) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def nasty_floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(allow_nan=True, allow_infinity=True))


def nasty_bytes(big: bool = True) -> st.SearchStrategy[bytes]:
    values = NASTY_BYTES if big else tuple(b for b in NASTY_BYTES if len(b) < 1024)
    return st.one_of(st.sampled_from(values), st.binary(max_size=64))


def enum_values(field: FieldDescriptor) -> st.SearchStrategy[int]:
    defined = [v.number for v in field.enum_type.values]
    closed = getattr(field.enum_type, "is_closed", False)
    return st.sampled_from(defined if closed else defined + list(UNDEFINED_ENUMS))


def scalar_values(field: FieldDescriptor, seeds: Sequence[str], big: bool) -> st.SearchStrategy:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return nasty_strings(seeds, big)
    if kind == FieldDescriptor.TYPE_BYTES:
        return nasty_bytes(big)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        return enum_values(field)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return nasty_floats()
    return nasty_ints(*_INT_RANGES[kind])


# ---- messages -----------------------------------------------------------------------------------------

def messages(descriptor: Descriptor, seeds: Sequence[str] = (), depth: int = 0,
             big: bool = True) -> st.SearchStrategy[Message]:
    """A message of `descriptor` with a random subset of its fields set to hostile values."""
    return _message(descriptor, tuple(seeds), depth, big)


@st.composite
def _message(draw: st.DrawFn, descriptor: Descriptor, seeds: tuple[str, ...], depth: int, big: bool) -> Message:
    msg = message_class(descriptor)()
    if depth >= MAX_DEPTH or not descriptor.fields:
        return msg
    chosen = draw(st.lists(st.sampled_from(list(descriptor.fields)), max_size=len(descriptor.fields), unique=True))
    for field in chosen:
        set_field(draw, msg, field, seeds, depth, big)
    return msg


def set_field(draw: st.DrawFn, msg: Message, field: FieldDescriptor, seeds: tuple[str, ...], depth: int,
              big: bool) -> None:
    """Draw a hostile value (or several) for `field` and store it in `msg`."""
    if is_map(field):
        _fill_map(draw, getattr(msg, field.name), field.message_type, seeds, depth)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        if is_repeated(field):
            container = getattr(msg, field.name)
            count = draw(st.sampled_from(list(range(MAX_REPEATED + 1)) + [MANY_MESSAGES]))
            if count == MANY_MESSAGES:
                item = draw(_message(field.message_type, seeds, MAX_DEPTH - 1, False))
                container.extend([item] * count)
            for _ in range(count if count <= MAX_REPEATED else 0):
                container.add().CopyFrom(draw(_message(field.message_type, seeds, depth + 1, False)))
        else:
            getattr(msg, field.name).CopyFrom(draw(_message(field.message_type, seeds, depth + 1, big)))
    elif is_repeated(field):
        values = scalar_values(field, seeds, False)
        count = draw(st.sampled_from((0, 1, 2, 3, 5, MANY_SCALARS)))
        getattr(msg, field.name).extend([draw(values)] * count if count == MANY_SCALARS
                                        else [draw(values) for _ in range(count)])
    else:
        _set_scalar(msg, field, draw(scalar_values(field, seeds, big)))


def _set_scalar(msg: Message, field: FieldDescriptor, value: object) -> None:
    try:
        setattr(msg, field.name, value)
    except (ValueError, TypeError):  # e.g. an undefined value of a closed enum: keep the default
        pass


def _fill_map(draw: st.DrawFn, container, entry: Descriptor, seeds: tuple[str, ...], depth: int) -> None:  # noqa: ANN001
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    if draw(st.integers(0, 9)) == 0:
        _fill_many(draw, container, key_field, value_field, seeds)
        return
    for _ in range(draw(st.integers(0, MAX_REPEATED))):
        key = draw(scalar_values(key_field, seeds, False))
        if value_field.type == FieldDescriptor.TYPE_MESSAGE:
            container[key].CopyFrom(draw(_message(value_field.message_type, seeds, depth + 1, False)))
        else:
            try:
                container[key] = draw(scalar_values(value_field, seeds, False))
            except (ValueError, TypeError):
                pass


def _fill_many(draw: st.DrawFn, container, key_field: FieldDescriptor, value_field: FieldDescriptor,  # noqa: ANN001
               seeds: tuple[str, ...]) -> None:
    """MANY_ENTRIES distinct keys sharing one drawn value."""
    keys = ([f"k{i}" for i in range(MANY_ENTRIES)] if key_field.type == FieldDescriptor.TYPE_STRING
            else list(range(MANY_ENTRIES)))
    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
        value = draw(_message(value_field.message_type, seeds, MAX_DEPTH - 1, False))
        for key in keys:
            container[key].CopyFrom(value)
        return
    value = draw(scalar_values(value_field, seeds, False))
    try:
        for key in keys:
            container[key] = value
    except (ValueError, TypeError):
        pass


# ---- mutations of a near-valid message ----------------------------------------------------------------

@st.composite
def mutated(draw: st.DrawFn, base: Message, seeds: Sequence[str] = ()) -> Message:
    """`base` with one field somewhere in it (depth <= 2) replaced by a hostile value."""
    msg = type(base)()
    msg.CopyFrom(base)
    target = msg
    for _ in range(2):
        nested = [f for f in target.DESCRIPTOR.fields
                  if f.type == FieldDescriptor.TYPE_MESSAGE and not is_repeated(f) and target.HasField(f.name)]
        if not nested or not draw(st.booleans()):
            break
        target = getattr(target, draw(st.sampled_from(nested)).name)
    if target.DESCRIPTOR.fields:
        field = draw(st.sampled_from(list(target.DESCRIPTOR.fields)))
        target.ClearField(field.name)
        set_field(draw, target, field, tuple(seeds), MAX_DEPTH - 2, True)
    return msg
