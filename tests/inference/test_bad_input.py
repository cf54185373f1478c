"""Bad input, table-driven, on both front ends: each case gets its status code and a
message that names the field, leaves exactly one event (when it is a request), and the
server keeps serving afterwards."""

from __future__ import annotations

import math
import struct
import time

import grpc
import numpy as np
import pytest

from inference.api.events import INFERENCE_TOPIC
from inference.api.limits import Limits
from inference.api.options import EngineOptions
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc, llm_pb2, llm_pb2_grpc

MODEL = "tiny"
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
MAX_PROMPT_CHARS, MAX_TOKENS, MAX_LABELS, MAX_SEQ_LEN = 200, 64, 4, 128
# digits never occur in the tiny tokenizer's training text: one token per character
OVER_TOKEN_LIMIT = "1234567890" * 15


@pytest.fixture(scope="module")
def server(start_server, tiny_llama):
    s = start_server(model=str(tiny_llama), model_name=MODEL, quantize="none",
                     limits=Limits(max_prompt_chars=MAX_PROMPT_CHARS, max_tokens=MAX_TOKENS, max_labels=MAX_LABELS),
                     engine=EngineOptions(kv_slots=2, max_seq_len=MAX_SEQ_LEN, max_waiting=8))
    tokens = len(s.server.router.get(MODEL, "1").tokenizer.encode(OVER_TOKEN_LIMIT))
    assert len(OVER_TOKEN_LIMIT) <= MAX_PROMPT_CHARS and tokens >= MAX_SEQ_LEN
    return s


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def events_for(sink, request_id: str) -> list[dict]:
    return [e for e in sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id]


