"""Every RPC of the four services as data, a generic way to call it, and per-RPC "near-valid" strategies.

`RPCS` lists each method of `splitstack.registry.v1.Registry`, `splitstack.trainer.v1.Trainer`,
`splitstack.converter.v1.Converter` and `inference.GRPCInferenceService`, read from the generated
descriptors, so a new RPC is fuzzed without touching this file. `call(channel, rpc, request)` invokes any of
them (unary or streaming either way) on a plain channel and returns the status code it ended with.

`requests(rpc, seeds)` is what the fuzzer sends: generic hostile messages of the request type
(`fuzz_messages.messages`); "near-valid" ones built from the real names, versions, digests and job ids that
exist in the running stack (`Seeds`), so the input gets past the first name check and reaches deeper code,
sometimes with one field replaced by a hostile value; and bytes that are not the request message at all
(wire garbage, invalid UTF-8, nesting past protobuf's recursion limit). Client-streaming RPCs (the uploads)
get sequences: a well-formed header + chunks (right or wrong digest and size), chunks before the header, two
headers, a header alone, nothing at all, and generic sequences. ModelStreamInfer gets sequences of infer
requests, and its in-stream `error_message`s are checked like statuses.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from fuzz_messages import (
    FLOAT_EDGES, INT_EDGES, is_repeated, message_class, messages, mutated, nasty_bytes, nasty_ints, nasty_strings, near_miss_names,
)
from inference import grpc_service_pb2 as ipb
from splitstack.common.v1 import common_pb2 as common
from splitstack.converter.v1 import converter_pb2 as cpb
from splitstack.registry.v1 import registry_pb2 as rpb
from splitstack.trainer.v1 import trainer_pb2 as tpb

WATCH_SECONDS = 3.0           # a watch stream is cut after this (DEADLINE_EXCEEDED is its normal end here)
RPC_SECONDS = 60.0            # any other call: past this it counts as a hang
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
SERVED_INPUT, SERVED_OUTPUT, SERVED_WIDTH = "x", "y", 4


@dataclass(frozen=True)
class Rpc:
    """One RPC of one service."""

    service: str                 # registry, trainer, converter, serving
    method: MethodDescriptor

    @property
    def name(self) -> str:       # e.g. registry.SetAlias
        return f"{self.service}.{self.method.name}"

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def watch(self) -> bool:
        return self.method.name.startswith("Watch")

    @property
    def request_type(self) -> Descriptor:
        return self.method.input_type


def _methods(service: str, descriptor) -> list[Rpc]:  # noqa: ANN001
    return [Rpc(service, m) for m in descriptor.methods]


RPCS: list[Rpc] = [
    *_methods("registry", rpb.DESCRIPTOR.services_by_name["Registry"]),
    *_methods("trainer", tpb.DESCRIPTOR.services_by_name["Trainer"]),
    *_methods("converter", cpb.DESCRIPTOR.services_by_name["Converter"]),
    *_methods("serving", ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"]),
]


@dataclass
class Outcome:
    """How one call ended: its status code, the server's message, how many responses came back."""

    code: grpc.StatusCode
    details: str
    responses: list[Message] = field(default_factory=list)

    @property
    def in_band_errors(self) -> list[str]:
        """ModelStreamInfer's per-request errors (the stream itself ends OK)."""
        return [r.error_message for r in self.responses if getattr(r, "error_message", "")]

    @property
    def status(self) -> str:
        """The status code's name, `+error_message` when a stream answered a request with an error."""
        return self.code.name + ("+error_message" if self.in_band_errors else "")

    @property
    def forbidden(self) -> bool:
        """INTERNAL/UNKNOWN, or a streamed answer saying the server failed internally."""
        return self.code in FORBIDDEN or any(e.startswith("internal error") for e in self.in_band_errors)


def call(channel: grpc.Channel, rpc: Rpc, request: Message | Sequence[Message]) -> Outcome:
    """Invoke `rpc` with `request` (a list of messages for client-streaming RPCs); never raises RpcError."""
    response_class = message_class(rpc.method.output_type)
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    stub = kinds[(rpc.client_streaming, rpc.server_streaming)](
        rpc.path, request_serializer=_wire, response_deserializer=response_class.FromString)
    argument = iter(list(request)) if rpc.client_streaming else request
    timeout = WATCH_SECONDS if rpc.watch else RPC_SECONDS
    responses: list[Message] = []
    try:
        if rpc.server_streaming:
            for response in stub(argument, timeout=timeout):
                responses.append(response)
        else:
            responses.append(stub(argument, timeout=timeout))
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", responses)
    return Outcome(grpc.StatusCode.OK, "", responses)


