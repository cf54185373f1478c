"""Per-key limits: token buckets (requests per second, tokens per minute), the cap on
calls in flight, RESOURCE_EXHAUSTED with `retry-after-ms`, counted per key; a flood from
one key leaves another key served. Over real gRPC, against a tiny random Llama.
(bench/bench_noisy_neighbor.py measures the other key's latency; no timing is asserted here.)"""

from __future__ import annotations

import statistics
import threading
import time
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eventbus.apikeys import ApiKey, AuthOptions, KeyLimits, hash_secret
from inference.api.events import INFERENCE_TOPIC
from inference.edge.ratelimit import Limiter, Refused, TokenBucket
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc, llm_pb2, llm_pb2_grpc
from tests.helpers.waiting import wait_until

SECRETS = {name: f"vgk_{name}-" + "s" * 40 for name in ("noisy", "quiet", "thrifty", "streamer", "paced")}
LIMITS = {
    "noisy": "  requests_per_second: 2\n  burst: 2\n",
    "quiet": "",
    "thrifty": "  tokens_per_minute: 30\n",
    "streamer": "  max_streams: 1\n",
    "paced": "  requests_per_second: 0.5\n  burst: 1\n",
}


# -- the buckets, on a clock of our own ------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def key(name="k", **limits) -> ApiKey:
    return ApiKey(name=name, tenant="t", sha256=hash_secret(name), limits=KeyLimits(**limits))


def test_token_bucket_refills_up_to_its_capacity():
    b = TokenBucket(rate=2.0, capacity=4.0, now=0.0)
    b.take(4, 0.0)
    assert b.wait(1, 0.0) == pytest.approx(0.5)
    assert b.wait(1, 0.5) == 0.0
    assert b.refill(100.0) == 4.0
    b.take(10, 100.0)  # a debt
    assert b.wait(1e-9, 100.0) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_requests_per_second_with_burst():
    clock = Clock()
    state = Limiter(clock).state(key(requests_per_second=2.0, burst=3))
    for _ in range(3):
        state.check_request(clock())
    with pytest.raises(Refused) as info:
        state.check_request(clock())
    r = info.value
    assert (r.key, r.limit, r.retry_after_ms) == ("k", "requests_per_second", 500)
    assert str(r) == "rate limit: API key 'k' is over its 2 requests per second; retry after 500 ms"
    clock.t += 0.5
    state.check_request(clock())
    with pytest.raises(Refused):
        state.check_request(clock())


def test_tokens_per_minute_let_in_while_above_zero_and_paid_after():
    clock = Clock()
    state = Limiter(clock).state(key(tokens_per_minute=60))  # one token a second, 60 at most
    state.check_request(clock())
    state.pay_tokens(90, clock())  # the request turned out big: 30 in debt
    with pytest.raises(Refused) as info:
        state.check_request(clock())
    assert info.value.limit == "tokens_per_minute"
    assert info.value.retry_after == pytest.approx(30.0, abs=0.01)
    assert "60 tokens per minute" in str(info.value)
    clock.t += 30.01
    state.check_request(clock())


def test_the_longest_wait_is_reported_and_nothing_is_taken_when_refused():
    clock = Clock()
    state = Limiter(clock).state(key(requests_per_second=1.0, tokens_per_minute=60))
    state.check_request(clock())
    state.pay_tokens(70, clock())  # 10 in debt: 10 s; the request bucket needs 1 s
    with pytest.raises(Refused) as info:
        state.check_request(clock())
    assert info.value.limit == "tokens_per_minute"
    clock.t += 1.0
    with pytest.raises(Refused):  # refused again, and the request bucket was not drained by refusals
        state.check_request(clock())
    assert state.requests.wait(1.0, clock()) == 0.0


def test_stream_cap():
    state = Limiter(Clock()).state(key(max_streams=2))
    state.open_stream()
    state.open_stream()
    with pytest.raises(Refused) as info:
        state.open_stream()
    assert info.value.limit == "max_streams" and info.value.retry_after_ms == 500
    state.close_stream()
    state.open_stream()


