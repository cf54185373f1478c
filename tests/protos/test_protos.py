"""protos/: wire compatibility with Triton, generated code freshness, and both services.

- Every message, field, enum value and RPC in protos/grpc_service.proto must match
  tritonclient's own descriptors (name, number, type, label, oneof, streaming).
- The committed *_pb2.py / *_pb2.pyi / *_pb2_grpc.py must equal a fresh generation.
- Both services import, serve, and answer real clients (tritonclient.grpc for the
  Open Inference Protocol; the generated stub for vigil.v1.LLM), and reflection
  describes both.
"""

from __future__ import annotations

import importlib.util
import queue
import struct
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet

import tritonclient.grpc as triton_grpc
from tritonclient.grpc import model_config_pb2 as triton_model_config_pb2
from tritonclient.grpc import service_pb2 as triton_service_pb2

from protos import grpc_service_pb2, grpc_service_pb2_grpc, llm_pb2, llm_pb2_grpc
from tests.helpers import ROOT as REPO


# Messages that deliberately declare only part of Triton's fields (the rest are
# absent, never different). Every other message must have exactly Triton's fields.
PARTIAL_MESSAGES = {
    "inference.ModelConfig",
    "inference.ModelInput",
    "inference.ModelOutput",
    "inference.ModelStatistics",
}

REQUIRED_RPCS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
}

# tritonclient's modules live in the default pool; ours in a private one.
_TRITON_POOL = descriptor_pool.Default()
assert triton_service_pb2.DESCRIPTOR.pool is _TRITON_POOL
assert triton_model_config_pb2.DESCRIPTOR.pool is _TRITON_POOL


# ---------------------------------------------------------------------------
# Wire compatibility with Triton's grpc_service.proto
# ---------------------------------------------------------------------------


def _all_messages(desc: Descriptor):
    yield desc
    for nested in desc.nested_types:
        yield from _all_messages(nested)


def _all_enums(file_desc):
    yield from file_desc.enum_types_by_name.values()
    for top in file_desc.message_types_by_name.values():
        for msg in _all_messages(top):
            yield from msg.enum_types


def _field_signature(f: FieldDescriptor) -> dict:
    return {
        "name": f.name,
        "number": f.number,
        "type": f.type,
        "repeated": f.is_repeated,
        "presence": f.has_presence,
        "message": f.message_type.full_name if f.message_type else None,
        "enum": f.enum_type.full_name if f.enum_type else None,
        "oneof": f.containing_oneof.name if f.containing_oneof else None,
    }


def _our_messages() -> list[Descriptor]:
    return [
        m
        for top in grpc_service_pb2.DESCRIPTOR.message_types_by_name.values()
        for m in _all_messages(top)
    ]


def test_package_and_service_names():
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    assert grpc_service_pb2.DESCRIPTOR.pool is not _TRITON_POOL
    svc = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert svc.full_name == "inference.GRPCInferenceService"
    assert REQUIRED_RPCS <= set(svc.methods_by_name)


@pytest.mark.parametrize("msg", _our_messages(), ids=lambda m: m.full_name)
def test_message_matches_triton(msg: Descriptor):
    try:
        theirs = _TRITON_POOL.FindMessageTypeByName(msg.full_name)
    except KeyError:
        pytest.fail(f"{msg.full_name} is not a message of Triton's protocol")
    assert msg.GetOptions().map_entry == theirs.GetOptions().map_entry
    for f in msg.fields:
        assert f.name in theirs.fields_by_name, f"{msg.full_name}.{f.name} is not in Triton's"
        assert _field_signature(f) == _field_signature(theirs.fields_by_name[f.name]), (
            f"{msg.full_name}.{f.name} differs from Triton's"
        )
    if msg.full_name not in PARTIAL_MESSAGES:
        missing = set(theirs.fields_by_name) - set(msg.fields_by_name)
        assert not missing, f"{msg.full_name} lacks Triton's fields {sorted(missing)}"
    assert {o.name for o in msg.oneofs} <= {o.name for o in theirs.oneofs}


@pytest.mark.parametrize(
    "enum", list(_all_enums(grpc_service_pb2.DESCRIPTOR)), ids=lambda e: e.full_name
)
def test_enum_matches_triton(enum: EnumDescriptor):
    theirs = _TRITON_POOL.FindEnumTypeByName(enum.full_name)
    ours = {v.name: v.number for v in enum.values}
    assert ours == {v.name: v.number for v in theirs.values}


def test_rpcs_match_triton():
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name
    for m in ours.methods:
        t = theirs.methods_by_name.get(m.name)
        assert t is not None, f"RPC {m.name} is not in Triton's service"
        assert (m.input_type.full_name, m.output_type.full_name) == (
            t.input_type.full_name,
            t.output_type.full_name,
        ), m.name
        assert (m.client_streaming, m.server_streaming) == (
            t.client_streaming,
            t.server_streaming,
        ), m.name