def _wire(request: Message | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def acceptable(rpc: Rpc, outcome: Outcome) -> bool:
    """No INTERNAL/UNKNOWN for client input, and no hang (a watch may run to its deadline)."""
    if outcome.forbidden:
        return False
    return not (outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and not rpc.watch)


# ---- what exists in the running stack -----------------------------------------------------------------

@dataclass
class Seeds:
    """Real names of the fuzzed stack: the near-valid strategies start from these."""

    models: list[str]
    versions: list[int]
    datasets: list[str]
    dataset_versions: list[int]
    shas: list[str]
    jobs: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=lambda: ["production", "staging"])
    targets: list[str] = field(default_factory=lambda: ["cpu", "t4-int8"])
    recipes: list[str] = field(default_factory=lambda: ["digits-mlp", "digits-cnn"])
    served: str = ""                       # served with input x FP32 [batch, 4]
    served_versions: list[str] = field(default_factory=list)
    dynamic: str = ""                      # served with input x FP32 [batch, n]: any width passes the shape check

    @property
    def served_models(self) -> list[str]:
        return [m for m in (self.served, self.dynamic) if m]

    @property
    def names(self) -> list[str]:
        return [*self.models, *self.datasets, *self.policies, *self.aliases, *self.targets]


def _pick(values: Sequence, near: Callable[[], st.SearchStrategy] | None = None) -> st.SearchStrategy:
    """A real value three times in four, else a near miss."""
    options = [st.sampled_from(list(values))] * 3 if values else []
    if near is not None:
        options.append(near())
    return st.one_of(options) if options else st.just("")


def digest_variants(shas: Sequence[str]) -> st.SearchStrategy[str]:
    """Real digests, and digests one step wrong: upper case, truncated, a newline, not hex, unknown."""
    real = st.sampled_from(list(shas) or ["0" * 64])
    return st.one_of(real, real, real, real, real.map(str.upper), real.map(lambda s: s[:-1]), real.map(lambda s: s + "\n"),
                     real.map(lambda s: "g" + s[1:]), real.map(lambda s: "../" + s), st.just("f" * 64),
                     st.just(""), st.just("0" * 128))


def string_seeds(seeds: Seeds, service: str = "") -> dict[str, st.SearchStrategy]:
    """Near-valid values of string fields, by field name (whatever message they are in); on serving, names
    are the served model's."""
    models = seeds.served_models if service == "serving" else seeds.models + seeds.served_models
    model = _pick(models, lambda: near_miss_names(models))
    names = models if service == "serving" else seeds.names + models
    return {
        "model": model, "model_name": model, "dataset": _pick(seeds.datasets, lambda: near_miss_names(seeds.datasets)),
        "name": _pick(names, lambda: near_miss_names(names)),
        "alias": _pick(seeds.aliases, lambda: near_miss_names(seeds.aliases)),
        "target": _pick(seeds.targets, lambda: near_miss_names(seeds.targets)),
        "sha256": digest_variants(seeds.shas), "artifact_sha256": digest_variants(seeds.shas),
        "id": _pick(seeds.jobs, lambda: near_miss_names(seeds.jobs or ["job"])),
        "recipe": _pick(seeds.recipes, lambda: near_miss_names(seeds.recipes)),
        "profile": _pick(seeds.profiles, lambda: near_miss_names(seeds.profiles or ["cpu"])),
        "executor": st.sampled_from(["local", "kubernetes", "", "Local", "local\n", "docker"]),
        "model_version": _pick(["", *seeds.served_versions], lambda: st.sampled_from(
            ["0", "-1", "1.0", "99999999999999999999", "v1", " 1", "01", "1\n", "18446744073709551616"])),
        "version_str": _pick(["", *seeds.served_versions], lambda: st.sampled_from(
            ["0", "-1", "01", "1\n", "18446744073709551616", "latest", "\x00"])),
        "module": st.sampled_from(["", "no_such_module:Model", "os:system", "splitstack_trainer.recipes:Nope",
                                   "json:JSONDecoder", "a" * 300 + ":B", "..:x", "os.path:join\n"]),
        "datamodule": st.sampled_from(["", "no_such_module:Data", "collections:OrderedDict", ":"]),
        "precision": st.sampled_from(["32-true", "bf16-mixed", "bf16-true", "16-mixed", "64", "", "32-true\n"]),
        "repository_name": st.sampled_from(["", "models", "\x00", "../"]),
        "page_token": st.sampled_from(["", "0", "1", "-1", "zzz", "eyJvZmZzZXQiOiAtMX0=", "\x00", "9" * 40]),
    }