def test_a_reload_changes_limits_and_keeps_what_was_used():
    clock = Clock()
    limiter = Limiter(clock)
    state = limiter.state(key(requests_per_second=1.0, burst=5))
    for _ in range(5):
        state.check_request(clock())
    limiter.update([key(requests_per_second=10.0, burst=2)])  # new limits, same key name
    assert limiter.states["k"] is state and state.requests.capacity == 2
    with pytest.raises(Refused) as info:  # the bucket stays empty: a reload is no way to reset it
        state.check_request(clock())
    assert info.value.retry_after_ms == 100
    limiter.update([])
    assert "k" not in limiter.states


def test_keys_are_independent():
    clock = Clock()
    limiter = Limiter(clock)
    a, b = limiter.state(key("a", requests_per_second=1.0)), limiter.state(key("b", requests_per_second=1.0))
    a.check_request(clock())
    with pytest.raises(Refused):
        a.check_request(clock())
    b.check_request(clock())


# -- over gRPC -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(start_server, tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("limits") / "keys.yml"
    path.write_text("".join(f"- name: {n}\n  tenant: tenant-{n}\n  sha256: {hash_secret(SECRETS[n])}\n{LIMITS[n]}"
                            for n in SECRETS))
    return start_server(model=str(tiny_llama), model_name="tiny", quantize="none",
                        auth=AuthOptions(keys_file=str(path)))


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def md(name: str):
    return [("authorization", f"Bearer {SECRETS[name]}")]


def request(max_tokens: int = 3, request_id: str = "", ignore_eos: bool = True) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(model="tiny", prompt="hello there", request_id=request_id or f"rl-{uuid.uuid4()}",
                                   sampling=llm_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))


def metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def retry_after_ms(err: grpc.RpcError) -> int:
    values = [v for k, v in err.trailing_metadata() or () if k == "retry-after-ms"]
    assert len(values) == 1, err.trailing_metadata()
    return int(values[0])


def test_a_flood_from_one_key_leaves_the_other_key_served(server, channel):
    stub = llm_pb2_grpc.LLMStub(channel)
    refused_before = metric(server, "vigil_key_rate_limited_total", key="noisy", limit="requests_per_second")
    outcomes: list = []
    stop = threading.Event()

    def quiet_calls():
        latencies, replies = [], []
        for _ in range(6):
            start = time.perf_counter()
            replies.append(stub.Generate(request(), metadata=md("quiet"), timeout=30))
            latencies.append(time.perf_counter() - start)
        return statistics.median(latencies), replies

    alone, _ = quiet_calls()

    def flood():
        while not stop.is_set():
            futures = [stub.Generate.future(request(), metadata=md("noisy"), timeout=30) for _ in range(20)]
            for f in futures:
                try:
                    f.result()
                    outcomes.append("ok")
                except grpc.RpcError as e:
                    outcomes.append(e)

    flooders = [threading.Thread(target=flood) for _ in range(2)]
    for t in flooders:
        t.start()
    try:
        wait_until(lambda: outcomes, 30, "the flood's first answers")
        flooded, quiet = quiet_calls()
    finally:
        stop.set()
        for t in flooders:
            t.join(60)
    # measured, not asserted: bench/bench_noisy_neighbor.py is the benchmark
    print(f"quiet key median latency: alone {alone * 1e3:.1f} ms, during the other key's flood "
          f"{flooded * 1e3:.1f} ms, ratio {flooded / alone:.2f}")
    assert all(r.completion_tokens == 3 for r in quiet)  # every request of the other key served
    errors = [o for o in outcomes if o != "ok"]
    assert len(errors) > len(outcomes) // 2, "the flood was not limited"
    for e in errors:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.details().startswith("rate limit: API key 'noisy' is over its 2 requests per second; retry after")
        assert 0 < retry_after_ms(e) <= 1000
    refused = metric(server, "vigil_key_rate_limited_total", key="noisy", limit="requests_per_second")
    assert refused - refused_before == len(errors)
    assert metric(server, "vigil_key_rate_limited_total", key="quiet") == 0
    assert metric(server, "vigil_key_requests_total", key="quiet", tenant="tenant-quiet") >= 6


