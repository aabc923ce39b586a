"""The fuzzer's own strategies reach the values they promise (no stack needed): a weak generator would make
a clean fuzz run mean nothing."""

from __future__ import annotations

import re

import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fuzz_messages import MB2, NAME_RULE, messages, nasty_ints, nasty_strings, near_miss_names
from fuzz_rpcs import RPCS, Seeds, hostile_infer, raw_payloads, requests
from inference import grpc_service_pb2 as ipb
from splitstack.common.v1 import common_pb2 as common
from splitstack.registry.v1 import registry_pb2 as rpb

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # reprs of 2 MB values
SEARCH = settings(max_examples=600, database=None, derandomize=True, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck))
SEEDS = Seeds(models=["fuzz-served", "fuzz-model"], versions=[1, 2], datasets=["fuzz-data"], dataset_versions=[1],
              shas=["a" * 64], jobs=["job-1"], policies=["fuzz-policy"], profiles=["cpu"], served="fuzz-served",
              served_versions=["1"], dynamic="fuzz-dynamic")


class _Reached(Exception):
    """The strategy produced a value meeting the condition."""


def _found(strategy: st.SearchStrategy, condition) -> bool:  # noqa: ANN001
    """Whether `strategy` produces a value meeting `condition` within SEARCH's examples (no shrinking)."""
    @SEARCH
    @given(strategy)
    def search(value: object) -> None:
        if condition(value):
            raise _Reached

    try:
        search()
    except _Reached:
        return True
    return False


@pytest.mark.parametrize("wanted", [
    lambda s: s.endswith("\n") and re.fullmatch(NAME_RULE, s[:-1]) is not None,   # trailing newline
    lambda s: "\x00" in s, lambda s: len(s) >= MB2, lambda s: len(s) == 64 and s.isalpha(),
    lambda s: any(ord(c) > 0x7F for c in s), lambda s: "*" in s or ">" in s,
], ids=["trailing-newline", "nul", "2mb", "64-chars", "non-ascii", "nats-wildcard"])
def test_strings_reach_the_nasty_values(wanted) -> None:  # noqa: ANN001
    assert _found(st.one_of(nasty_strings(["digits"]), near_miss_names(["digits"])), wanted)


@pytest.mark.parametrize("value", [0, -1, 2**31, 2**62, 2**63 - 1])
def test_int64_fields_reach_the_edges(value: int) -> None:
    assert _found(nasty_ints(), lambda v: v == value)


def test_uint64_reaches_its_top_and_int32_stays_in_range() -> None:
    assert _found(nasty_ints(0, 2**64 - 1), lambda v: v == 2**64 - 1)
    assert _found(nasty_ints(-(2**31), 2**31 - 1), lambda v: v == 2**31 - 1)


def test_messages_reach_undefined_enums_maps_and_many_items() -> None:
    header = rpb.ArtifactHeader.DESCRIPTOR
    assert _found(messages(header), lambda m: m.kind not in common.ArtifactKind.values())
    assert _found(messages(header), lambda m: len(m.metadata) >= 2000)
    assert _found(messages(ipb.ModelInferRequest.DESCRIPTOR), lambda m: len(m.inputs) >= 300)
    assert _found(messages(struct_pb2.Struct.DESCRIPTOR), lambda m: _depth(m) >= 3)


def _depth(struct: struct_pb2.Struct) -> int:
    inner = [v.struct_value for v in struct.fields.values() if v.WhichOneof("kind") == "struct_value"]
    return 1 + max((_depth(s) for s in inner), default=0)


def test_raw_payloads_nest_past_protobufs_recursion_limit() -> None:
    assert _found(raw_payloads(), lambda b: len(b) > 10_000)


def test_uploads_break_the_header_then_chunks_order() -> None:
    upload = next(r for r in RPCS if r.name == "registry.UploadArtifact")
    first = lambda parts: parts and not isinstance(parts[0], bytes) and parts[0].WhichOneof("part")  # noqa: E731
    assert _found(requests(upload, SEEDS), lambda parts: first(parts) == "chunk")
    assert _found(requests(upload, SEEDS), lambda parts: sum(not isinstance(p, bytes) and p.WhichOneof("part") == "header"
                                                              for p in parts) >= 2)
    assert _found(requests(upload, SEEDS), lambda parts: parts == [])


def test_infer_requests_reach_zero_element_and_over_rank_shapes() -> None:
    def shape(m) -> list[int]:  # noqa: ANN001
        return list(m.inputs[0].shape) if not isinstance(m, bytes) and m.inputs else []
    assert _found(hostile_infer(SEEDS), lambda m: shape(m)[:2] == [0, 2**62])
    assert _found(hostile_infer(SEEDS), lambda m: len(shape(m)) >= 70)
