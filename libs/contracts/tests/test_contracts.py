"""The contract data is consistent: names, subjects, streams, consumers, stacks, envelopes, hand-off."""

from __future__ import annotations

import numpy as np
import pytest

from splitstack.common.v1 import common_pb2
from splitstack.contracts import envelope, events, handoff, names, stacks
from splitstack.events.v1 import events_pb2


@pytest.mark.parametrize("good", ["digits", "a", "cpu", "t4-int8", "model_2", "0abc", "x" * 63])
def test_valid_names(good):
    assert names.check_name("model", good) == good


@pytest.mark.parametrize("bad", ["", "Digits", "-x", "_x", "a.b", "a b", "a/b", "x" * 64, "é"])
def test_invalid_names_name_the_field(bad):
    with pytest.raises(names.InvalidName, match="dataset"):
        names.check_name("dataset", bad)


def test_versions_travel_as_decimal_strings():
    assert names.version_string(12) == "12"
    assert names.parse_version("") == 0
    assert names.parse_version("7") == 7
    for bad in ("0", "-1", "1.0", "x"):
        with pytest.raises(ValueError):
            names.parse_version(bad)


def test_every_subject_names_a_real_message_and_jetstream_subjects_have_one_stream():
    for definition in events.SUBJECTS.values():
        assert definition.message_class().DESCRIPTOR.full_name == definition.message
        concrete = definition.format(**{t: "x" for t in definition.tokens})
        owners = [s for s in events.STREAMS.values()
                  if any(events.subject_matches(p, concrete) for p in s.subjects)]
        assert len(owners) == (1 if definition.transport == "jetstream" else 0), (definition.key, owners)


def test_subjects_are_formatted_with_the_naming_rule():
    assert events.subject("model_converted", model="digits", target="cpu") == "model.converted.digits.cpu"
    with pytest.raises(names.InvalidName):
        events.subject("data_updated", dataset="Bad.Name")
    with pytest.raises(ValueError, match="missing"):
        events.subject("model_promoted", model="digits")


def test_consumers_filter_subjects_of_their_own_stream():
    cpu = events.CONSUMERS["converter"].for_target("cpu")
    assert cpu.durable == "converter-cpu"
    assert cpu.filter_subjects == ("model.registered.>", "conversion.requested.*.cpu")
    for consumer in (cpu, events.CONSUMERS["trainer"]):
        stream = events.STREAMS[consumer.stream]
        for flt in consumer.filter_subjects:
            probe = flt.replace("*", "m").replace(">", "m.x")
            assert events.stream_for(probe) is stream


def test_subject_matching():
    assert events.subject_matches("model.registered.>", "model.registered.digits")
    assert not events.subject_matches("model.registered.>", "model.registered")
    assert events.subject_matches("conversion.requested.*.cpu", "conversion.requested.m.cpu")
    assert not events.subject_matches("conversion.requested.*.cpu", "conversion.requested.m.t4")


def test_envelope_round_trip_keeps_id_and_payload():
    payload = events_pb2.ModelDeployed(model="digits", version=3, target="cpu")
    env = envelope.wrap(payload, producer="serving/test", event_id="abc", trace_context={"traceparent": "t"})
    event = envelope.unwrap(env.SerializeToString())
    assert (event.event_id, event.producer, event.payload) == ("abc", "serving/test", payload)
    assert event.trace_context == {"traceparent": "t"}
    with pytest.raises(ValueError):
        envelope.unwrap(b"\xff\xff garbage")
    with pytest.raises(ValueError):
        envelope.unwrap(b"")


def test_shipped_stacks_include_the_reference_and_local_ones():
    profiles, targets = stacks.training_profiles(), stacks.inference_targets()
    a100 = profiles["a100-bf16"]
    assert (a100.precision, a100.batch_size, a100.nodes) == ("bf16-mixed", 1024, 32)
    assert profiles["cpu-local"].accelerator == common_pb2.CPU
    t4 = targets["t4-int8"]
    assert t4.candidate_formats[0] == common_pb2.TENSORRT_INT8
    assert (t4.replicas_min, t4.replicas_max, t4.scaling_target) == (2, 50, 70)
    assert targets["cpu"].selection_metric.name == "p50_latency_ms"


def test_a_misspelled_stack_field_is_an_error(tmp_path):
    (tmp_path / "bad.toml").write_text('id = "gpu2"\naccelerator = "GPU"\nmax_btach = 4\n')
    with pytest.raises(ValueError, match="bad.toml"):
        stacks.inference_targets(tmp_path)


def test_handoff_sample_checks():
    rows = handoff.SAMPLE_MIN_ROWS
    good = {"inputs": np.zeros((rows, 64)), "labels": np.zeros(rows), "reference_outputs": np.zeros((rows, 10))}
    handoff.check_sample(good)
    with pytest.raises(ValueError, match="lacks"):
        handoff.check_sample({"inputs": good["inputs"]})
    with pytest.raises(ValueError, match="at least"):
        handoff.check_sample({k: v[:10] for k, v in good.items()})
    with pytest.raises(ValueError, match="different row counts"):
        handoff.check_sample({**good, "labels": np.zeros(rows + 1)})
    sig = handoff.signature([64], 10)
    assert list(sig.inputs[0].shape) == [-1, 64] and sig.outputs[0].name == "logits"