def test_tokens_per_minute_refuse_once_spent(server, channel):
    stub = llm_pb2_grpc.LLMStub(channel)
    paid = []
    with pytest.raises(grpc.RpcError) as info:
        for _ in range(10):  # 30 tokens a minute; each request pays its prompt and 8 completion tokens
            r = stub.Generate(request(max_tokens=8), metadata=md("thrifty"), timeout=30)
            paid.append(r.prompt_tokens + r.completion_tokens)
    e = info.value
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "is over its 30 tokens per minute" in e.details()
    assert sum(paid) >= 30 and sum(paid[:-1]) <= 31  # let in while the bucket was above zero (it refills too)
    debt = sum(paid) - 30
    assert retry_after_ms(e) == pytest.approx(debt / 0.5 * 1000, rel=0.1, abs=300)
    assert metric(server, "vigil_key_tokens_total", key="thrifty") == sum(paid)


def test_stream_cap_counts_calls_in_flight_and_frees_them(server, channel):
    stub = llm_pb2_grpc.LLMStub(channel)
    stream = stub.GenerateStream(request(max_tokens=400), metadata=md("streamer"), timeout=60)
    next(stream)  # the call is in flight
    assert metric(server, "vigil_key_streams", key="streamer") == 1
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request(), metadata=md("streamer"), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "rate limit: API key 'streamer' is over its 1 calls in flight; retry after 500 ms"
    assert retry_after_ms(info.value) == 500
    stub.Generate(request(), metadata=md("quiet"), timeout=30)  # other keys are not capped
    stream.cancel()
    released(server, "the cancelled stream")
    assert stub.Generate(request(), metadata=md("streamer"), timeout=30).completion_tokens == 3
    # a finished call releases its place too (the server does so just after its answer went out)
    released(server, "the finished call")


def released(server, what: str) -> None:
    deadline = time.monotonic() + 10
    while metric(server, "vigil_key_streams", key="streamer") != 0:
        assert time.monotonic() < deadline, f"{what} was not released"
        time.sleep(0.05)


def test_model_stream_infer_refuses_messages_in_band_and_goes_on(server, channel):
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def infer_request(i: int) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="tiny", id=f"paced-{uuid.uuid4()}-{i}", inputs=[
            pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1],
                                                  contents=pb.InferTensorContents(bytes_contents=[b"hi"])),
            pb.ModelInferRequest.InferInputTensor(name="max_tokens", datatype="INT32", shape=[1],
                                                  contents=pb.InferTensorContents(int_contents=[2]))])
        return r

    requests = [infer_request(i) for i in range(3)]
    responses = list(stub.ModelStreamInfer(iter(requests), metadata=md("paced"), timeout=60))
    errors = [r.error_message for r in responses if r.error_message]
    served = [r for r in responses if not r.error_message]
    assert len(served) == 1 and len(errors) == 2  # a burst of one, then 0.5 requests per second
    for message in errors:
        assert message.startswith("RESOURCE_EXHAUSTED: rate limit: API key 'paced' is over its 0.5 requests "
                                  "per second; retry after")
    events = [e for e in server.sink.events(INFERENCE_TOPIC) if e["request_id"].startswith("paced-")]
    assert [e["status"] for e in events] == ["ok"]  # refused messages give no event
    assert events[0]["tenant"] == "tenant-paced"
    assert metric(server, "vigil_key_rate_limited_total", key="paced", limit="requests_per_second") == 2


def test_metrics_name_keys_never_secrets(server):
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    assert 'vigil_key_requests_total{key="noisy",tenant="tenant-noisy"}' in text
    for secret in SECRETS.values():
        assert secret not in text and hash_secret(secret) not in text