def int_seeds(seeds: Seeds) -> dict[str, st.SearchStrategy]:
    """Near-valid values of integer fields, by field name."""
    versions = nasty_ints(extra=seeds.versions)
    return {
        "version": st.one_of(st.sampled_from(seeds.versions or [1]), versions),
        "dataset_version": st.one_of(st.sampled_from(seeds.dataset_versions or [1]), nasty_ints()),
        "parent_version": versions, "page_size": nasty_ints(-(2**31), 2**31 - 1),
        "max_epochs": nasty_ints(-(2**31), 2**31 - 1, extra=(1,)), "size_bytes": nasty_ints(),
        "max_concurrent_jobs": nasty_ints(-(2**31), 2**31 - 1), "seed": nasty_ints(),
    }


@st.composite
def seeded(draw: st.DrawFn, descriptor: Descriptor, seeds: Seeds, depth: int = 0, service: str = "") -> Message:
    """A message whose name-like fields (at any depth <= 2) hold real names (or near misses), and nothing else."""
    msg = message_class(descriptor)()
    strings, ints = string_seeds(seeds, service), int_seeds(seeds)
    for fd in descriptor.fields:
        if fd.containing_oneof is not None and draw(st.booleans()):
            continue
        _seed_field(draw, msg, fd, seeds, strings, ints, depth, service)
    return msg


def _seed_field(draw: st.DrawFn, msg: Message, fd: FieldDescriptor, seeds: Seeds, strings: dict,
                ints: dict, depth: int, service: str) -> None:
    repeated = is_repeated(fd)
    if fd.type == FieldDescriptor.TYPE_STRING and not repeated:
        key = "version_str" if fd.name == "version" else fd.name
        if key in strings:
            setattr(msg, fd.name, draw(strings[key]))
    elif fd.type == FieldDescriptor.TYPE_STRING and fd.name in ("required_targets", "versions"):
        getattr(msg, fd.name).extend(draw(st.lists(strings["target"], max_size=3)))
    elif fd.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32) and not repeated:
        if fd.name in ints:
            value = draw(ints[fd.name])
            low, high = (-(2**31), 2**31 - 1) if fd.type == FieldDescriptor.TYPE_INT32 else (-(2**63), 2**63 - 1)
            setattr(msg, fd.name, max(low, min(high, value)))
    elif fd.type == FieldDescriptor.TYPE_MESSAGE and not repeated and depth < 2 and _worth_seeding(fd.message_type):
        if draw(st.integers(0, 3)) > 0:
            getattr(msg, fd.name).CopyFrom(draw(seeded(fd.message_type, seeds, depth + 1, service)))


def _worth_seeding(descriptor: Descriptor) -> bool:
    return descriptor.full_name.startswith("splitstack.")


def near_valid(descriptor: Descriptor, seeds: Seeds, base: st.SearchStrategy[Message] | None = None,
               service: str = "") -> st.SearchStrategy[Message]:
    """A seeded (or templated) message, as is or with one field replaced by a hostile value."""
    start = base if base is not None else seeded(descriptor, seeds, 0, service)
    return st.one_of(start, start, start.flatmap(lambda m: mutated(m, seeds.names)))


# ---- templates: valid requests the mutations start from ------------------------------------------------

