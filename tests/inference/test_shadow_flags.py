"""Shadow traffic and feature flags in the server: a shadow version gets a copy of each
routed request (its answer thrown away, its event marked shadow), flags are evaluated per
request on the routing key and attributes and come back in the answer and the event."""

from __future__ import annotations

import time

import grpc
import pytest

from protos import grpc_service_pb2 as kpb, grpc_service_pb2_grpc as kgrpc, llm_pb2, llm_pb2_grpc
from eventbus.flags import Flag

MODEL = "shadowed"


@pytest.fixture(scope="module")
def server(start_server, tiny_llama):
    s = start_server(model=str(tiny_llama), model_name=MODEL, version="1", quantize="none")
    s.call(s.server.versions.load(MODEL, "2", str(tiny_llama), "none", system_prompt="Answer as a pirate."))
    return s


def set_rollout(server, shadows, flags):
    async def apply():
        return server.server.router.set_rollout(MODEL, {"1": 1.0}, shadows, flags)
    return server.call(apply())


def after_shadow_copies(server) -> None:
    """Returns once the copies of every request sent before have been served: a request
    sent now is copied behind them to the same shadow version, and its copy's event is in."""
    barrier = f"barrier-{time.monotonic_ns()}"
    generate(server, prompt="barrier", request_id=barrier)
    events_for(server, barrier)


def events_for(server, request_id: str, timeout: float = 30.0) -> list[dict]:
    """The primary event of request_id and the events of its shadow copies, once all are in."""
    want = 1 + len(server.server.router.shadows.get(MODEL, ()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = [e for e in server.sink.events("vigil.inference.events")
               if request_id in (e["request_id"], e["shadow_of"])]
        if len(evs) >= want:
            return evs
        time.sleep(0.05)
    raise AssertionError(f"{len(evs)} events for {request_id}, expected {want}")


def generate(server, **kw):
    kw.setdefault("sampling", llm_pb2.SamplingParams(max_tokens=3, temperature=0))
    with grpc.insecure_channel(server.address) as ch:
        return llm_pb2_grpc.LLMStub(ch).Generate(llm_pb2.GenerateRequest(model=MODEL, **kw), timeout=60)


def test_a_shadow_version_gets_a_copy_whose_answer_is_not_returned(server):
    set_rollout(server, ["2"], {})
    try:
        r = generate(server, chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role="user", content="hi")]),
                     request_id="primary-1")
        assert r.version == "1"
        evs = {e["route"]: e for e in events_for(server, "primary-1")}
        assert set(evs) == {"stable", "shadow"}
        primary, copy = evs["stable"], evs["shadow"]
        assert primary["request_id"] == "primary-1" and primary["shadow_of"] == ""
        assert copy["version"] == "2" and copy["shadow_of"] == "primary-1" and copy["request_id"] != "primary-1"
        assert copy["status"] == "ok" and copy["method"] == "Generate" and copy["completion_tokens"] > 0
        # the shadow's own system prompt was applied: its prompt is not the primary's
        assert copy["prompt_sha256"] != primary["prompt_sha256"]
        # a pinned request is not copied
        pinned = generate(server, prompt="pinned", version="1", request_id="pinned-1")
        assert pinned.version == "1"
        after_shadow_copies(server)
        assert not [e for e in server.sink.events() if e.get("shadow_of") == "pinned-1"]
    finally:
        set_rollout(server, [], {})