def test_bytes_round_trip_with_triton_classes():
    ours = grpc_service_pb2.ModelInferRequest(model_name="llm", model_version="2", id="r1")
    ours.parameters["stream"].bool_param = True
    inp = ours.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    inp.parameters["p"].uint64_param = 7
    ours.outputs.add(name="text_output")
    ours.raw_input_contents.append(struct.pack("<I", 2) + b"hi")
    theirs = triton_service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "llm" and theirs.id == "r1"
    assert theirs.parameters["stream"].bool_param is True
    assert theirs.inputs[0].parameters["p"].uint64_param == 7
    assert theirs.raw_input_contents[0] == b"\x02\x00\x00\x00hi"
    assert theirs.SerializeToString(deterministic=True) == ours.SerializeToString(deterministic=True)

    cfg = grpc_service_pb2.ModelConfigResponse()
    cfg.config.name, cfg.config.backend, cfg.config.max_batch_size = "llm", "vigil", 16
    cfg.config.input.add(name="text_input", data_type=grpc_service_pb2.TYPE_STRING, dims=[1])
    cfg.config.model_transaction_policy.decoupled = True
    cfg.config.parameters["quantize"].string_value = "int4"
    t_cfg = triton_service_pb2.ModelConfigResponse.FromString(cfg.SerializeToString())
    assert t_cfg.config.backend == "vigil" and t_cfg.config.max_batch_size == 16
    assert t_cfg.config.input[0].data_type == triton_model_config_pb2.TYPE_STRING
    assert t_cfg.config.model_transaction_policy.decoupled
    assert t_cfg.config.parameters["quantize"].string_value == "int4"
    assert len(UnknownFieldSet(t_cfg.config)) == 0  # every field we send is one Triton knows


# ---------------------------------------------------------------------------
# Generated code is up to date
# ---------------------------------------------------------------------------


def _load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_files_up_to_date(tmp_path):
    gen = _load_gen_protos()
    fresh = {p.relative_to(tmp_path).as_posix(): p for p in gen.generate(tmp_path)}
    committed = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "protos").glob("*_pb2*")
        if p.suffix in (".py", ".pyi")
    }
    assert set(fresh) == committed, "stale or missing generated files; run scripts/gen_protos.py"
    stale = [name for name, p in fresh.items() if p.read_bytes() != (REPO / name).read_bytes()]
    assert not stale, f"out of date: {stale}; run scripts/gen_protos.py"


DECODE = """
import base64, json, sys
sys.path.insert(0, sys.argv[1])
import google.protobuf
from google.protobuf import json_format
from protos import events_pb2
out = {"runtime": google.protobuf.__version__}
for name, data in json.loads(sys.stdin.read()).items():
    message = getattr(events_pb2, name).FromString(base64.b64decode(data))
    out[name] = json_format.MessageToDict(message, preserving_proto_field_name=True)
print(json.dumps(out))
"""


@pytest.mark.parametrize("env, major", [("protoc", "5"), ("protobuf6", "6")])
def test_a_consumer_on_an_older_protobuf_decodes_the_events(env, major):
    """A Kafka consumer pinned to protobuf 5 or 6 imports protos/events_pb2.py and reads
    what this (newer) runtime wrote, every field."""
    import base64
    import json
    import subprocess

    from google.protobuf import json_format

    from protos import events_pb2

    event = events_pb2.InferenceEvent(event_id="e1", model="m", version="v1", route=events_pb2.ROUTE_CANARY,
                                      status=events_pb2.STATUS_OK, completion_token_hashes=[1, 2 ** 32 - 1],
                                      label_probabilities={"yes": 0.25}, flags=["f"])
    event.confidence.mean_entropy = 1.5
    signal = events_pb2.Signal(model="m", version="v1", kind=events_pb2.SIGNAL_KIND_CALIBRATION, detector="ece",
                               feature="label", statistic=0.2, threshold=0.1, detections=3, labels={"route": "stable"},
                               reliability=[events_pb2.ReliabilityBin(lower=0.9, upper=1.0, count=7, accuracy=0.5)])
    messages = {"InferenceEvent": event, "Signal": signal}
    python = _load_gen_protos().tool_python(env)
    run = subprocess.run([str(python), "-c", DECODE, str(REPO)], capture_output=True, text=True, timeout=120,
                         input=json.dumps({k: base64.b64encode(m.SerializeToString()).decode()
                                           for k, m in messages.items()}))
    assert run.returncode == 0, run.stderr
    decoded = json.loads(run.stdout)
    assert decoded.pop("runtime").split(".")[0] == major
    assert decoded == {k: json_format.MessageToDict(m, preserving_proto_field_name=True) for k, m in messages.items()}