def npz_bytes(rows: int = 8) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(rows)
    np.savez(buffer, inputs=rng.random((rows, 64), dtype=np.float32), labels=rng.integers(0, 10, rows))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def job_spec(seeds: Seeds) -> st.SearchStrategy[tpb.JobSpec]:
    return st.builds(
        lambda model, dataset, recipe, epochs: tpb.JobSpec(
            model=model, dataset=dataset, recipe=recipe, max_epochs=epochs, required_targets=["cpu"],
            profile_override=common.TrainingProfile(name="fuzz-cpu", accelerator=common.CPU, precision="32-true",
                                                    batch_size=64, devices=1, nodes=1)),
        _pick(seeds.models), _pick(seeds.datasets), _pick(seeds.recipes), st.sampled_from([1, 2]))


def infer_request(seeds: Seeds) -> st.SearchStrategy[ipb.ModelInferRequest]:
    """A well-formed request for a served model (typed contents or raw bytes), batch 1..3."""
    @st.composite
    def build(draw: st.DrawFn) -> ipb.ModelInferRequest:
        model = draw(st.sampled_from(seeds.served_models))
        batch = draw(st.integers(1, 3))
        width = SERVED_WIDTH if model == seeds.served else draw(st.integers(1, 9))
        values = np.linspace(-1, 1, batch * width, dtype=np.float32)
        tensor = ipb.ModelInferRequest.InferInputTensor(name=SERVED_INPUT, datatype="FP32", shape=[batch, width])
        version = draw(_pick([""] + (seeds.served_versions if model == seeds.served else [])))
        request = ipb.ModelInferRequest(model_name=model, model_version=version,
                                        id=draw(st.sampled_from(["", "r1", "\x00"])))
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(values.tolist())
            request.inputs.append(tensor)
        else:
            request.inputs.append(tensor)
            request.raw_input_contents.append(values.tobytes())
        if draw(st.booleans()):
            request.outputs.add(name=draw(st.sampled_from([SERVED_OUTPUT, "nope", ""])))
        return request
    return build()


@st.composite
def hostile_infer(draw: st.DrawFn, seeds: Seeds) -> ipb.ModelInferRequest:
    """A served-model request with one tensor property made hostile: shape, datatype, sizes, parameters."""
    request = draw(infer_request(seeds))
    tensor = request.inputs[0]
    mutation = draw(st.sampled_from(["shape", "rank", "huge", "huge", "datatype", "raw", "contents", "parameter", "dup",
                                     "name"]))
    if mutation == "shape":
        shape = draw(st.lists(st.sampled_from([0, -1, 1, 4, 2**31, 2**62, 2**63 - 1, -(2**63)]), min_size=1, max_size=4))
        del tensor.shape[:]
        tensor.shape.extend(shape)
    elif mutation == "rank":
        del tensor.shape[:]
        tensor.shape.extend([1] * draw(st.sampled_from([0, 3, 33, 70, 1000])))
    elif mutation == "huge":   # shapes whose element count is zero or overflows, data sized for nothing
        request.ClearField("raw_input_contents")
        tensor.ClearField("contents")
        del tensor.shape[:]
        tensor.shape.extend(draw(st.sampled_from([[0, 2**62], [1, 2**62], [2**31, 2**31], [2**62, 2**62], [0, 0],
                                                  [1, 0], [3, 2**63 - 1], [-1, 4], [1, -4]])))
        if draw(st.booleans()):
            request.raw_input_contents.append(b"")
    elif mutation == "datatype":
        tensor.datatype = draw(st.sampled_from(["", "fp32", "FP64", "INT8", "BYTES", "BF16", "FP8", "BOOL", "UINT64",
                                                "FP32\n", "\x00", "x" * 70000]))
    elif mutation == "raw":
        request.ClearField("raw_input_contents")
        tensor.ClearField("contents")
        request.raw_input_contents.append(draw(nasty_bytes()))
        if draw(st.booleans()):
            request.raw_input_contents.append(b"\x00" * 16)
    elif mutation == "contents":
        tensor.contents.fp32_contents.extend(draw(st.lists(st.sampled_from(FLOAT_EDGES), max_size=9)))
        tensor.contents.int64_contents.extend(draw(st.lists(st.sampled_from(INT_EDGES[:16]), max_size=4)))
        tensor.contents.bytes_contents.extend(draw(st.lists(nasty_bytes(big=False), max_size=2)))
    elif mutation == "parameter":
        key = draw(st.sampled_from(["timeout", "priority", "sequence_id", "binary_data_output", "\x00", "x" * 300]))
        param = request.parameters[key]
        choice = draw(st.sampled_from(["int", "str", "bool", "double"]))
        if choice == "int":
            param.int64_param = draw(nasty_ints())
        elif choice == "str":
            param.string_param = draw(nasty_strings())
        elif choice == "bool":
            param.bool_param = True
        else:
            param.double_param = draw(st.sampled_from(FLOAT_EDGES))
    elif mutation == "dup":
        request.inputs.add().CopyFrom(tensor)
    else:
        tensor.name = draw(nasty_strings([SERVED_INPUT]))
    return request


