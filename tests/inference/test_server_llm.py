"""The native vigil.v1.LLM service, health, reflection and metrics, over real gRPC.

Generation, classification, feedback and sampling run against the demo model (a session
server); the admin calls (versions, traffic) run against a server of the tiny random
Llama, whose answers do not matter there.
"""

from __future__ import annotations

import math
import time
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from inference.api.events import FEEDBACK_TOPIC, INFERENCE_TOPIC
from protos import llm_pb2, llm_pb2_grpc

DEMO = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
STORY = "Once upon a time, in a small village by the sea,"


# -- helpers -------------------------------------------------------------------------


def rid() -> str:
    return f"t-{uuid.uuid4()}"


def chat(*pairs: tuple[str, str]) -> llm_pb2.Chat:
    return llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role=r, content=c) for r, c in pairs])


def events_for(sink, request_id: str, topic: str = INFERENCE_TOPIC, timeout: float = 5.0) -> list[dict]:
    """The sink's events for request_id, waiting a little for the first (a stream's event
    is recorded just after its last message is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in sink.events(topic) if e["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    time.sleep(0.05)  # a duplicate would land right after the first
    return [e for e in sink.events(topic) if e["request_id"] == request_id]


def one_event(sink, request_id: str, **expected) -> dict:
    found = events_for(sink, request_id)
    assert len(found) == 1, f"{len(found)} inference events for {request_id}"
    for k, v in expected.items():
        assert found[0][k] == v, (k, found[0][k], v)
    return found[0]


def check_confidence(c: llm_pb2.ConfidenceSummary) -> None:
    assert c.mean_logprob <= 0.0
    assert c.mean_entropy >= 0.0
    assert 0.0 < c.min_top1_prob <= 1.0
    assert c.min_top1_prob <= math.exp(0) and math.isfinite(c.mean_logprob)


def check_timing(t: llm_pb2.Timing) -> None:
    assert 0.0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds
    assert t.total_seconds > 0


@pytest.fixture(scope="module")
def llm(demo_server):
    with grpc.insecure_channel(demo_server.address) as channel:
        yield llm_pb2_grpc.LLMStub(channel)


def generate(llm, prompt: str | None = None, messages=None, **sampling) -> llm_pb2.GenerateResponse:
    req = llm_pb2.GenerateRequest(model=DEMO, request_id=rid(), sampling=llm_pb2.SamplingParams(**sampling))
    if messages is not None:
        req.chat.CopyFrom(messages)
    else:
        req.prompt = prompt
    return llm.Generate(req, timeout=120)


def stream(llm, req: llm_pb2.GenerateRequest) -> list[llm_pb2.GenerateStreamResponse]:
    return list(llm.GenerateStream(req, timeout=120))


# -- Generate and GenerateStream ------------------------------------------------------


def test_generate_chat_answers_paris_and_records_one_event(llm, demo_server):
    request_id = rid()
    resp = llm.Generate(llm_pb2.GenerateRequest(
        model=DEMO, chat=chat(("user", QUESTION)), request_id=request_id,
        sampling=llm_pb2.SamplingParams(max_tokens=32)), timeout=120)
    assert "Paris" in resp.text
    assert resp.request_id == request_id  # echoed
    assert (resp.model, resp.version) == (DEMO, "1")
    assert resp.prompt_tokens > 10  # the chat template adds its own tokens
    assert 0 < resp.completion_tokens <= 32
    assert resp.finish_reason == llm_pb2.FINISH_REASON_STOP  # it ends its short answer by itself
    check_confidence(resp.confidence)
    check_timing(resp.timing)

    ev = one_event(demo_server.sink, request_id, status="ok", method="Generate", model=DEMO, version="1",
                   route="stable", finish_reason="stop")
    assert ev["prompt_tokens"] == resp.prompt_tokens
    assert ev["completion_tokens"] == resp.completion_tokens
    assert ev["mean_logprob"] == pytest.approx(resp.confidence.mean_logprob)
    assert ev["min_top1_prob"] == pytest.approx(resp.confidence.min_top1_prob)
    assert ev["first_token_seconds"] == pytest.approx(resp.timing.time_to_first_token_seconds)
    assert ev["prompt_chars"] > len(QUESTION) and len(ev["prompt_sha256"]) == 64


def test_generate_prompt_assigns_request_id_and_stops_at_max_tokens(llm, demo_server):
    resp = llm.Generate(llm_pb2.GenerateRequest(model=DEMO, prompt=STORY,
                                                sampling=llm_pb2.SamplingParams(max_tokens=6)), timeout=120)
    uuid.UUID(resp.request_id)  # assigned by the server
    assert resp.completion_tokens == 6
    assert resp.finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert resp.text.strip()
    one_event(demo_server.sink, resp.request_id, status="ok", finish_reason="length", completion_tokens=6)


def test_stream_concatenates_to_the_greedy_text(llm, demo_server):
    whole = generate(llm, STORY, max_tokens=24)
    request_id = rid()
    msgs = stream(llm, llm_pb2.GenerateRequest(model=DEMO, prompt=STORY, request_id=request_id,
                                               sampling=llm_pb2.SamplingParams(max_tokens=24)))
    assert len(msgs) > 3
    assert [m.final for m in msgs] == [False] * (len(msgs) - 1) + [True]
    for m in msgs:
        assert (m.request_id, m.model, m.version) == (request_id, DEMO, "1")
    assert "".join(m.text for m in msgs) == whole.text
    final = msgs[-1]
    assert final.finish_reason == whole.finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert (final.prompt_tokens, final.completion_tokens) == (whole.prompt_tokens, whole.completion_tokens)
    assert final.confidence.mean_logprob == pytest.approx(whole.confidence.mean_logprob, abs=1e-4)
    check_confidence(final.confidence)
    check_timing(final.timing)
    for m in msgs[:-1]:  # summary fields on the final message only
        assert m.completion_tokens == 0 and m.finish_reason == llm_pb2.FINISH_REASON_UNSPECIFIED
    one_event(demo_server.sink, request_id, status="ok", method="GenerateStream", completion_tokens=24)


def test_stream_token_ids_cover_every_generated_token(llm):
    whole = generate(llm, STORY, max_tokens=8)
    msgs = stream(llm, llm_pb2.GenerateRequest(model=DEMO, prompt=STORY,
                                               sampling=llm_pb2.SamplingParams(max_tokens=8)))
    assert whole.completion_tokens == 8
    assert sum(len(m.token_ids) for m in msgs) == 8


def test_stream_of_a_chat_answers_paris(llm):
    msgs = stream(llm, llm_pb2.GenerateRequest(model=DEMO, chat=chat(("user", QUESTION)),
                                               sampling=llm_pb2.SamplingParams(max_tokens=32)))
    assert "Paris" in "".join(m.text for m in msgs)
    assert msgs[-1].final and msgs[-1].finish_reason == llm_pb2.FINISH_REASON_STOP


# -- sampling ------------------------------------------------------------------------


def test_same_seed_same_text_different_seeds_differ(llm):
    def sampled(seed):
        return generate(llm, STORY, max_tokens=16, temperature=1.0, seed=seed).text

    first = sampled(1234)
    assert sampled(1234) == first
    texts = {sampled(seed) for seed in (1, 2, 3, 4)}
    assert len(texts) >= 2, texts
    greedy = generate(llm, STORY, max_tokens=16).text
    assert texts | {first} != {greedy}


def test_seeded_top_p_is_reproducible(llm):
    a = generate(llm, STORY, max_tokens=12, temperature=0.9, top_p=0.8, seed=99)
    b = generate(llm, STORY, max_tokens=12, temperature=0.9, top_p=0.8, seed=99)
    assert a.text == b.text and a.completion_tokens == 12


def test_top_k_one_is_greedy(llm):
    greedy = generate(llm, STORY, max_tokens=16)
    for seed in (5, 6):
        top1 = generate(llm, STORY, max_tokens=16, temperature=1.5, top_k=1, seed=seed)
        assert top1.text == greedy.text


def test_stop_strings_cut_the_text(llm, demo_server):
    greedy = generate(llm, STORY, max_tokens=24).text
    words = greedy.split()
    stop = words[len(words) // 2]
    expected = greedy[:greedy.find(stop)]
    assert expected.strip(), greedy
    cut = generate(llm, STORY, max_tokens=24, stop=[stop, "zzzz-never"])
    assert cut.text == expected
    assert stop not in cut.text
    assert cut.finish_reason == llm_pb2.FINISH_REASON_STOP
    assert cut.completion_tokens < 24

    request_id = rid()
    msgs = stream(llm, llm_pb2.GenerateRequest(model=DEMO, prompt=STORY, request_id=request_id,
                                               sampling=llm_pb2.SamplingParams(max_tokens=24, stop=[stop])))
    assert "".join(m.text for m in msgs) == expected
    assert msgs[-1].finish_reason == llm_pb2.FINISH_REASON_STOP
    one_event(demo_server.sink, request_id, finish_reason="stop")


# -- Classify and Feedback -----------------------------------------------------------


def test_classify_capital(llm, demo_server):
    request_id = rid()
    labels = [" Paris", " London", " Berlin"]
    resp = llm.Classify(llm_pb2.ClassifyRequest(model=DEMO, text="The capital of France is", labels=labels,
                                                request_id=request_id), timeout=120)
    assert [s.label for s in resp.scores] == labels
    assert sum(s.probability for s in resp.scores) == pytest.approx(1.0, abs=1e-9)
    assert resp.prediction == " Paris"
    assert resp.scores[0].probability > 0.5
    for s in resp.scores:
        assert s.logprob < 0 and 0 < s.probability < 1
    # probabilities are the softmax of the log-likelihoods
    assert resp.scores[0].probability / resp.scores[1].probability == pytest.approx(
        math.exp(resp.scores[0].logprob - resp.scores[1].logprob), rel=1e-6)
    assert (resp.request_id, resp.model, resp.version) == (request_id, DEMO, "1")
    assert resp.prompt_tokens == 5
    check_timing(resp.timing)
    ev = one_event(demo_server.sink, request_id, status="ok", method="Classify", model=DEMO, version="1")
    assert ev["label_probabilities"] == pytest.approx({s.label: s.probability for s in resp.scores})


def test_classify_multi_token_labels_and_chat(llm):
    resp = llm.Classify(llm_pb2.ClassifyRequest(
        model=DEMO, chat=chat(("user", "Is the sky blue on a clear day? Answer yes or no.")),
        labels=["Yes, it is.", "No, it is not green."]), timeout=120)
    assert sum(s.probability for s in resp.scores) == pytest.approx(1.0, abs=1e-9)
    assert resp.prediction == max(resp.scores, key=lambda s: s.probability).label


def test_feedback_lands_with_the_answered_event_key(llm, demo_server):
    request_id = rid()
    llm.Classify(llm_pb2.ClassifyRequest(model=DEMO, text="The capital of France is",
                                         labels=[" Paris", " Rome"], request_id=request_id), timeout=120)
    resp = llm.Feedback(llm_pb2.FeedbackRequest(request_id=request_id, label=" Paris", comment="right"))
    assert resp.accepted and resp.feedback_id
    fb = events_for(demo_server.sink, request_id, topic=FEEDBACK_TOPIC)
    assert len(fb) == 1
    assert (fb[0]["model"], fb[0]["version"], fb[0]["label"], fb[0]["comment"]) == (DEMO, "1", " Paris", "right")
    assert fb[0]["feedback_id"] == resp.feedback_id
    with demo_server.sink.lock:
        keys = {(t, e["request_id"]): k for t, k, e in demo_server.sink.records}
    assert keys[(FEEDBACK_TOPIC, request_id)] == keys[(INFERENCE_TOPIC, request_id)]
    # a feedback is not an inference event
    assert len(events_for(demo_server.sink, request_id)) == 1

    score = llm.Feedback(llm_pb2.FeedbackRequest(request_id=request_id, model=DEMO, score=0.25))
    assert score.accepted and score.feedback_id != resp.feedback_id
    fb = events_for(demo_server.sink, request_id, topic=FEEDBACK_TOPIC)
    assert [f["score"] for f in fb] == [None, 0.25]


def test_feedback_errors(llm):
    with pytest.raises(grpc.RpcError) as err:
        llm.Feedback(llm_pb2.FeedbackRequest(request_id="never-seen", label="x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        llm.Feedback(llm_pb2.FeedbackRequest(request_id="never-seen", model="no-such-model", label="x"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "model" in err.value.details()


def test_failed_requests_get_one_event_each(llm, demo_server):
    request_id = rid()
    with pytest.raises(grpc.RpcError) as err:
        llm.Generate(llm_pb2.GenerateRequest(model="no-such-model", prompt="hi", request_id=request_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    one_event(demo_server.sink, request_id, status="not_found", model="")
    request_id = rid()
    with pytest.raises(grpc.RpcError) as err:
        list(llm.GenerateStream(llm_pb2.GenerateRequest(model=DEMO, prompt="", request_id=request_id)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ev = one_event(demo_server.sink, request_id, status="invalid_argument", model=DEMO, version="1",
                   method="GenerateStream")
    assert "prompt" in ev["error"]


# -- health, reflection, metrics -------------------------------------------------------


def test_health(demo_server):
    with grpc.insecure_channel(demo_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vigil.v1.LLM", "inference.GRPCInferenceService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection(demo_server):
    with grpc.insecure_channel(demo_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="vigil.v1.LLM"),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]
        answers = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "vigil.v1.LLM", "grpc.health.v1.Health"} <= names
    for answer in answers[1:]:
        assert answer.WhichOneof("message_response") == "file_descriptor_response"
        assert answer.file_descriptor_response.file_descriptor_proto


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics(llm, demo_server):
    mv = dict(model=DEMO, version="1")
    before = scrape(demo_server.metrics_url)
    a = generate(llm, STORY, max_tokens=5)
    b = generate(llm, "The weather today is", max_tokens=7)
    with pytest.raises(grpc.RpcError):
        llm.Generate(llm_pb2.GenerateRequest(model=DEMO, prompt=""))
    after = scrape(demo_server.metrics_url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vigil_requests_total", **mv, method="Generate", status="ok", protocol="grpc") == 2
    assert delta("vigil_requests_total", **mv, method="Generate", status="invalid_argument",
                 protocol="grpc") == 1
    assert delta("vigil_e2e_request_latency_seconds_count", **mv) == 3
    assert delta("vigil_e2e_request_latency_seconds_sum", **mv) >= a.timing.total_seconds + b.timing.total_seconds
    assert delta("vigil_time_to_first_token_seconds_count", **mv) == 2
    assert delta("vigil_time_to_first_token_seconds_sum", **mv) == pytest.approx(
        a.timing.time_to_first_token_seconds + b.timing.time_to_first_token_seconds, rel=1e-3)
    assert delta("vigil_request_queue_time_seconds_count", **mv) == 2
    # both end on max_tokens: one inter-token gap per token after the first
    assert delta("vigil_inter_token_latency_seconds_count", **mv) == (5 - 1) + (7 - 1)
    assert delta("vigil_inter_token_latency_seconds_sum", **mv) > 0
    assert delta("vigil_prompt_tokens_total", **mv) == a.prompt_tokens + b.prompt_tokens
    assert delta("vigil_generation_tokens_total", **mv) == 12
    inf = frozenset({**mv, "le": "+Inf"}.items())
    assert after[("vigil_e2e_request_latency_seconds_bucket", inf)] == \
        after[("vigil_e2e_request_latency_seconds_count", frozenset(mv.items()))]
    # idle engine gauges
    assert value(after, "vigil_num_requests_running", **mv) == 0
    assert value(after, "vigil_num_requests_waiting", **mv) == 0
    assert ("vigil_batch_size", frozenset(mv.items())) in after
    assert value(after, "vigil_kv_cache_usage_ratio", **mv) == 0.0
    # failures before routing are counted too
    with pytest.raises(grpc.RpcError):
        llm.Generate(llm_pb2.GenerateRequest(model="no-such-model", prompt="x"))
    final = scrape(demo_server.metrics_url)
    assert value(final, "vigil_requests_total", model="unknown", version="unknown", method="Generate",
                 status="not_found", protocol="grpc") >= 1


# -- admin: versions and traffic (tiny model) -------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(start_server, tiny_llama):
    return start_server(model=str(tiny_llama), model_name="tiny", quantize="none")


@pytest.fixture(scope="module")
def admin(tiny_server):
    with grpc.insecure_channel(tiny_server.address) as channel:
        yield llm_pb2_grpc.LLMStub(channel)


def tiny_generate(stub, **kw) -> llm_pb2.GenerateResponse:
    return stub.Generate(llm_pb2.GenerateRequest(model="tiny", prompt="The quick brown fox",
                                                 sampling=llm_pb2.SamplingParams(max_tokens=1), **kw),
                         timeout=30)


def versions(stub, model="tiny") -> dict[str, llm_pb2.ModelVersionInfo]:
    return {v.version: v for v in stub.ListVersions(llm_pb2.ListVersionsRequest(model=model)).versions}


def test_versions_and_traffic(admin, tiny_server, tiny_llama):
    listed = versions(admin)
    assert list(listed) == ["1"] and listed["1"].weight == 1.0
    assert listed["1"].state == llm_pb2.VERSION_STATE_READY and listed["1"].quantize == "none"

    info = admin.LoadVersion(llm_pb2.LoadVersionRequest(model="tiny", version="2", source=str(tiny_llama),
                                                        quantize="int8"), timeout=120).info
    assert (info.model, info.version, info.quantize, info.state) == ("tiny", "2", "int8",
                                                                     llm_pb2.VERSION_STATE_READY)
    assert info.weight == 0.0 and info.loaded_at.seconds > 0 and info.source == str(tiny_llama)
    listed = versions(admin)
    assert set(listed) == {"1", "2"} and listed["1"].weight == 1.0 and listed["2"].weight == 0.0
    assert {v.model for v in admin.ListVersions(llm_pb2.ListVersionsRequest()).versions} == {"tiny"}

    # a new version gets no traffic until SetTraffic, but can be pinned
    assert {tiny_generate(admin, routing_key=f"k{i}").version for i in range(10)} == {"1"}
    request_id = rid()
    pinned = tiny_generate(admin, version="2", request_id=request_id)
    assert pinned.version == "2" and pinned.completion_tokens == 1
    one_event(tiny_server.sink, request_id, version="2", route="pinned")

    resp = admin.SetTraffic(llm_pb2.SetTrafficRequest(model="tiny", weights={"1": 1.0, "2": 1.0}))
    assert dict(resp.weights) == {"1": 0.5, "2": 0.5}
    listed = versions(admin)
    assert (listed["1"].weight, listed["2"].weight) == (0.5, 0.5)

    by_key = {f"user-{i}": tiny_generate(admin, routing_key=f"user-{i}").version for i in range(60)}
    counts = {v: sum(1 for x in by_key.values() if x == v) for v in ("1", "2")}
    assert counts["1"] >= 15 and counts["2"] >= 15, counts
    for key in list(by_key)[:8]:  # sticky
        assert {tiny_generate(admin, routing_key=key).version for _ in range(3)} == {by_key[key]}
    # routes in the events: the heavier (here: tied) version is stable
    assert {e["route"] for e in tiny_server.sink.events(INFERENCE_TOPIC)[-5:]} <= {"stable", "canary"}
    # requests without a key are spread at random
    assert {tiny_generate(admin).version for _ in range(40)} == {"1", "2"}
    # a pinned version wins over the weights
    admin.SetTraffic(llm_pb2.SetTrafficRequest(model="tiny", weights={"2": 3.0}))
    assert versions(admin)["1"].weight == 0.0
    assert {tiny_generate(admin, routing_key=f"user-{i}").version for i in range(10)} == {"2"}
    assert tiny_generate(admin, version="1").version == "1"
    request_id = rid()
    tiny_generate(admin, request_id=request_id, routing_key="x")
    one_event(tiny_server.sink, request_id, version="2", route="stable")
    admin.SetTraffic(llm_pb2.SetTrafficRequest(model="tiny", weights={"1": 9.0, "2": 1.0}))
    request_id = rid()
    tiny_generate(admin, request_id=request_id, version="2")
    one_event(tiny_server.sink, request_id, version="2", route="pinned")

    gone = admin.UnloadVersion(llm_pb2.UnloadVersionRequest(model="tiny", version="2"), timeout=60).info
    assert gone.state == llm_pb2.VERSION_STATE_UNLOADED and gone.weight == 0.0
    listed = versions(admin)
    assert list(listed) == ["1"] and listed["1"].weight == 1.0
    with pytest.raises(grpc.RpcError) as err:
        tiny_generate(admin, version="2")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "version" in err.value.details()
    assert tiny_generate(admin).version == "1"


def test_unloading_the_only_version_forgets_the_model_and_a_reload_serves(admin, tiny_llama):
    admin.LoadVersion(llm_pb2.LoadVersionRequest(model="tiny-b", version="a", source=str(tiny_llama)),
                      timeout=120)
    assert tiny_generate(admin).model == "tiny"
    r = admin.Generate(llm_pb2.GenerateRequest(model="tiny-b", prompt="fox",
                                               sampling=llm_pb2.SamplingParams(max_tokens=2)), timeout=30)
    assert (r.model, r.version, r.completion_tokens) == ("tiny-b", "a", 2)
    admin.UnloadVersion(llm_pb2.UnloadVersionRequest(model="tiny-b", version="a"), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        admin.ListVersions(llm_pb2.ListVersionsRequest(model="tiny-b"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        admin.Generate(llm_pb2.GenerateRequest(model="tiny-b", prompt="fox"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "model" in err.value.details()


ADMIN_ERRORS = [
    ("traffic: unknown version", "SetTraffic", dict(model="tiny", weights={"1": 1.0, "9": 1.0}),
     grpc.StatusCode.NOT_FOUND, "weights"),
    ("traffic: unknown model", "SetTraffic", dict(model="nope", weights={"1": 1.0}),
     grpc.StatusCode.NOT_FOUND, "model"),
    ("traffic: negative weight", "SetTraffic", dict(model="tiny", weights={"1": -1.0}),
     grpc.StatusCode.INVALID_ARGUMENT, "weights"),
    ("traffic: infinite weight", "SetTraffic", dict(model="tiny", weights={"1": float("inf")}),
     grpc.StatusCode.INVALID_ARGUMENT, "weights"),
    ("traffic: all zero", "SetTraffic", dict(model="tiny", weights={"1": 0.0}),
     grpc.StatusCode.INVALID_ARGUMENT, "weights"),
    ("load: quantize int3", "LoadVersion", dict(model="tiny", version="3", source="TINY", quantize="int3"),
     grpc.StatusCode.INVALID_ARGUMENT, "quantize"),
    ("load: group_size 48", "LoadVersion",
     dict(model="tiny", version="3", source="TINY", quantize="int4", group_size=48),
     grpc.StatusCode.INVALID_ARGUMENT, "group_size"),
    ("load: group_size wider than the model", "LoadVersion",
     dict(model="tiny", version="3", source="TINY", quantize="int4", group_size=128),
     grpc.StatusCode.INVALID_ARGUMENT, "group_size"),
    ("load: empty source", "LoadVersion", dict(model="tiny", version="3", source=""),
     grpc.StatusCode.INVALID_ARGUMENT, "source"),
    ("load: missing source", "LoadVersion", dict(model="tiny", version="3", source="/no/such/model.gguf"),
     grpc.StatusCode.INVALID_ARGUMENT, "source"),
    ("load: empty version", "LoadVersion", dict(model="tiny", version="", source="TINY"),
     grpc.StatusCode.INVALID_ARGUMENT, "version"),
    ("load: empty model", "LoadVersion", dict(model="", version="3", source="TINY"),
     grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ("load: version already loaded", "LoadVersion", dict(model="tiny", version="1", source="TINY"),
     grpc.StatusCode.INVALID_ARGUMENT, "version"),
    ("unload: unknown version", "UnloadVersion", dict(model="tiny", version="9"),
     grpc.StatusCode.NOT_FOUND, "version"),
    ("unload: unknown model", "UnloadVersion", dict(model="nope", version="1"),
     grpc.StatusCode.NOT_FOUND, "model"),
    ("list: unknown model", "ListVersions", dict(model="nope"), grpc.StatusCode.NOT_FOUND, "model"),
]


@pytest.mark.parametrize("case,method,fields,code,field", ADMIN_ERRORS, ids=[c[0] for c in ADMIN_ERRORS])
def test_bad_admin_input(admin, tiny_llama, case, method, fields, code, field):
    fields = {k: (str(tiny_llama) if v == "TINY" else v) for k, v in fields.items()}
    request = getattr(llm_pb2, f"{method}Request")(**fields)
    with pytest.raises(grpc.RpcError) as err:
        getattr(admin, method)(request, timeout=60)
    assert err.value.code() == code, err.value.details()
    assert err.value.details().startswith(field) or f"{field}" in err.value.details(), err.value.details()
    # nothing changed, and the server still serves
    listed = versions(admin)
    assert list(listed) == ["1"] and listed["1"].weight == 1.0
    assert tiny_generate(admin).version == "1"


def test_ignore_eos_generates_past_the_end_of_the_answer(llm):
    short = generate(llm, messages=chat(("user", QUESTION)), max_tokens=48)
    assert short.finish_reason == llm_pb2.FINISH_REASON_STOP and short.completion_tokens < 48
    long = generate(llm, messages=chat(("user", QUESTION)), max_tokens=48, ignore_eos=True)
    assert long.finish_reason == llm_pb2.FINISH_REASON_LENGTH and long.completion_tokens == 48
    assert long.text.startswith(short.text)
