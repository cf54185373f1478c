"""The scheduler seen from outside: continuous batching, overload, cancellation and
deadlines, on small random Llamas whose answers do not matter (only that they are
deterministic and long enough)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from tests.helpers.models import make_tiny_llama
from inference.api.events import INFERENCE_TOPIC
from inference.api.options import EngineOptions
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc, llm_pb2, llm_pb2_grpc

MODEL = "slow"
LONG = 480  # tokens: about a second on 2 cores, long enough to act while it runs


@pytest.fixture(scope="module")
def slow_llama(tmp_path_factory):
    """A random Llama a few times bigger than `tiny_llama` (a few ms per decode step), whose
    end-of-sequence token never wins under greedy decoding, so generations run to max_tokens."""
    folder = make_tiny_llama(tmp_path_factory.mktemp("slow-llama"), hidden=256, layers=4, intermediate=768)
    eos = json.loads((folder / "tokenizer.json").read_text())
    eos_id = next(t["id"] for t in eos["added_tokens"] if t["content"] == "<|im_end|>")
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"][eos_id] = 0.0
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def serve(start_server, folder, **engine):
    return start_server(model=str(folder), model_name=MODEL, quantize="none",
                        engine=EngineOptions(max_seq_len=512, **engine))


@pytest.fixture(scope="module")
def batch_server(start_server, slow_llama):
    return serve(start_server, slow_llama, kv_slots=4, max_waiting=8)


@pytest.fixture(scope="module")
def tight_server(start_server, slow_llama):
    return serve(start_server, slow_llama, kv_slots=1, max_waiting=1)


def engine_of(server):
    return server.server.router.get(MODEL, "1").engine


def request(prompt="Hello", max_tokens=LONG, request_id="", **kw) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(model=MODEL, prompt=prompt, request_id=request_id,
                                   sampling=llm_pb2.SamplingParams(max_tokens=max_tokens), **kw)


def wait_for(condition, timeout: float = 5.0, interval: float = 0.002) -> float:
    """Seconds until condition() held; fails after timeout."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not reached"
        time.sleep(interval)
    return time.monotonic() - start


def wait_idle(server, timeout: float = 5.0) -> float:
    engine = engine_of(server)
    slots = engine.cache.slots
    return wait_for(lambda: len(engine.free_slots) == slots and not engine.running and not engine.waiting,
                    timeout)


def assert_engine_stopped(server, quiet: float = 0.3) -> None:
    """No decode step runs any more (the engine thread sleeps when it has nothing to do)."""
    engine = engine_of(server)
    time.sleep(0.05)  # the step that freed the slot may still be finishing
    steps = engine.stats.steps
    time.sleep(quiet)
    assert engine.stats.steps == steps
    assert engine.stats.running == 0 and engine.stats.kv_tokens_used == 0


def event_of(server, request_id: str, timeout: float = 5.0) -> dict:
    found = []

    def seen():
        found[:] = [e for e in server.sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id]
        return found
    wait_for(seen, timeout)
    time.sleep(0.05)
    seen()
    assert len(found) == 1
    return found[0]


def gauges(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples
            if s.labels.get("model") == MODEL}


# -- continuous batching -----------------------------------------------------------------