def load_request(seeds: Seeds) -> st.SearchStrategy[ipb.RepositoryModelLoadRequest]:
    """RepositoryModelLoad of the served model with version / config / keep_previous parameters."""
    @st.composite
    def build(draw: st.DrawFn) -> ipb.RepositoryModelLoadRequest:
        request = ipb.RepositoryModelLoadRequest(model_name=draw(_pick(seeds.served_models, lambda: near_miss_names(
            seeds.served_models))))
        if draw(st.booleans()):
            request.parameters["version"].string_param = draw(_pick(["", *seeds.served_versions, "0", "-1", "x"]))
        if draw(st.booleans()):
            config = {"max_batch_size": draw(st.sampled_from([0, -1, 1, 8, 2**31 - 1, -(2**31)])),
                      "dynamic_batching": {"max_queue_delay_microseconds": draw(st.sampled_from(["0", "-1", "1e30",
                                                                                                  "18446744073709551615"]))},
                      "instance_group": [{"count": draw(st.sampled_from([0, 1, 2, -1, 2**31 - 1]))}]}
            text = draw(st.sampled_from([json.dumps(config), "{", "null", "[]", '{"no_such_field": 1}', "",
                                         '{"max_batch_size": "x"}']))
            request.parameters["config"].string_param = text
        if draw(st.booleans()):
            request.parameters["keep_previous"].bool_param = draw(st.booleans())
        return request
    return build()


def templates(seeds: Seeds) -> dict[str, st.SearchStrategy[Message]]:
    """Valid requests (by RPC name) for RPCs whose request needs more than names to be accepted."""
    spec = job_spec(seeds)
    model = _pick(seeds.models)
    return {
        "registry.CreateModel": st.builds(lambda name, targets: rpb.CreateModelRequest(model=rpb.Model(
            name=name, required_targets=targets, description="fuzz")),
            st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True), st.sampled_from([[], ["t4-int8"]])),
        "registry.CreateVersion": st.builds(lambda m, key: rpb.CreateVersionRequest(
            model=m, idempotency_key=key, lineage=rpb.Lineage(training_job=key, metrics={"accuracy": 0.5})),
            model, st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True)),
        "registry.SetAlias": st.builds(lambda m, v, a: rpb.SetAliasRequest(model=m, alias=a, version=v, actor="fuzz",
                                                                           reason="fuzz"),
                                       model, st.sampled_from(seeds.versions or [1]), st.sampled_from(["staging", "qa"])),
        "registry.SetServingChoice": st.builds(lambda m, v, s: rpb.SetServingChoiceRequest(
            model=m, version=v, target="t4-int8", artifact_sha256=s, reason="fuzz"),
            model, st.sampled_from(seeds.versions or [1]), digest_variants(seeds.shas)),
        "registry.SetPromotionPolicy": st.builds(lambda m, mode, metric: rpb.SetPromotionPolicyRequest(
            model=m, actor="fuzz", policy=rpb.PromotionPolicy(mode=mode, metric=metric, direction=common.MAXIMIZE)),
            model, st.sampled_from([rpb.PromotionPolicy.MANUAL, rpb.PromotionPolicy.AUTO]),
            st.sampled_from(["accuracy", "loss"])),
        "converter.RequestConversion": st.builds(lambda m, v, t: cpb.RequestConversionRequest(
            model=m, version=v, target=t, requested_by="fuzz"), model, st.sampled_from(seeds.versions or [1]),
            st.sampled_from(seeds.targets)),
        "trainer.SubmitJob": spec.map(lambda s: tpb.SubmitJobRequest(spec=s)),
        "trainer.SetRetrainPolicy": st.builds(lambda name, s, enabled: tpb.SetRetrainPolicyRequest(policy=tpb.RetrainPolicy(
            name=name, model=s.model, dataset=s.dataset, template=s, debounce_seconds=3600, enabled=enabled,
            max_concurrent_jobs=1)), st.from_regex(r"fuzz-[a-z0-9]{1,8}", fullmatch=True), spec, st.booleans()),
        "serving.ModelInfer": infer_request(seeds),
        "serving.RepositoryModelLoad": load_request(seeds),
    }