def test_a_bad_request_is_not_copied(server):
    set_rollout(server, ["2"], {})
    try:
        with pytest.raises(grpc.RpcError) as err:
            generate(server, prompt="x", request_id="bad-1",
                     sampling=llm_pb2.SamplingParams(max_tokens=3, temperature=-1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        after_shadow_copies(server)
        assert not [e for e in server.sink.events() if e.get("shadow_of") == "bad-1"]
    finally:
        set_rollout(server, [], {})


def test_flags_follow_rules_and_percentage_and_reach_answer_and_event(server):
    beta = Flag("eu-beta", 100, [{"attribute": "region", "op": "eq", "value": "eu"}])
    half = Flag("half", 50)
    set_rollout(server, [], {"eu-beta": beta, "half": half})
    try:
        eu = generate(server, prompt="a", routing_key="user-7", attributes={"region": "eu"}, request_id="f-1")
        us = generate(server, prompt="a", routing_key="user-7", attributes={"region": "us"}, request_id="f-2")
        assert "eu-beta" in eu.flags and "eu-beta" not in us.flags
        # "half" depends on the routing key only, so one user is in the same arm both times
        assert ("half" in eu.flags) == ("half" in us.flags)
        keys = [f"user-{i}" for i in range(200)]
        on = sum("half" in generate(server, prompt="a", routing_key=k).flags for k in keys[:40])
        assert 5 < on < 35
        (ev,) = events_for(server, "f-1")
        assert ev["flags"] == list(eu.flags)
        # the stream carries them on its first message
        with grpc.insecure_channel(server.address) as ch:
            chunks = list(llm_pb2_grpc.LLMStub(ch).GenerateStream(llm_pb2.GenerateRequest(
                model=MODEL, prompt="a", attributes={"region": "eu"},
                sampling=llm_pb2.SamplingParams(max_tokens=3, temperature=0)), timeout=60))
        assert "eu-beta" in chunks[0].flags and all(not c.flags for c in chunks[1:])
        # and KServe, from attribute.NAME parameters
        req = kpb.ModelInferRequest(model_name=MODEL, inputs=[kpb.ModelInferRequest.InferInputTensor(
            name="text_input", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[b"a"]))])
        req.parameters["attribute.region"].string_param = "eu"
        with grpc.insecure_channel(server.address) as ch:
            resp = kgrpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
        assert "eu-beta" in resp.parameters["flags"].string_param.split(",")
    finally:
        set_rollout(server, [], {})


def test_route_stable_is_the_rollouts_stable_version_even_when_the_candidate_has_more_traffic(server):
    async def apply(weights, stable):
        server.server.router.set_rollout(MODEL, weights, [], {}, stable=stable)
    try:
        for weights in ({"1": 0.5, "2": 0.5}, {"1": 0.25, "2": 0.75}):
            server.call(apply(weights, "1"))
            for i in range(12):
                generate(server, prompt="a", routing_key=f"user-{i}", request_id=f"route-{weights['2']}-{i}")
            routes = {(e["version"], e["route"]) for e in server.sink.events("vigil.inference.events")
                      if e["request_id"].startswith(f"route-{weights['2']}-")}
            assert routes == {("1", "stable"), ("2", "canary")}, routes
    finally:
        server.call(apply({"1": 1.0}, ""))


def test_a_record_with_weights_no_router_takes_is_not_applied(server):
    import math

    from inference.api.rollout_follower import RolloutFollower
    from protos import events_pb2

    follower = RolloutFollower(server.server.router, "127.0.0.1:1")
    for bad in ({"1": 2.0, "2": -1.0}, {"1": math.nan, "2": 1.0}, {"1": math.inf, "2": 1.0}):
        msg = events_pb2.RolloutState(model=MODEL, stable_version="1", generation=1, flags_json="[[[[")
        for v, w in bad.items():
            msg.weights.add(version=v, weight=w)
        follower.take(msg)  # logged and skipped, never raised
    assert server.server.router.weights[MODEL] == {"1": 1.0, "2": 0.0}


def test_kserve_attributes_of_any_parameter_type_reach_the_rules(server):
    adults = Flag("adults", 100, [{"attribute": "age", "op": "gte", "value": 18},
                                  {"attribute": "beta", "op": "eq", "value": "true"}])
    set_rollout(server, [], {"adults": adults})
    try:
        req = kpb.ModelInferRequest(model_name=MODEL, inputs=[kpb.ModelInferRequest.InferInputTensor(
            name="text_input", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[b"a"]))])
        req.parameters["attribute.age"].int64_param = 30
        req.parameters["attribute.beta"].bool_param = True
        with grpc.insecure_channel(server.address) as ch:
            resp = kgrpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=60)
        assert resp.parameters["flags"].string_param == "adults"
    finally:
        set_rollout(server, [], {})
