"""The Open Inference Protocol as a client nobody here wrote sees it: tritonclient.grpc
against the demo model; RepositoryModelLoad/Unload also through our own stub."""

from __future__ import annotations

import json
import queue
import time
import uuid

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from inference.api.events import INFERENCE_TOPIC
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc, llm_pb2, llm_pb2_grpc

DEMO = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
STORY = "Once upon a time, in a small village by the sea,"


@pytest.fixture(scope="module")
def client(demo_server):
    c = tc.InferenceServerClient(demo_server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def question(demo_server) -> str:
    """The chat-templated question, as Triton users send it (templating is the client's job)."""
    tok = demo_server.server.router.get(DEMO, "1").tokenizer
    return tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)


def inputs(prompt: str, shape=(1,), **extra) -> list[tc.InferInput]:
    text = np.array([prompt.encode()], dtype=np.object_).reshape(shape)
    tensors = [tc.InferInput("text_input", list(shape), "BYTES")]
    tensors[0].set_data_from_numpy(text)
    types = {np.int32: "INT32", np.bool_: "BOOL", np.float32: "FP32", np.object_: "BYTES", np.uint64: "UINT64"}
    for name, value in extra.items():
        arr = np.array([value])
        if isinstance(value, bool):
            arr = arr.astype(np.bool_)
        elif isinstance(value, int):
            arr = arr.astype(np.int32)
        elif isinstance(value, float):
            arr = arr.astype(np.float32)
        else:
            arr = np.array([json.dumps(value).encode() if isinstance(value, dict) else value.encode()],
                           dtype=np.object_)
        t = tc.InferInput(name, [1], types[arr.dtype.type])
        t.set_data_from_numpy(arr)
        tensors.append(t)
    return tensors


def outputs(*names: str) -> list[tc.InferRequestedOutput]:
    return [tc.InferRequestedOutput(n) for n in names]


def text_of(result) -> str:
    return result.as_numpy("text_output")[0].decode()


