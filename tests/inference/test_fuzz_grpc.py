"""The gRPC inputs, fuzzed against a real server on loopback (the tiny model): random
GenerateRequest, ClassifyRequest, FeedbackRequest and ModelInferRequest fields (odd and
huge strings, NaN and infinite floats, ints at their extremes, KServe tensors of any
datatype, shape and contents) and random bytes as any method's request. No answer is
INTERNAL or UNKNOWN, none hangs, no error message carries an oversized input back, and
the server answers a good request afterwards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from inference.api.kserve import INPUTS, NUMERIC, OUTPUTS
from inference.api.limits import Limits
from inference.api.options import EngineOptions
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc, llm_pb2, llm_pb2_grpc

MODEL = "tiny"
# derandomize: the suite sees the same inputs every run (explore with a larger max_examples by hand)
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
TIMEOUT = 60  # seconds: far beyond any answer of the tiny model; reaching it is a hang
MAX_MESSAGE = 16 << 20  # the server's grpc.max_receive_message_length


@pytest.fixture(scope="module")
def server(start_server, tiny_llama):
    return start_server(model=str(tiny_llama), model_name=MODEL, quantize="none",
                        limits=Limits(max_prompt_chars=2000, max_tokens=8),
                        engine=EngineOptions(kv_slots=4, max_seq_len=256, max_waiting=64))


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", MAX_MESSAGE)]) as ch:
        yield ch


def sendable(*messages) -> None:
    assume(all(m.ByteSize() < MAX_MESSAGE for m in messages))


def outcome(call, expected=EXPECTED):
    """Run `call`; the status code it ended with, checked to be OK or an expected error."""
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() in expected, (err.code(), err.details())
        assert len(err.details()) < 1000, err.details()[:300]
        return err.code()
    return grpc.StatusCode.OK


def still_serves(channel) -> None:
    stub = llm_pb2_grpc.LLMStub(channel)
    reply = stub.Generate(llm_pb2.GenerateRequest(model=MODEL, prompt="Hello",
                                                  sampling=llm_pb2.SamplingParams(max_tokens=2)), timeout=TIMEOUT)
    assert reply.completion_tokens >= 1


# -- strategies --------------------------------------------------------------------------

characters = st.characters(blacklist_categories=("Cs",))  # protobuf strings are valid UTF-8
short_text = st.text(characters, max_size=20)
huge_text = st.builds(lambda s, n: (s or "x") * n, st.text(characters, min_size=1, max_size=3),
                      st.sampled_from([257, 4097, 40_000, 1_000_000]))
texts = st.one_of(short_text, short_text, huge_text, st.sampled_from(["", "Hello", "\x00", "é" * 300, "💥" * 50]))
models = st.one_of(st.just(MODEL), st.just(MODEL), st.just(MODEL), texts)
versions = st.one_of(st.just(""), st.just(""), st.just("1"), texts)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
floats64 = st.floats(allow_nan=True, allow_infinity=True)
uint32 = st.one_of(st.integers(0, 16), st.integers(0, 2 ** 32 - 1))
uint64 = st.one_of(st.integers(0, 16), st.integers(0, 2 ** 64 - 1))
attributes = st.dictionaries(texts, texts, max_size=40)


@st.composite
def chats(draw):
    roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), texts)
    messages = draw(st.lists(st.builds(llm_pb2.ChatMessage, role=roles, content=texts), max_size=300))
    return llm_pb2.Chat(messages=messages)


@st.composite
def sampling(draw):
    s = llm_pb2.SamplingParams(max_tokens=draw(uint32), temperature=draw(floats32), top_k=draw(uint32),
                               stop=draw(st.lists(texts, max_size=20)), ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        s.top_p = draw(floats32)
    if draw(st.booleans()):
        s.seed = draw(uint64)
    return s


@st.composite
def generate_requests(draw):
    r = llm_pb2.GenerateRequest(model=draw(models), version=draw(versions), sampling=draw(sampling()),
                                routing_key=draw(texts), request_id=draw(texts), attributes=draw(attributes))
    if draw(st.booleans()):
        r.prompt = draw(texts)
    elif draw(st.booleans()):
        r.chat.CopyFrom(draw(chats()))
    return r


@st.composite
def classify_requests(draw):
    r = llm_pb2.ClassifyRequest(model=draw(models), version=draw(versions), labels=draw(st.lists(texts, max_size=40)),
                                routing_key=draw(texts), request_id=draw(texts), attributes=draw(attributes))
    if draw(st.booleans()):
        r.text = draw(texts)
    elif draw(st.booleans()):
        r.chat.CopyFrom(draw(chats()))
    return r


@st.composite
def feedback_requests(draw):
    r = llm_pb2.FeedbackRequest(request_id=draw(texts), model=draw(models), version=draw(versions))
    truth = draw(st.sampled_from(["label", "score", None]))
    if truth == "label":
        r.label = draw(texts)
    elif truth == "score":
        r.score = draw(floats64)
    if draw(st.booleans()):
        r.comment = draw(texts)
    return r


DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES", "BF16", ""]
CONTENT_VALUES = {  # InferTensorContents field -> its values
    "bool_contents": st.booleans(), "int_contents": st.integers(-2 ** 31, 2 ** 31 - 1),
    "int64_contents": st.integers(-2 ** 63, 2 ** 63 - 1), "uint_contents": st.integers(0, 2 ** 32 - 1),
    "uint64_contents": st.integers(0, 2 ** 64 - 1), "fp32_contents": floats32, "fp64_contents": floats64,
    "bytes_contents": st.one_of(texts.map(lambda t: t.encode()), st.binary(max_size=40)),
}


def bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


@st.composite
def raw_contents(draw, datatype: str) -> bytes:
    """Random bytes, or well-formed ones for the datatype (BYTES elements, numbers)."""
    kind = draw(st.sampled_from(["random", "formed", "formed"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if datatype == "BYTES":
        return bytes_elements(draw(st.lists(CONTENT_VALUES["bytes_contents"], max_size=20)))
    np_dtype, field = NUMERIC.get(datatype, (np.int32, "int_contents"))
    return np.array(draw(st.lists(CONTENT_VALUES[field], max_size=4)), dtype=np_dtype).tobytes()


@st.composite
def tensors(draw):
    name = draw(st.one_of(st.sampled_from(list(INPUTS)), texts))
    datatype = draw(st.one_of(st.sampled_from(INPUTS.get(name, ("BYTES",))), st.sampled_from(DATATYPES), texts))
    shape = draw(st.one_of(st.sampled_from([[1], [1, 1], [], [2], [0]]),
                           st.lists(st.integers(-2 ** 63, 2 ** 63 - 1), max_size=4)))
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    if draw(st.booleans()):
        field = draw(st.sampled_from(list(CONTENT_VALUES)))
        getattr(tensor.contents, field).extend(draw(st.lists(CONTENT_VALUES[field], max_size=20)))
    return tensor, draw(raw_contents(datatype))


def parameter(draw) -> pb.InferParameter:
    p = pb.InferParameter()
    kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"]))
    value = {"bool_param": st.booleans(), "int64_param": st.integers(-2 ** 63, 2 ** 63 - 1),
             "string_param": texts, "double_param": floats64, "uint64_param": uint64}[kind]
    setattr(p, kind, draw(value))
    return p


@st.composite
def infer_requests(draw):
    r = pb.ModelInferRequest(model_name=draw(models), model_version=draw(versions), id=draw(texts))
    good_prompt = pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
    chosen = draw(st.lists(tensors(), max_size=5))
    if draw(st.booleans()):  # mostly a prompt that passes, so the other inputs are what is tested
        chosen.insert(0, (good_prompt, bytes_elements([draw(texts).encode()])))
    raw = draw(st.sampled_from(["raw", "raw", "typed", "some"]))
    for tensor, contents in chosen:
        r.inputs.append(tensor)
        if raw != "typed":
            r.raw_input_contents.append(contents)
    if raw == "some":
        del r.raw_input_contents[draw(st.integers(0, len(chosen))):]
    if draw(st.booleans()):
        json_value = draw(st.one_of(texts, st.sampled_from(['{"temperature": "0.5"}', '{"stop": ["a", 1]}',
                                                            '{"max_tokens": 1e999}', '[' * 3000 + ']' * 3000])))
        r.inputs.append(pb.ModelInferRequest.InferInputTensor(name="sampling_parameters", datatype="BYTES", shape=[1]))
        if r.raw_input_contents or raw == "raw":
            r.raw_input_contents.append(bytes_elements([json_value.encode()]))
        else:
            r.inputs[-1].contents.bytes_contents.append(json_value.encode())
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(["routing_key", "attribute.plan", "attribute."]), texts))
        r.parameters[key].CopyFrom(parameter(draw))
    for name in draw(st.lists(st.one_of(st.sampled_from(list(OUTPUTS)), texts), max_size=3)):
        r.outputs.add(name=name)
    return r


# -- the fuzzing -------------------------------------------------------------------------


def test_generate(server, channel):
    stub = llm_pb2_grpc.LLMStub(channel)

    @FUZZ
    @given(request=generate_requests(), stream=st.booleans())
    def check(request, stream):
        sendable(request)
        if stream:
            outcome(lambda: list(stub.GenerateStream(request, timeout=TIMEOUT)))
        else:
            outcome(lambda: stub.Generate(request, timeout=TIMEOUT))
    check()
    still_serves(channel)


def test_classify(server, channel):
    stub = llm_pb2_grpc.LLMStub(channel)

    @FUZZ
    @given(request=classify_requests())
    def check(request):
        sendable(request)
        outcome(lambda: stub.Classify(request, timeout=TIMEOUT))
    check()
    still_serves(channel)


def test_feedback(server, channel):
    stub = llm_pb2_grpc.LLMStub(channel)

    @FUZZ
    @given(request=feedback_requests())
    def check(request):
        sendable(request)
        outcome(lambda: stub.Feedback(request, timeout=TIMEOUT))
    check()
    still_serves(channel)


def test_model_infer(server, channel):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

    @FUZZ
    @given(request=infer_requests())
    def check(request):
        sendable(request)
        outcome(lambda: stub.ModelInfer(request, timeout=TIMEOUT))
    check()
    still_serves(channel)


def test_model_stream_infer(server, channel):
    """Errors of a stream's requests come back in-band, never as INTERNAL."""
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

    @FUZZ
    @given(requests=st.lists(infer_requests(), min_size=1, max_size=3))
    def check(requests):
        sendable(*requests)
        answers = []
        assert outcome(lambda: answers.extend(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT))) \
            == grpc.StatusCode.OK
        for a in answers:
            assert not a.error_message or a.error_message.startswith(("INVALID_ARGUMENT:", "NOT_FOUND:")), \
                a.error_message[:300]
            assert len(a.error_message) < 1000
    check()
    still_serves(channel)