def wait_events(sink, request_id: str, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not events_for(sink, request_id) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    return events_for(sink, request_id)


def check_error(err: grpc.RpcError, code, fields: tuple[str, ...]) -> None:
    assert err.code() == code, (err.code(), err.details())
    for field in fields:
        assert field in err.details(), (field, err.details())


# -- the Open Inference Protocol ---------------------------------------------------------


def el(*items: bytes) -> bytes:
    """BYTES elements with their 4-byte little-endian length prefix, as tritonclient sends them."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def tensor(name: str, datatype: str, shape, raw: bytes):
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape), raw


def text(value: bytes, shape=(1,)):
    return tensor("text_input", "BYTES", list(shape), el(value))


def scalar(name: str, value, dtype) -> tuple:
    datatype = {np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL", np.int64: "INT64"}[dtype]
    return tensor(name, datatype, [1], np.array([value], dtype=dtype).tobytes())


def json_params(value: bytes):
    return tensor("sampling_parameters", "BYTES", [1], el(value))


def infer_request(*tensors, model=MODEL, version="", outputs=(), raw_count=None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for t, raw in tensors:
        req.inputs.append(t)
        req.raw_input_contents.append(raw)
    if raw_count is not None:
        del req.raw_input_contents[raw_count:]
    for name in outputs:
        req.outputs.append(pb.ModelInferRequest.InferRequestedOutputTensor(name=name))
    return req


def typed_request(*tensors, **kw) -> pb.ModelInferRequest:
    """Tensors in typed `contents`: (name, datatype, shape, field, values)."""
    req = pb.ModelInferRequest(model_name=kw.get("model", MODEL))
    for name, datatype, shape, field, values in tensors:
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        getattr(t.contents, field).extend(values)
    return req


HELLO = text(b"Hello")
KSERVE_CASES = [
    ("empty prompt", infer_request(text(b"")), INVALID, ("text_input",)),
    ("oversized prompt", infer_request(text(b"a" * (MAX_PROMPT_CHARS + 1))), INVALID, ("text_input", "200")),
    ("prompt over the token limit", infer_request(text(OVER_TOKEN_LIMIT.encode())), INVALID,
     ("text_input", "tokens")),
    ("unknown model", infer_request(HELLO, model="no-such-model"), NOT_FOUND, ("model", "no-such-model")),
    ("unknown version", infer_request(HELLO, version="9"), NOT_FOUND, ("version", "9")),
    ("empty model name", infer_request(HELLO, model=""), INVALID, ("model",)),
    ("wrong tensor name", infer_request(tensor("prompt", "BYTES", [1], el(b"Hi"))), INVALID, ("prompt",)),
    ("wrong datatype of text_input", infer_request(scalar("text_input", 7, np.int32)), INVALID,
     ("text_input", "datatype")),
    ("wrong datatype of max_tokens", infer_request(HELLO, scalar("max_tokens", 4.0, np.float32)), INVALID,
     ("max_tokens", "datatype")),
    ("wrong datatype of stream", infer_request(HELLO, scalar("stream", 1, np.int32)), INVALID,
     ("stream", "datatype")),
    ("wrong shape of text_input", infer_request(tensor("text_input", "BYTES", [2], el(b"a", b"b"))), INVALID,
     ("text_input", "shape")),
    ("wrong shape of max_tokens", infer_request(HELLO, tensor("max_tokens", "INT32", [1, 2],
                                                              np.array([1, 2], np.int32).tobytes())),
     INVALID, ("max_tokens", "shape")),
    ("shape and element count disagree", infer_request(tensor("text_input", "BYTES", [1], el(b"a", b"b"))),
     INVALID, ("text_input",)),
    ("negative dimension", infer_request(tensor("text_input", "BYTES", [-1], el(b"a"))), INVALID,
     ("text_input", "shape")),
    ("missing text_input", infer_request(scalar("max_tokens", 4, np.int32)), INVALID, ("text_input",)),
    ("text_input twice", infer_request(HELLO, text(b"again")), INVALID, ("text_input",)),
    ("malformed UTF-8", infer_request(text(b"caf\xc3(\xff")), INVALID, ("text_input", "UTF-8")),
    ("raw_input_contents count mismatch", infer_request(HELLO, scalar("max_tokens", 4, np.int32), raw_count=1),
     INVALID, ("raw_input_contents",)),
    ("truncated BYTES length prefix", infer_request(tensor("text_input", "BYTES", [1], b"\x05\x00")), INVALID,
     ("raw_input_contents", "text_input")),
    ("BYTES element past the end", infer_request(tensor("text_input", "BYTES", [1], b"\x09\x00\x00\x00abc")),
     INVALID, ("raw_input_contents", "text_input")),
    ("numeric raw of a wrong size", infer_request(HELLO, tensor("max_tokens", "INT32", [1], b"\x01\x00\x00")),
     INVALID, ("max_tokens",)),
    ("typed contents missing", typed_request(("text_input", "BYTES", [1], "bytes_contents", [])), INVALID,
     ("text_input",)),
    ("sampling_parameters not JSON", infer_request(HELLO, json_params(b"{temperature: 1")), INVALID,
     ("sampling_parameters", "JSON")),
    ("sampling_parameters not an object", infer_request(HELLO, json_params(b"[0.5]")), INVALID,
     ("sampling_parameters",)),
    ("sampling_parameters unknown key", infer_request(HELLO, json_params(b'{"temprature": 0.5}')), INVALID,
     ("sampling_parameters", "temprature")),
    ("sampling_parameters wrong type", infer_request(HELLO, json_params(b'{"max_tokens": "many"}')), INVALID,
     ("sampling_parameters",)),
    ("sampling_parameters beyond any integer", infer_request(HELLO, json_params(b'{"max_tokens": 1e400}')),
     INVALID, ("sampling_parameters",)),
    ("sampling_parameters temperature out of range",
     infer_request(HELLO, json_params(b'{"temperature": -1}')), INVALID, ("temperature",)),
    ("sampling_parameters nested too deeply",
     infer_request(HELLO, json_params(b'{"stop": ' + b"[" * 2000 + b"]" * 2000 + b"}")), INVALID,
     ("sampling_parameters", "deep")),
    ("sampling_parameters stop not strings", infer_request(HELLO, json_params(b'{"stop": [["a"]]}')), INVALID,
     ("sampling_parameters", "stop")),
    ("sampling_parameters ignore_eos not a boolean", infer_request(HELLO, json_params(b'{"ignore_eos": "no"}')),
     INVALID, ("sampling_parameters", "ignore_eos")),
    ("sampling_parameters malformed UTF-8", infer_request(HELLO, json_params(b'{"stop": "\xff"}')), INVALID,
     ("sampling_parameters", "UTF-8")),
    ("temperature negative", infer_request(HELLO, scalar("temperature", -0.5, np.float32)), INVALID,
     ("temperature",)),
    ("temperature too high", infer_request(HELLO, scalar("temperature", 1000.0, np.float32)), INVALID,
     ("temperature",)),
    ("temperature NaN", infer_request(HELLO, scalar("temperature", float("nan"), np.float32)), INVALID,
     ("temperature",)),
    ("top_p over 1", infer_request(HELLO, scalar("top_p", 1.5, np.float32)), INVALID, ("top_p",)),
    ("top_p negative", infer_request(HELLO, scalar("top_p", -0.2, np.float32)), INVALID, ("top_p",)),
    ("top_k negative", infer_request(HELLO, scalar("top_k", -1, np.int32)), INVALID, ("top_k",)),
    ("max_tokens zero", infer_request(HELLO, scalar("max_tokens", 0, np.int32)), INVALID, ("max_tokens",)),
    ("max_tokens over the limit", infer_request(HELLO, scalar("max_tokens", MAX_TOKENS + 1, np.int32)), INVALID,
     ("max_tokens", str(MAX_TOKENS))),
    ("seed negative", infer_request(HELLO, scalar("seed", -3, np.int64)), INVALID, ("seed",)),
    ("stream=true on ModelInfer", infer_request(HELLO, scalar("stream", True, np.bool_)), INVALID, ("stream",)),
    ("unknown requested output", infer_request(HELLO, outputs=["text_output", "logits"]), INVALID,
     ("outputs", "logits")),
]


@pytest.mark.parametrize("case,request_,code,fields", KSERVE_CASES, ids=[c[0] for c in KSERVE_CASES])
def test_kserve_bad_input(server, channel, case, request_, code, fields):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest()
    request.CopyFrom(request_)
    request.id = f"kserve-{case}"
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=30)
    check_error(err.value, code, fields)
    events = wait_events(server.sink, request.id)
    assert len(events) == 1
    assert events[0]["status"] == code.name.lower() and events[0]["method"] == "ModelInfer"
    assert events[0]["error"] == err.value.details()
    # the server still serves, raw and typed
    good = stub.ModelInfer(infer_request(HELLO, scalar("max_tokens", 2, np.int32)), timeout=30)
    assert good.outputs[0].name == "text_output" and good.model_name == MODEL
    good = stub.ModelInfer(typed_request(("text_input", "BYTES", [1, 1], "bytes_contents", [b"Hello"]),
                                         ("max_tokens", "INT32", [1], "int_contents", [2]),
                                         ("temperature", "FP32", [1], "fp32_contents", [0.5])), timeout=30)
    assert good.model_version == "1"


def test_kserve_bad_input_in_a_stream(server, channel):
    """ModelStreamInfer answers bad requests in-band and keeps the stream open."""
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    bad = [c for c in KSERVE_CASES if c[0] != "stream=true on ModelInfer"]
    requests = []
    for case, request_, code, fields in bad:
        r = pb.ModelInferRequest()
        r.CopyFrom(request_)
        r.id = f"stream-{case}"
        requests.append(r)
    good = infer_request(HELLO, scalar("max_tokens", 3, np.int32), scalar("stream", True, np.bool_))
    good.id = "stream-good"
    requests.append(good)
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=60))
    errors = {a.infer_response.id: a.error_message for a in answers if a.error_message}
    for case, _, code, fields in bad:
        message = errors[f"stream-{case}"]
        assert message.startswith(code.name), (case, message)
        for field in fields:
            assert field in message, (case, field, message)
        assert len(events_for(server.sink, f"stream-{case}")) == 1
    good_answers = [a for a in answers if a.infer_response.id == "stream-good"]
    assert all(not a.error_message for a in good_answers)
    assert good_answers[-1].infer_response.parameters["triton_final_response"].bool_param


# -- vigil.v1 ------------------------------------------------------------------------------


def chat(*pairs) -> llm_pb2.Chat:
    return llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role=r, content=c) for r, c in pairs])


def gen(sampling=None, **kw) -> llm_pb2.GenerateRequest:
    kw.setdefault("model", MODEL)
    if "chat" not in kw:
        kw.setdefault("prompt", "Hello")
    return llm_pb2.GenerateRequest(sampling=llm_pb2.SamplingParams(**(sampling or {})), **kw)


def cls(labels, **kw) -> llm_pb2.ClassifyRequest:
    kw.setdefault("model", MODEL)
    if "chat" not in kw:
        kw.setdefault("text", "The capital of France is")
    return llm_pb2.ClassifyRequest(labels=labels, **kw)


LABELS = [" Paris", " London"]
V1_CASES = [
    ("empty prompt", "Generate", gen(prompt=""), INVALID, ("prompt",)),
    ("no input", "Generate", llm_pb2.GenerateRequest(model=MODEL), INVALID, ("prompt",)),
    ("oversized prompt", "Generate", gen(prompt="a" * (MAX_PROMPT_CHARS + 1)), INVALID, ("prompt", "200")),
    ("prompt over the token limit", "Generate", gen(prompt=OVER_TOKEN_LIMIT), INVALID, ("prompt", "tokens")),
    ("empty model", "Generate", gen(model=""), INVALID, ("model",)),
    ("unknown model", "Generate", gen(model="no-such-model"), NOT_FOUND, ("model", "no-such-model")),
    ("unknown version", "Generate", gen(version="9"), NOT_FOUND, ("version", "9")),
    ("chat without messages", "Generate", gen(chat=llm_pb2.Chat()), INVALID, ("chat.messages",)),
    ("chat with a bad role", "Generate", gen(chat=chat(("user", "hi"), ("wizard", "x"))), INVALID,
     ("chat.messages[1].role", "wizard")),
    ("chat too long", "Generate", gen(chat=chat(("user", "a" * MAX_PROMPT_CHARS))), INVALID, ("chat",)),
    ("negative temperature", "Generate", gen({"temperature": -0.1}), INVALID, ("temperature",)),
    ("temperature too high", "Generate", gen({"temperature": 101.0}), INVALID, ("temperature",)),
    ("temperature infinite", "Generate", gen({"temperature": math.inf}), INVALID, ("temperature",)),
    ("top_p 1.5", "Generate", gen({"top_p": 1.5}), INVALID, ("top_p",)),
    ("top_p negative", "Generate", gen({"top_p": -0.5}), INVALID, ("top_p",)),
    ("max_tokens over the limit", "Generate", gen({"max_tokens": MAX_TOKENS + 1}), INVALID,
     ("max_tokens", str(MAX_TOKENS))),
    ("seed too large", "Generate", gen({"seed": 2**63 + 5, "temperature": 1.0}), INVALID, ("seed",)),
    ("empty stop string", "Generate", gen({"stop": ["ok", ""]}), INVALID, ("stop",)),
    ("too many stop strings", "Generate", gen({"stop": [f"s{i}" for i in range(17)]}), INVALID, ("stop",)),
    ("stream: empty prompt", "GenerateStream", gen(prompt=""), INVALID, ("prompt",)),
    ("stream: unknown model", "GenerateStream", gen(model="no-such-model"), NOT_FOUND, ("model",)),
    ("stream: top_p 1.5", "GenerateStream", gen({"top_p": 1.5}), INVALID, ("top_p",)),
    ("labels empty", "Classify", cls([]), INVALID, ("labels",)),
    ("one label", "Classify", cls([" Paris"]), INVALID, ("labels",)),
    ("too many labels", "Classify", cls([f" L{i}" for i in range(MAX_LABELS + 1)]), INVALID,
     ("labels", str(MAX_LABELS))),
    ("duplicate labels", "Classify", cls([" Paris", " London", " Paris"]), INVALID, ("labels", "duplicate")),
    ("empty label", "Classify", cls([" Paris", ""]), INVALID, ("labels[1]",)),
    ("label too long", "Classify", cls([" Paris", "x" * 300]), INVALID, ("labels[1]",)),
    ("classify: empty text", "Classify", cls(LABELS, text=""), INVALID, ("text",)),
    ("classify: chat with a bad role", "Classify", cls(LABELS, chat=chat(("robot", "hi"))), INVALID,
     ("chat.messages[0].role",)),
    ("classify: unknown model", "Classify", cls(LABELS, model="no-such-model"), NOT_FOUND, ("model",)),
    ("classify: unknown version", "Classify", cls(LABELS, version="9"), NOT_FOUND, ("version",)),
]


@pytest.mark.parametrize("case,method,request_,code,fields", V1_CASES, ids=[c[0] for c in V1_CASES])
def test_llm_bad_input(server, channel, case, method, request_, code, fields):
    stub = llm_pb2_grpc.LLMStub(channel)
    request = type(request_)()
    request.CopyFrom(request_)
    request.request_id = f"v1-{case}"
    call = getattr(stub, method)
    with pytest.raises(grpc.RpcError) as err:
        result = call(request, timeout=30)
        if method == "GenerateStream":
            list(result)
    check_error(err.value, code, fields)
    events = wait_events(server.sink, request.request_id)
    assert len(events) == 1
    assert events[0]["status"] == code.name.lower() and events[0]["method"] == method
    assert events[0]["error"] == err.value.details()
    # the server still serves
    good = stub.Generate(gen({"max_tokens": 2}), timeout=30)
    assert good.completion_tokens >= 1 and good.model == MODEL
    assert stub.Classify(cls(LABELS), timeout=30).prediction in LABELS


FEEDBACK_CASES = [
    ("empty request_id", llm_pb2.FeedbackRequest(model=MODEL, label="x"), INVALID, ("request_id",)),
    ("no truth", llm_pb2.FeedbackRequest(request_id="r1", model=MODEL), INVALID, ("truth",)),
    ("score NaN", llm_pb2.FeedbackRequest(request_id="r1", model=MODEL, score=math.nan), INVALID, ("score",)),
    ("empty label", llm_pb2.FeedbackRequest(request_id="r1", model=MODEL, label=""), INVALID, ("label",)),
    ("unknown model", llm_pb2.FeedbackRequest(request_id="r1", model="no-such-model", label="x"), NOT_FOUND,
     ("model",)),
]


@pytest.mark.parametrize("case,request_,code,fields", FEEDBACK_CASES, ids=[c[0] for c in FEEDBACK_CASES])
def test_feedback_bad_input(server, channel, case, request_, code, fields):
    stub = llm_pb2_grpc.LLMStub(channel)
    before = len(server.sink.events())
    with pytest.raises(grpc.RpcError) as err:
        stub.Feedback(request_, timeout=10)
    check_error(err.value, code, fields)
    assert len(server.sink.events()) == before  # nothing published
    assert stub.Feedback(llm_pb2.FeedbackRequest(request_id="r1", model=MODEL, score=1.0), timeout=10).accepted


# -- bytes that are no message ------------------------------------------------------------

UNDECODABLE = [  # method, request message type, how the method streams
    ("/vigil.v1.LLM/Generate", "vigil.v1.GenerateRequest", "unary_unary"),
    ("/vigil.v1.LLM/GenerateStream", "vigil.v1.GenerateRequest", "unary_stream"),
    ("/vigil.v1.LLM/Classify", "vigil.v1.ClassifyRequest", "unary_unary"),
    ("/vigil.v1.LLM/Feedback", "vigil.v1.FeedbackRequest", "unary_unary"),
    ("/vigil.v1.LLM/SetTraffic", "vigil.v1.SetTrafficRequest", "unary_unary"),
    ("/inference.GRPCInferenceService/ModelInfer", "inference.ModelInferRequest", "unary_unary"),
    ("/inference.GRPCInferenceService/ModelStreamInfer", "inference.ModelInferRequest", "stream_stream"),
    ("/inference.GRPCInferenceService/ModelMetadata", "inference.ModelMetadataRequest", "unary_unary"),
    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest", "unary_unary"),
    ("/grpc.health.v1.Health/Watch", "grpc.health.v1.HealthCheckRequest", "unary_stream"),
]


def raw_call(channel, method: str, kind: str, payload: bytes, timeout: float = 10):
    """Send `payload` as the request message's bytes; returns the responses' bytes."""
    call = getattr(channel, kind)(method)  # no serializers: bytes in, bytes out
    if kind == "unary_unary":
        return [call(payload, timeout=timeout)]
    if kind == "unary_stream":
        return list(call(payload, timeout=timeout))
    return list(call(iter([payload]), timeout=timeout))


@pytest.mark.parametrize("method,message,kind", UNDECODABLE, ids=[u[0].rsplit("/", 1)[1] for u in UNDECODABLE])
@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\xff", b"\x0a\x03\xff\xfe\xfd"],
                         ids=["corrupt", "truncated", "bad-utf8"])
def test_undecodable_request(server, channel, method, message, kind, payload):
    with pytest.raises(grpc.RpcError) as err:
        raw_call(channel, method, kind, payload)
    check_error(err.value, INVALID, ("request", message, method))
    stub = llm_pb2_grpc.LLMStub(channel)
    assert stub.Generate(gen({"max_tokens": 2}), timeout=30).completion_tokens >= 1


def test_undecodable_message_ends_a_kserve_stream(server, channel):
    """A request stream whose second message does not parse: the first is answered,
    then the call ends with INVALID_ARGUMENT (and the server does not hang on it)."""
    good = infer_request(HELLO, scalar("max_tokens", 2, np.int32))
    good.id = "before-the-bad-one"
    call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                 response_deserializer=pb.ModelStreamInferResponse.FromString)
    answers = []
    with pytest.raises(grpc.RpcError) as err:
        for answer in call(iter([good.SerializeToString(), b"\xff\xff\xff"]), timeout=30):
            answers.append(answer)
    check_error(err.value, INVALID, ("request", "inference.ModelInferRequest"))
    assert len(events_for(server.sink, "before-the-bad-one")) <= 1


# -- sizes of free-form inputs ------------------------------------------------------------

L = Limits()
LONG_ID = "i" * (L.max_id_chars + 1)
LONG_NAME = "n" * (L.max_name_chars + 1)
MANY_ATTRIBUTES = {f"a{i}": "x" for i in range(L.max_attributes + 1)}
LONG_KEY, LONG_VALUE = "k" * (L.max_attribute_chars + 1), "v" * (L.max_attribute_chars + 1)
SIZE_CASES = [  # case, method, request, the field and the limit the message names
    ("request_id", "Generate", gen(request_id=LONG_ID), ("request_id", str(L.max_id_chars))),
    ("routing_key", "Generate", gen(routing_key=LONG_ID), ("routing_key", str(L.max_id_chars))),
    ("model", "Generate", gen(model=LONG_NAME), ("model", str(L.max_name_chars))),
    ("version", "Generate", gen(version=LONG_NAME), ("version", str(L.max_name_chars))),
    ("attributes count", "Generate", gen(attributes=MANY_ATTRIBUTES), ("attributes", str(L.max_attributes))),
    ("attribute name", "Generate", gen(attributes={LONG_KEY: "x"}), ("attributes[", str(L.max_attribute_chars))),
    ("attribute value", "Generate", gen(attributes={"plan": LONG_VALUE}),
     ("attributes[plan]", str(L.max_attribute_chars))),
    ("stop count", "Generate", gen({"stop": [f"s{i}" for i in range(L.max_stop + 1)]}), ("stop", str(L.max_stop))),
    ("stop length", "Generate", gen({"stop": ["s" * (L.max_stop_chars + 1)]}), ("stop", str(L.max_stop_chars))),
    ("chat messages", "Generate", gen(chat=chat(*[("user", "a")] * (L.max_messages + 1))),
     ("chat.messages", str(L.max_messages))),
    ("chat content", "Generate", gen(chat=chat(("user", "a" * 150), ("user", "b" * 150))),
     ("chat.messages", str(MAX_PROMPT_CHARS))),
    ("stream: request_id", "GenerateStream", gen(request_id=LONG_ID), ("request_id", str(L.max_id_chars))),
    ("classify: request_id", "Classify", cls(LABELS, request_id=LONG_ID), ("request_id", str(L.max_id_chars))),
    ("classify: routing_key", "Classify", cls(LABELS, routing_key=LONG_ID), ("routing_key", str(L.max_id_chars))),
    ("classify: attributes", "Classify", cls(LABELS, attributes=MANY_ATTRIBUTES),
     ("attributes", str(L.max_attributes))),
    ("feedback: request_id", "Feedback", llm_pb2.FeedbackRequest(request_id=LONG_ID, model=MODEL, label="x"),
     ("request_id", str(L.max_id_chars))),
    ("feedback: model", "Feedback", llm_pb2.FeedbackRequest(request_id="r1", model=LONG_NAME, label="x"),
     ("model", str(L.max_name_chars))),
    ("feedback: version", "Feedback",
     llm_pb2.FeedbackRequest(request_id="r1", model=MODEL, version=LONG_NAME, label="x"),
     ("version", str(L.max_name_chars))),
    ("feedback: label", "Feedback",
     llm_pb2.FeedbackRequest(request_id="r1", model=MODEL, label="l" * (L.max_label_chars + 1)),
     ("label", str(L.max_label_chars))),
    ("feedback: comment", "Feedback",
     llm_pb2.FeedbackRequest(request_id="r1", model=MODEL, score=1.0, comment="c" * (L.max_comment_chars + 1)),
     ("comment", str(L.max_comment_chars))),
]


def kserve_params(request: pb.ModelInferRequest, **params: str) -> pb.ModelInferRequest:
    for name, value in params.items():
        request.parameters[name].string_param = value
    return request


KSERVE_SIZE_CASES = [
    ("id", pb.ModelInferRequest(model_name=MODEL, id=LONG_ID), ("id", str(L.max_id_chars))),
    ("routing_key", kserve_params(pb.ModelInferRequest(model_name=MODEL), routing_key=LONG_ID),
     ("routing_key", str(L.max_id_chars))),
    ("model_name", pb.ModelInferRequest(model_name=LONG_NAME), ("model", str(L.max_name_chars))),
    ("attributes count", kserve_params(pb.ModelInferRequest(model_name=MODEL),
                                       **{f"attribute.{k}": v for k, v in MANY_ATTRIBUTES.items()}),
     ("attribute", str(L.max_attributes))),
    ("attribute value", kserve_params(pb.ModelInferRequest(model_name=MODEL), **{"attribute.plan": LONG_VALUE}),
     ("parameters[attribute.plan]", str(L.max_attribute_chars))),
    ("stop count", infer_request(HELLO, tensor("stop", "BYTES", [L.max_stop + 1],
                                               el(*[b"s%d" % i for i in range(L.max_stop + 1)]))),
     ("stop", str(L.max_stop))),
    ("sampling_parameters length", infer_request(HELLO, json_params(b'{"stop": "%s"}' % (b"s" * L.max_json_chars))),
     ("sampling_parameters", str(L.max_json_chars))),
]


def check_size_error(server, err: grpc.RpcError, fields, request: bool) -> None:
    check_error(err, INVALID, fields)
    assert len(err.details()) < 500, err.details()  # the message never carries the oversized input
    if request:  # one event, without the oversized input either
        deadline = time.monotonic() + 5
        while not (found := [e for e in server.sink.events(INFERENCE_TOPIC) if e["error"] == err.details()]):
            assert time.monotonic() < deadline, "no event"
            time.sleep(0.01)
        assert found[-1]["status"] == "invalid_argument"
        assert len(str(found[-1])) < 4000


@pytest.mark.parametrize("case,method,request_,fields", SIZE_CASES, ids=[c[0] for c in SIZE_CASES])
def test_llm_input_sizes(server, channel, case, method, request_, fields):
    stub = llm_pb2_grpc.LLMStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        result = getattr(stub, method)(request_, timeout=30)
        if method == "GenerateStream":
            list(result)
    check_size_error(server, err.value, fields, request=method != "Feedback")
    assert stub.Generate(gen({"max_tokens": 2}, request_id="i" * L.max_id_chars, routing_key="k" * L.max_id_chars,
                             attributes={f"a{i}": "v" * L.max_attribute_chars for i in range(L.max_attributes)}),
                         timeout=30).completion_tokens >= 1


@pytest.mark.parametrize("case,request_,fields", KSERVE_SIZE_CASES, ids=[c[0] for c in KSERVE_SIZE_CASES])
def test_kserve_input_sizes(server, channel, case, request_, fields):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest()
    request.CopyFrom(request_)
    if not request.inputs:
        request.MergeFrom(infer_request(HELLO, model=request.model_name))
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=30)
    check_size_error(server, err.value, fields, request=True)
    good = kserve_params(infer_request(HELLO, scalar("max_tokens", 2, np.int32)), routing_key="k" * L.max_id_chars)
    good.id = "i" * L.max_id_chars
    assert stub.ModelInfer(good, timeout=30).model_name == MODEL


def test_repository_load_config_nested_too_deeply(server, channel):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
    request = pb.RepositoryModelLoadRequest(model_name="another")
    request.parameters["config"].string_param = '{"version": ' + "[" * 3000 + "]" * 3000 + "}"
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(request, timeout=30)
    check_error(err.value, INVALID, ("parameters[config]", "deep"))