def test_continuous_batching(batch_server):
    prompts = ["Hello", "The quick brown fox jumps", "Once upon a time there was", "What is the capital",
               "Paris is the capital of France."]
    budgets = [60, 240, 200, 160, 120]
    with grpc.insecure_channel(batch_server.address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        solo = [stub.Generate(request(p, n), timeout=60).text for p, n in zip(prompts, budgets)]
        wait_idle(batch_server)

        engine = engine_of(batch_server)
        seen = {"batch": [], "waiting": [], "metric_batch": [], "metric_running": [], "metric_kv": []}
        done = threading.Event()

        def monitor():
            while not done.is_set():
                seen["batch"].append(engine.stats.batch_size)
                seen["waiting"].append(engine.stats.waiting)
                g = gauges(batch_server.metrics_url)
                seen["metric_batch"].append(g["vigil_batch_size"])
                seen["metric_running"].append(g["vigil_num_requests_running"])
                seen["metric_kv"].append(g["vigil_kv_cache_usage_ratio"])
                time.sleep(0.005)

        results: list = [None] * len(prompts)
        first_at = [0.0] * len(prompts)
        final_at = [0.0] * len(prompts)

        def run(i):
            msgs = []
            for m in stub.GenerateStream(request(prompts[i], budgets[i], request_id=f"batch-{i}"), timeout=60):
                if not msgs:
                    first_at[i] = time.monotonic()
                msgs.append(m)
            final_at[i] = time.monotonic()
            results[i] = msgs

        watcher = threading.Thread(target=monitor)
        watcher.start()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        watcher.join()

    for i, msgs in enumerate(results):
        assert msgs is not None, f"stream {i} did not finish"
        final = msgs[-1]
        assert final.final and final.finish_reason == llm_pb2.FINISH_REASON_LENGTH
        assert final.completion_tokens == budgets[i]
        # batching does not change a greedy answer
        assert "".join(m.text for m in msgs) == solo[i], f"stream {i} differs from its solo run"
    # more than one sequence ran in the same decode step, as the engine and the metrics say
    assert max(seen["batch"]) >= 3, seen["batch"]
    assert max(seen["metric_batch"]) >= 2 and max(seen["metric_running"]) >= 2
    assert 0 < max(seen["metric_kv"]) <= 1
    # five requests, four KV slots: one waited, then joined a batch that was still running
    assert max(seen["waiting"]) >= 1
    queued = [event_of(batch_server, f"batch-{i}")["queue_seconds"] for i in range(len(prompts))]
    late = max(range(len(prompts)), key=lambda i: queued[i])
    assert queued[late] > 0.01
    assert first_at[late] < max(final_at[i] for i in range(len(prompts)) if i != late)
    # and requests left as they finished: the batch shrank while others still ran
    shrinking = [b for b in seen["batch"] if 0 < b < max(seen["batch"])]
    assert shrinking, seen["batch"]
    wait_idle(batch_server)
    g = gauges(batch_server.metrics_url)
    assert g["vigil_num_requests_running"] == 0 and g["vigil_num_requests_waiting"] == 0
    assert g["vigil_kv_cache_usage_ratio"] == 0


# -- overload ---------------------------------------------------------------------------


def test_overload_answers_resource_exhausted_at_once(tight_server):
    engine = engine_of(tight_server)
    wait_idle(tight_server)
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        running = stub.GenerateStream(request(request_id="over-running"), timeout=60)
        next(running)  # it holds the only KV slot now
        waiting = stub.GenerateStream(request(request_id="over-waiting"), timeout=60)
        waiting_msgs = []
        reader = threading.Thread(target=lambda: waiting_msgs.extend(waiting))
        reader.start()
        wait_for(lambda: engine.stats.waiting == 1)

        timings = {}
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request(max_tokens=4, request_id="over-rejected"), timeout=30)
        timings["Generate"] = time.monotonic() - start
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
        assert "waiting" in err.value.details()

        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(request(max_tokens=4), timeout=30))
        timings["GenerateStream"] = time.monotonic() - start
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(llm_pb2.ClassifyRequest(model=MODEL, text="Hello", labels=[" a", " b"]), timeout=30)
        timings["Classify"] = time.monotonic() - start
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        text = pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            kserve.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[text],
                                                   raw_input_contents=[b"\x05\x00\x00\x00Hello"]), timeout=30)
        timings["ModelInfer"] = time.monotonic() - start
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        print("overload answered in", {k: f"{v * 1000:.1f} ms" for k, v in timings.items()})

        assert event_of(tight_server, "over-rejected")["status"] == "resource_exhausted"
        assert engine.stats.running == 1 and engine.stats.waiting == 1  # the two accepted ones go on

        running.cancel()
        reader.join(30)
    assert waiting_msgs[-1].final and waiting_msgs[-1].completion_tokens == LONG
    assert event_of(tight_server, "over-running")["status"] == "cancelled"
    assert event_of(tight_server, "over-waiting")["status"] == "ok"
    wait_idle(tight_server)