def test_grpc_modules_import_pb2_from_package():
    for name in ("grpc_service", "llm"):
        text = (REPO / "protos" / f"{name}_pb2_grpc.py").read_text()
        assert f"from protos import {name}_pb2 as" in text


# ---------------------------------------------------------------------------
# Both services serve real clients
# ---------------------------------------------------------------------------


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _parse_bytes_tensor(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def _text_response(req, text: bytes, pb=grpc_service_pb2):
    resp = pb.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
    resp.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    resp.raw_output_contents.append(_bytes_tensor([text]))
    return resp


class _Inference(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return grpc_service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return grpc_service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return grpc_service_pb2.ModelReadyResponse(ready=request.name == "llm")

    def ServerMetadata(self, request, context):
        return grpc_service_pb2.ServerMetadataResponse(name="vigil", version="0.1.0")

    def ModelMetadata(self, request, context):
        resp = grpc_service_pb2.ModelMetadataResponse(name=request.name, versions=["1"], platform="vigil")
        resp.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        resp.outputs.add(name="text_output", datatype="BYTES", shape=[1])
        return resp

    def ModelInfer(self, request, context):
        (text,) = _parse_bytes_tensor(request.raw_input_contents[0])
        return _text_response(request, text.upper())

    def ModelStreamInfer(self, request_iterator, context):
        for req in request_iterator:
            (text,) = _parse_bytes_tensor(req.raw_input_contents[0])
            for word in text.split():
                yield grpc_service_pb2.ModelStreamInferResponse(infer_response=_text_response(req, word))
            yield grpc_service_pb2.ModelStreamInferResponse(error_message="done")

    def ModelConfig(self, request, context):
        resp = grpc_service_pb2.ModelConfigResponse()
        resp.config.name, resp.config.backend = request.name, "vigil"
        resp.config.model_transaction_policy.decoupled = True
        return resp

    def RepositoryIndex(self, request, context):
        resp = grpc_service_pb2.RepositoryIndexResponse()
        resp.models.add(name="llm", version="1", state="READY")
        return resp


class _LLM(llm_pb2_grpc.LLMServicer):
    def Generate(self, request, context):
        if request.WhichOneof("input") is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt or chat is required")
        text = request.prompt or request.chat.messages[-1].content
        return llm_pb2.GenerateResponse(
            request_id=request.request_id or "generated",
            model=request.model,
            version="1",
            text=text[::-1],
            finish_reason=llm_pb2.FINISH_REASON_STOP,
            confidence=llm_pb2.ConfidenceSummary(mean_logprob=-0.5),
            timing=llm_pb2.Timing(total_seconds=0.01),
        )

    def GenerateStream(self, request, context):
        for i, ch in enumerate(request.prompt):
            yield llm_pb2.GenerateStreamResponse(request_id="s", text=ch, token_ids=[i])
        yield llm_pb2.GenerateStreamResponse(
            request_id="s", final=True, finish_reason=llm_pb2.FINISH_REASON_LENGTH, completion_tokens=len(request.prompt)
        )

    def SetTraffic(self, request, context):
        total = sum(request.weights.values())
        return llm_pb2.SetTrafficResponse(
            model=request.model, weights={k: v / total for k, v in request.weights.items()}
        )


@pytest.fixture(scope="module")
def server_port():
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    from protos.reflection import SERVICE_NAMES, reflection_pool

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Inference(), server)
    llm_pb2_grpc.add_LLMServicer_to_server(_LLM(), server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, reflection.SERVICE_NAME), server, pool=reflection_pool(reflection_pb2.DESCRIPTOR)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(grace=None)


def test_tritonclient_against_our_service(server_port):
    client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{server_port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("llm") and not client.is_model_ready("other")
        assert client.get_server_metadata().name == "vigil"
        meta = client.get_model_metadata("llm")
        assert meta.inputs[0].name == "text_input" and meta.inputs[0].datatype == "BYTES"
        cfg = client.get_model_config("llm", as_json=True)
        assert cfg["config"]["model_transaction_policy"]["decoupled"] is True
        assert client.get_model_repository_index().models[0].state == "READY"

        inp = triton_grpc.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"hello world"], dtype=np.object_))
        result = client.infer("llm", [inp], request_id="r1", outputs=[triton_grpc.InferRequestedOutput("text_output")])
        assert result.get_response().id == "r1"
        assert result.as_numpy("text_output").tolist() == [b"HELLO WORLD"]

        got: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("llm", [inp], request_id="s1")
        words = []
        for _ in range(3):
            result, error = got.get(timeout=10)
            if error is not None:
                assert "done" in str(error)
                break
            assert result.get_response().id == "s1"
            words.append(result.as_numpy("text_output")[0])
        client.stop_stream()
        assert words == [b"hello", b"world"]
    finally:
        client.close()