# a well-formed request to these waits for a change of status, or loads a model (the demo by default)
LEFT_OUT = {"Watch", "RepositoryModelLoad", "LoadVersion"}


def methods():
    """Every method of the served services but LEFT_OUT: (path, client streaming, server streaming)."""
    services = [pb.DESCRIPTOR.services_by_name["GRPCInferenceService"], llm_pb2.DESCRIPTOR.services_by_name["LLM"],
                health_pb2.DESCRIPTOR.services_by_name["Health"]]
    return [(f"/{s.full_name}/{m.name}", m.client_streaming, m.server_streaming)
            for s in services for m in s.methods if m.name not in LEFT_OUT]


def test_random_bytes_to_every_method(server, channel):
    expected = EXPECTED | {grpc.StatusCode.UNIMPLEMENTED}  # grpc's health servicer has no List

    @FUZZ
    @given(method=st.sampled_from(methods()), payload=st.binary(max_size=200))
    def check(method, payload):
        path, client_streaming, server_streaming = method
        kind = f"{'stream' if client_streaming else 'unary'}_{'stream' if server_streaming else 'unary'}"
        call = getattr(channel, kind)(path)  # no serializers: the bytes go as they are
        if client_streaming:
            outcome(lambda: list(call(iter([payload]), timeout=TIMEOUT)), expected)
        elif server_streaming:
            outcome(lambda: list(call(payload, timeout=TIMEOUT)), expected)
        else:
            outcome(lambda: call(payload, timeout=TIMEOUT), expected)
    check()
    still_serves(channel)