def one_event(sink, request_id: str, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while not [e for e in sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id]:
        assert time.monotonic() < deadline, f"no event for {request_id}"
        time.sleep(0.01)
    time.sleep(0.05)
    found = [e for e in sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id]
    assert len(found) == 1
    return found[0]


# -- health and metadata -------------------------------------------------------------


def test_server_and_model_state(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(DEMO)
    assert client.is_model_ready(DEMO, "1")
    assert not client.is_model_ready(DEMO, "7")
    assert not client.is_model_ready("no-such-model")


def test_server_metadata(client):
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "vigil" and meta["version"]
    assert "model_repository" in meta["extensions"]


def test_model_metadata_and_config(client):
    meta = client.get_model_metadata(DEMO, as_json=True)
    assert meta["name"] == DEMO and meta["versions"] == ["1"]
    ins = {t["name"]: t for t in meta["inputs"]}
    outs = {t["name"]: t for t in meta["outputs"]}
    assert ins["text_input"]["datatype"] == "BYTES"
    assert ins["max_tokens"]["datatype"] == "INT32"
    assert ins["stream"]["datatype"] == "BOOL"
    assert {"temperature", "top_p", "top_k", "exclude_input_in_output", "sampling_parameters"} <= set(ins)
    assert outs["text_output"]["datatype"] == "BYTES"
    assert {"finish_reason", "num_input_tokens", "num_output_tokens", "cumulative_logprob"} <= set(outs)

    config = client.get_model_config(DEMO, as_json=True)["config"]
    assert config["name"] == DEMO
    cin = {i["name"]: i for i in config["input"]}
    assert cin["text_input"]["data_type"] == "TYPE_STRING" and not cin["text_input"].get("optional", False)
    assert cin["max_tokens"]["optional"] is True
    assert config["model_transaction_policy"]["decoupled"] is True

    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-model")
    assert "NOT_FOUND" in str(err.value.status()) and "model" in err.value.message()


# -- ModelInfer ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=["shape1", "shape1x1"])
def test_infer_answers_paris(client, demo_server, question, shape):
    request_id = f"k-{uuid.uuid4()}"
    result = client.infer(DEMO, inputs(question, shape, max_tokens=32, exclude_input_in_output=True),
                          request_id=request_id,
                          outputs=outputs("text_output", "finish_reason", "num_input_tokens",
                                          "num_output_tokens", "cumulative_logprob"))
    text = text_of(result)
    assert "Paris" in text and not text.startswith("<|im_start|>")
    assert result.as_numpy("finish_reason")[0] == b"stop"
    n_in, n_out = int(result.as_numpy("num_input_tokens")[0]), int(result.as_numpy("num_output_tokens")[0])
    tok = demo_server.server.router.get(DEMO, "1").tokenizer
    assert n_in == len(tok.encode(question))
    assert 0 < n_out <= 32
    assert result.as_numpy("num_output_tokens").dtype == np.int32
    assert float(result.as_numpy("cumulative_logprob")[0]) < 0
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (DEMO, "1", request_id)
    assert response.parameters["triton_final_response"].bool_param
    # the event is recorded before the answer leaves
    ev = [e for e in demo_server.sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id]
    assert len(ev) == 1 and ev[0]["method"] == "ModelInfer" and ev[0]["status"] == "ok"
    assert (ev[0]["prompt_tokens"], ev[0]["completion_tokens"]) == (n_in, n_out)


def test_infer_same_answer_as_generate_and_echoes_input(client, demo_server, question):
    with grpc.insecure_channel(demo_server.address) as channel:
        native = llm_pb2_grpc.LLMStub(channel).Generate(llm_pb2.GenerateRequest(
            model=DEMO, prompt=question, sampling=llm_pb2.SamplingParams(max_tokens=32)), timeout=120)
    excluded = client.infer(DEMO, inputs(question, max_tokens=32, exclude_input_in_output=True))
    assert text_of(excluded) == native.text
    # default: the prompt comes back in front of the completion (as Triton's LLM backends)
    echoed = client.infer(DEMO, inputs(question, max_tokens=32))
    assert text_of(echoed) == question + native.text
    # only the requested outputs come back
    only = client.infer(DEMO, inputs(question, max_tokens=4), outputs=outputs("num_output_tokens"))
    assert [o.name for o in only.get_response().outputs] == ["num_output_tokens"]
    assert int(only.as_numpy("num_output_tokens")[0]) == 4


def test_sampling_parameters_json(client, demo_server):
    params = {"temperature": 0.9, "seed": 7, "max_tokens": 12, "top_p": 0.95}
    a = client.infer(DEMO, inputs(STORY, exclude_input_in_output=True, sampling_parameters=params),
                     outputs=outputs("text_output", "num_output_tokens", "finish_reason"))
    b = client.infer(DEMO, inputs(STORY, exclude_input_in_output=True, sampling_parameters=params))
    assert text_of(a) == text_of(b)
    assert int(a.as_numpy("num_output_tokens")[0]) == 12 and a.as_numpy("finish_reason")[0] == b"length"
    # the same sampling through the native service gives the same text
    with grpc.insecure_channel(demo_server.address) as channel:
        native = llm_pb2_grpc.LLMStub(channel).Generate(llm_pb2.GenerateRequest(
            model=DEMO, prompt=STORY, sampling=llm_pb2.SamplingParams(
                max_tokens=12, temperature=0.9, seed=7, top_p=0.95)), timeout=120)
    assert native.text == text_of(a)
    # typed tensors win over the JSON; a stop string from the JSON cuts the text
    greedy = text_of(client.infer(DEMO, inputs(STORY, max_tokens=16, exclude_input_in_output=True)))
    stop = greedy.split()[2]
    cut = client.infer(DEMO, inputs(STORY, exclude_input_in_output=True, max_tokens=16,
                                    sampling_parameters={"stop": stop, "max_tokens": 2}),
                       outputs=outputs("text_output", "finish_reason"))
    assert text_of(cut) == greedy[:greedy.find(stop)]
    assert cut.as_numpy("finish_reason")[0] == b"stop"


def test_typed_scalars_and_routing_parameter(client):
    greedy = text_of(client.infer(DEMO, inputs(STORY, max_tokens=8, exclude_input_in_output=True)))
    top1 = client.infer(DEMO, inputs(STORY, max_tokens=8, exclude_input_in_output=True, top_k=1,
                                     temperature=1.3, seed=3), parameters={"routing_key": "user-1"})
    assert text_of(top1) == greedy
    assert top1.get_response().model_version == "1"


# -- ModelStreamInfer ------------------------------------------------------------------


def stream_infer(client, prompt: str, request_id: str, **extra) -> list:
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(DEMO, inputs(prompt, **extra), request_id=request_id,
                                  outputs=outputs("text_output", "finish_reason", "num_output_tokens"))
        got = []
        while True:
            result, error = results.get(timeout=120)
            got.append((result, error))
            if error is not None:
                return got
            if result.get_response().parameters["triton_final_response"].bool_param:
                return got
    finally:
        client.stop_stream()


def test_stream_infer(client, demo_server, question):
    whole = client.infer(DEMO, inputs(question, max_tokens=32, exclude_input_in_output=True),
                         outputs=outputs("text_output", "num_output_tokens"))
    request_id = f"s-{uuid.uuid4()}"
    got = stream_infer(client, question, request_id, max_tokens=32, stream=True)
    assert all(error is None for _, error in got)
    results = [r for r, _ in got]
    assert len(results) > 3
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
    assert finals == [False] * (len(results) - 1) + [True]
    streamed = "".join(text_of(r) for r in results)
    assert streamed == text_of(whole) and "Paris" in streamed
    last = results[-1]
    assert last.as_numpy("finish_reason")[0] == b"stop"
    assert int(last.as_numpy("num_output_tokens")[0]) == int(whole.as_numpy("num_output_tokens")[0])
    for r in results:
        assert r.get_response().id == request_id and r.get_response().model_name == DEMO
    ev = one_event(demo_server.sink, request_id)
    assert (ev["method"], ev["status"], ev["finish_reason"]) == ("ModelStreamInfer", "ok", "stop")


def test_stream_infer_without_stream_flag_gives_one_response(client, question):
    got = stream_infer(client, question, "single", max_tokens=32, exclude_input_in_output=True)
    assert len(got) == 1 and got[0][1] is None
    assert "Paris" in text_of(got[0][0])


def test_stream_infer_errors_come_back_in_band(client, demo_server):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("no-such-model", inputs("hi"), request_id="bad-model")
        client.async_stream_infer(DEMO, inputs("hi", max_tokens=-1), request_id="bad-max")
        client.async_stream_infer(DEMO, inputs("Hello", max_tokens=2, stream=True), request_id="good")
        got = [results.get(timeout=60) for _ in range(2)]
        errors = sorted(str(e) for _, e in got if e is not None)
        assert len(errors) == 2, got
        assert any("NOT_FOUND" in e and "model" in e for e in errors), errors
        assert any("INVALID_ARGUMENT" in e and "max_tokens" in e for e in errors), errors
        # the stream is still usable: the good request finishes
        deadline = time.monotonic() + 60
        while True:
            result, error = results.get(timeout=60)
            assert error is None
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            assert time.monotonic() < deadline
    finally:
        client.stop_stream()
    assert one_event(demo_server.sink, "bad-model")["status"] == "not_found"
    assert one_event(demo_server.sink, "bad-max")["status"] == "invalid_argument"
    assert one_event(demo_server.sink, "good")["status"] == "ok"


# -- repository --------------------------------------------------------------------------


def test_repository_load_and_unload_with_tritonclient(client, tiny_llama):
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": DEMO, "version": "1", "state": "READY"} in index
    assert not client.is_model_ready("tiny-extra")

    client.load_model("tiny-extra", config=json.dumps({"source": str(tiny_llama), "version": "3"}))
    assert client.is_model_ready("tiny-extra", "3")
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "tiny-extra", "version": "3", "state": "READY"} in index
    result = client.infer("tiny-extra", inputs("The quick brown fox", max_tokens=3),
                          outputs=outputs("num_output_tokens"))
    assert int(result.as_numpy("num_output_tokens")[0]) == 3
    assert result.get_response().model_version == "3"

    with pytest.raises(InferenceServerException) as err:  # already loaded
        client.load_model("tiny-extra", config=json.dumps({"source": str(tiny_llama), "version": "3"}))
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "version" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.load_model("tiny-bad", config=json.dumps({"source": str(tiny_llama), "quantize": "int3"}))
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "quantize" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.load_model("tiny-bad", config="{not json")
    assert "INVALID_ARGUMENT" in str(err.value.status()) and "config" in err.value.message()

    client.unload_model("tiny-extra")
    assert not client.is_model_ready("tiny-extra")
    assert all(m["name"] != "tiny-extra" for m in client.get_model_repository_index(as_json=True)["models"])
    with pytest.raises(InferenceServerException) as err:
        client.unload_model("tiny-extra")
    assert "NOT_FOUND" in str(err.value.status())
    assert client.is_model_ready(DEMO)


def test_repository_load_and_unload_with_parameters(demo_server, tiny_llama):
    def param(v: str) -> pb.ModelRepositoryParameter:
        return pb.ModelRepositoryParameter(string_param=v)

    with grpc.insecure_channel(demo_server.address) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for version, quantize in (("a", "none"), ("b", "int8")):
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(
                model_name="tiny-params", parameters={"source": param(str(tiny_llama)), "version": param(version),
                                                      "quantize": param(quantize)}), timeout=120)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        assert {(m.name, m.version) for m in index.models if m.name == "tiny-params"} == \
            {("tiny-params", "a"), ("tiny-params", "b")}
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny-params", version="b")).ready
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(
            model_name="tiny-params", parameters={"version": param("a")}), timeout=60)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny-params", version="a")).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="tiny-params", version="b")).ready
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(
                model_name="tiny-params", parameters={"source": param("/no/such/folder"), "version": param("c")}),
                timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "source" in err.value.details()
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="tiny-params"), timeout=60)
        assert not stub.ModelReady(pb.ModelReadyRequest(name="tiny-params")).ready