# ---- bytes that are not the request message ------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested(depth: int) -> bytes:
    """Field 1 holding field 1 holding ... `depth` times: past protobuf's recursion limit (100) it cannot
    parse, whatever the message (a string field 1 makes it invalid UTF-8 sooner)."""
    data = b"\xc3\x28"
    for _ in range(depth):
        data = _field(1, data)
    return data


def raw_payloads() -> st.SearchStrategy[bytes]:
    """Request bodies that do not parse: wire garbage, truncation, invalid UTF-8, nesting 150 / 5000 deep."""
    return st.one_of(st.binary(min_size=1, max_size=64),
                     st.sampled_from([b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28", b"\x12\x02\xc3\x28",
                                      b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", nested(150), nested(5000)]))


# ---- streams ------------------------------------------------------------------------------------------

def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


@st.composite
def upload_sequences(draw: st.DrawFn, request_type: type[Message], header: st.SearchStrategy[Message],
                     contents: st.SearchStrategy[bytes]) -> list[Message]:
    """Upload streams: header + chunks (digest and size right or wrong) or an order violation."""
    content = draw(contents)
    head = draw(header)
    if draw(st.integers(0, 3)) > 0:   # mostly the right digest and size, so the content gets looked at
        head.sha256 = sha256(content)
        head.size_bytes = len(content)
    size = draw(st.sampled_from([1 << 20, 65536] + ([7] if len(content) < 4096 else [])))
    chunks = [request_type(chunk=c) for c in _chunks(content, size)]
    first = request_type()
    first.header.CopyFrom(head)
    first.header.SetInParent()
    shape = draw(st.sampled_from(["ok", "ok", "ok", "ok", "chunks-first", "two-headers", "header-only", "empty",
                                  "chunk-only", "header-last", "empty-chunks"]))
    return {"ok": [first, *chunks], "chunks-first": [*chunks, first], "two-headers": [first, first, *chunks],
            "header-only": [first], "empty": [], "chunk-only": chunks, "header-last": [*chunks[:1], first],
            "empty-chunks": [first, *[request_type(chunk=b"")] * 3, *chunks]}[shape]


def artifact_header(seeds: Seeds) -> st.SearchStrategy[rpb.ArtifactHeader]:
    base = st.builds(lambda m, v, kind, target: rpb.ArtifactHeader(
        model=m, version=v, kind=kind, target=target, filename="fuzz.bin", precision=common.PRECISION_FP32),
        _pick(seeds.models), st.sampled_from(seeds.versions or [1]),
        st.sampled_from([common.EXPORTED_PROGRAM, common.SAMPLE, common.ONNX, common.CHECKPOINT]),
        st.sampled_from(["", "cpu", "t4-int8"]))
    return near_valid(rpb.ArtifactHeader.DESCRIPTOR, seeds, base)


def dataset_header(seeds: Seeds) -> st.SearchStrategy[rpb.DatasetVersionHeader]:
    base = st.builds(lambda d, key: rpb.DatasetVersionHeader(dataset=d, idempotency_key=key),
                     _pick(seeds.datasets), st.from_regex(r"[a-z0-9]{0,12}", fullmatch=True))
    return near_valid(rpb.DatasetVersionHeader.DESCRIPTOR, seeds, base)


def dataset_contents() -> st.SearchStrategy[bytes]:
    """Real .npz files mostly; one cut short, a corrupt body, no rows, strings, no labels, random bytes, nothing."""
    good = st.integers(1, 40).map(npz_bytes)
    bad = st.sampled_from([npz_bytes()[:300], npz_bytes()[:30] + b"\xff" * 900, b"", b"PK\x05\x06" + b"\x00" * 18,
                           _npz_with(np.zeros((0, 64), np.float32)), _npz_with(np.array(["a", "b"])),
                           _npz_with(np.zeros((2, 64), np.float32), labels=False)])
    return weighted([(3, good), (2, bad), (1, nasty_bytes())])


def _npz_with(inputs: np.ndarray, labels: bool = True) -> bytes:
    """An .npz whose arrays are odd: no rows, strings, no labels."""
    buffer = io.BytesIO()
    arrays = {"inputs": inputs, **({"labels": np.zeros(len(inputs), np.int64)} if labels else {})}
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def stream_requests(rpc: Rpc, seeds: Seeds) -> st.SearchStrategy[list[Message]]:
    """Message sequences for a client-streaming RPC."""
    request_type = message_class(rpc.request_type)
    generic = st.lists(weighted([(9, messages(rpc.request_type, seeds.names, big=False)), (1, raw_payloads())]),
                       max_size=4)
    if rpc.name == "registry.UploadArtifact":
        uploads = upload_sequences(request_type, artifact_header(seeds), nasty_bytes())
        return weighted([(3, uploads), (1, generic)])
    if rpc.name == "registry.UploadDatasetVersion":
        uploads = upload_sequences(request_type, dataset_header(seeds), dataset_contents())
        return weighted([(3, uploads), (1, generic)])
    if rpc.name == "serving.ModelStreamInfer":
        one = st.one_of(infer_request(seeds), hostile_infer(seeds), messages(rpc.request_type, seeds.names, big=False))
        return weighted([(3, st.lists(one, max_size=5)), (1, generic)])
    return generic


def weighted(options: list[tuple[int, st.SearchStrategy]]) -> st.SearchStrategy:
    """One of `options`, each drawn about `weight` times in `sum(weights)`."""
    slots = [strategy for weight, strategy in options for _ in range(weight)]
    return st.integers(0, len(slots) - 1).flatmap(lambda i: slots[i])


def requests(rpc: Rpc, seeds: Seeds) -> st.SearchStrategy:
    """What the fuzzer sends to `rpc`: generic hostile messages, near-valid ones, and bytes that are not the
    request message at all (sequences of these for client-streaming RPCs)."""
    if rpc.client_streaming:
        return stream_requests(rpc, seeds)
    generic = messages(rpc.request_type, seeds.names)
    template = templates(seeds).get(rpc.name)
    near = near_valid(rpc.request_type, seeds, template, rpc.service)
    if rpc.name == "serving.ModelInfer":
        near = st.one_of(near, hostile_infer(seeds))
    return weighted([(6, near), (3, generic), (1, raw_payloads())])


def describe(request: Message | Sequence[Message], limit: int = 600) -> str:
    """A short, printable description of a request (big fields abbreviated)."""
    parts = request if isinstance(request, (list, tuple)) else [request]
    texts = [_short(p) for p in parts]
    text = "[" + ", ".join(texts) + "]" if isinstance(request, (list, tuple)) else texts[0]
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _short(msg: Message | bytes) -> str:
    if isinstance(msg, bytes):
        return f"bytes({msg[:40]!r}{'...' if len(msg) > 40 else ''}, {len(msg)} bytes)"
    copy = type(msg)()
    copy.CopyFrom(msg)
    _abbreviate(copy)
    return f"{type(msg).__name__}({str(copy).strip()!r})" if str(copy).strip() else f"{type(msg).__name__}()"


def _abbreviate(msg: Message) -> None:
    for fd, value in list(msg.ListFields()):
        if fd.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) and not is_repeated(fd):
            if len(value) > 80:
                setattr(msg, fd.name, value[:16] + (f"<{len(value)} chars>" if isinstance(value, str)
                                                    else f"<{len(value)} bytes>".encode()))
        elif is_repeated(fd) and fd.type != FieldDescriptor.TYPE_MESSAGE and len(value) > 8:
            keep = list(value[:3])
            del value[:]
            value.extend(keep)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and not is_repeated(fd):
            _abbreviate(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and not fd.message_type.GetOptions().map_entry:
            for item in value:
                _abbreviate(item)


def iter_rpcs(service: str | None = None) -> Iterator[Rpc]:
    return (r for r in RPCS if service is None or r.service == service)