def test_admits_exactly_slots_plus_waiting(start_server, slow_llama):
    """A burst of requests, sent faster than the engine admits them: with 2 slots and 2
    waiting places, 4 are taken (free slots count as room too), and a 5th is refused."""
    server = serve(start_server, slow_llama, kv_slots=2, max_waiting=2)
    engine = engine_of(server)
    with grpc.insecure_channel(server.address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        for burst in range(3):
            calls = [stub.Generate.future(request(request_id=f"burst-{burst}-{i}"), timeout=60) for i in range(4)]
            wait_for(lambda: len(engine.running) == 2 and len(engine.waiting) == 2 or any(c.done() for c in calls),
                     timeout=10)
            refused = [c.exception() for c in calls if c.done()]
            assert not refused, [(e.code(), e.details()) for e in refused]
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(request(max_tokens=4, request_id=f"burst-{burst}-over"), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert not any(c.done() for c in calls)  # refused while the four still ran or waited
            for c in calls:
                c.cancel()
            wait_idle(server)


def test_a_cancelled_waiter_leaves_the_queue(tight_server):
    engine = engine_of(tight_server)
    wait_idle(tight_server)
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        running = stub.GenerateStream(request(), timeout=60)
        next(running)
        waiter = stub.GenerateStream(request(request_id="waiter-cancelled"), timeout=60)
        wait_for(lambda: engine.stats.waiting == 1)
        waiter.cancel()
        event_of(tight_server, "waiter-cancelled")
        try:
            # the queue has room again: this one waits for the slot instead of being refused
            answer = stub.Generate(request(max_tokens=4), timeout=60)
            assert answer.completion_tokens == 4
        finally:
            running.cancel()
            wait_idle(tight_server)


# -- cancellation and deadlines -----------------------------------------------------------


def test_cancelled_stream_frees_its_slot(tight_server):
    engine = engine_of(tight_server)
    wait_idle(tight_server)
    with grpc.insecure_channel(tight_server.address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        call = stub.GenerateStream(request(request_id="cancel-me"), timeout=60)
        got = [next(call) for _ in range(3)]
        assert all(not m.final for m in got)
        assert engine.free_slots == [] and engine.stats.running == 1
        call.cancel()
        freed = wait_for(lambda: engine.free_slots == [0] and not engine.running, timeout=2.0)
        assert_engine_stopped(tight_server)
        print(f"slot freed {freed * 1000:.1f} ms after the cancel")
        ev = event_of(tight_server, "cancel-me")
        assert ev["status"] == "cancelled" and ev["finish_reason"] == "cancelled"
        assert ev["model"] == MODEL and ev["method"] == "GenerateStream"
        # the slot serves the next request
        assert stub.Generate(request(max_tokens=3), timeout=30).completion_tokens == 3


def test_cancelled_kserve_stream_frees_its_slot(tight_server):
    engine = engine_of(tight_server)
    wait_idle(tight_server)
    with grpc.insecure_channel(tight_server.address) as channel:
        kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name=MODEL, id="kserve-cancel-me")
        req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hello")
        req.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(LONG)
        req.inputs.add(name="stream", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
        call = kserve.ModelStreamInfer(iter([req]), timeout=60)
        for _ in range(3):
            assert not next(call).error_message
        call.cancel()
        wait_for(lambda: engine.free_slots == [0] and not engine.running, timeout=2.0)
        assert_engine_stopped(tight_server)
        assert event_of(tight_server, "kserve-cancel-me")["status"] == "cancelled"


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "ModelInfer"])
def test_deadline_frees_the_slot(tight_server, method):
    engine = engine_of(tight_server)
    wait_idle(tight_server)
    request_id = f"deadline-{method}"
    with grpc.insecure_channel(tight_server.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            if method == "ModelInfer":
                req = pb.ModelInferRequest(model_name=MODEL, id=request_id)
                req.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hi")
                req.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int_contents.append(LONG)
                grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=0.3)
            elif method == "Generate":
                llm_pb2_grpc.LLMStub(channel).Generate(request(request_id=request_id), timeout=0.3)
            else:
                list(llm_pb2_grpc.LLMStub(channel).GenerateStream(request(request_id=request_id), timeout=0.3))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: engine.free_slots == [0] and not engine.running, timeout=2.0)
        assert_engine_stopped(tight_server)
        ev = event_of(tight_server, request_id)
        assert ev["status"] == "deadline_exceeded", ev
        assert ev["method"] == method and ev["total_seconds"] >= 0.2
        # and the server still serves
        assert llm_pb2_grpc.LLMStub(channel).Generate(request(max_tokens=2), timeout=30).completion_tokens == 2