def test_llm_service(server_port):
    with grpc.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        resp = stub.Generate(
            llm_pb2.GenerateRequest(
                model="llm",
                prompt="abc",
                sampling=llm_pb2.SamplingParams(max_tokens=8, temperature=0.0, top_p=0.9, seed=1, stop=["\n"]),
            )
        )
        assert (resp.text, resp.finish_reason, resp.request_id) == ("cba", llm_pb2.FINISH_REASON_STOP, "generated")
        assert resp.confidence.mean_logprob == -0.5

        chat = llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role="user", content="xy")])
        assert stub.Generate(llm_pb2.GenerateRequest(model="llm", chat=chat)).text == "yx"

        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(llm_pb2.GenerateRequest(model="llm"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        chunks = list(stub.GenerateStream(llm_pb2.GenerateRequest(model="llm", prompt="hey")))
        assert "".join(c.text for c in chunks) == "hey"
        assert [c.final for c in chunks] == [False, False, False, True]
        assert chunks[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH

        traffic = stub.SetTraffic(llm_pb2.SetTrafficRequest(model="llm", weights={"1": 3.0, "2": 1.0}))
        assert dict(traffic.weights) == {"1": 0.75, "2": 0.25}

        with pytest.raises(grpc.RpcError) as err:  # not implemented by the test servicer
            stub.Classify(llm_pb2.ClassifyRequest(model="llm", text="x", labels=["a", "b"]))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_describes_both_services(server_port):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"inference.GRPCInferenceService", "vigil.v1.LLM"} <= set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        infer = pool.FindServiceByName("inference.GRPCInferenceService").methods_by_name["ModelStreamInfer"]
        assert infer.client_streaming and infer.server_streaming
        assert "Generate" in pool.FindServiceByName("vigil.v1.LLM").methods_by_name
        gen = pool.FindMessageTypeByName("vigil.v1.GenerateRequest")
        assert gen.fields_by_name["sampling"].message_type.full_name == "vigil.v1.SamplingParams"


# ---------------------------------------------------------------------------
# vigil.v1 shape (a guard against accidental renumbering)
# ---------------------------------------------------------------------------

LLM_RPCS = {
    "Generate": ("GenerateRequest", "GenerateResponse", False),
    "GenerateStream": ("GenerateRequest", "GenerateStreamResponse", True),
    "Classify": ("ClassifyRequest", "ClassifyResponse", False),
    "Feedback": ("FeedbackRequest", "FeedbackResponse", False),
    "ListVersions": ("ListVersionsRequest", "ListVersionsResponse", False),
    "LoadVersion": ("LoadVersionRequest", "LoadVersionResponse", False),
    "UnloadVersion": ("UnloadVersionRequest", "UnloadVersionResponse", False),
    "SetTraffic": ("SetTrafficRequest", "SetTrafficResponse", False),
}


def test_llm_service_shape():
    svc = llm_pb2.DESCRIPTOR.services_by_name["LLM"]
    assert svc.full_name == "vigil.v1.LLM"
    got = {
        m.name: (m.input_type.name, m.output_type.name, m.server_streaming)
        for m in svc.methods
        if not m.client_streaming
    }
    assert got == LLM_RPCS


def test_llm_field_numbers():
    def numbers(msg):
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}

    assert numbers(llm_pb2.GenerateRequest) == {
        "model": 1, "version": 2, "prompt": 3, "chat": 4, "sampling": 5, "routing_key": 6, "request_id": 7,
        "attributes": 8,
    }
    assert numbers(llm_pb2.SamplingParams) == {
        "max_tokens": 1, "temperature": 2, "top_k": 3, "top_p": 4, "seed": 5, "stop": 6, "ignore_eos": 7,
    }
    assert numbers(llm_pb2.GenerateStreamResponse) == {
        "request_id": 1, "model": 2, "version": 3, "text": 4, "token_ids": 5, "final": 6,
        "finish_reason": 7, "prompt_tokens": 8, "completion_tokens": 9, "confidence": 10, "timing": 11,
        "flags": 12,
    }
    assert numbers(llm_pb2.FeedbackRequest) == {
        "request_id": 1, "model": 2, "version": 3, "label": 4, "score": 5, "comment": 6,
    }
    assert llm_pb2.SamplingParams.DESCRIPTOR.fields_by_name["top_p"].has_presence
    assert llm_pb2.SamplingParams.DESCRIPTOR.fields_by_name["seed"].has_presence
    assert not llm_pb2.SamplingParams().HasField("top_p")
