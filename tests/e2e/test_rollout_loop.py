"""The rollout loop with the real parts: the embedded broker (Tansu), inference servers
with two versions of the tiny model loaded, the stream processor (whose comparisons of
candidate and stable the controller decides on) and the `vigil rollout` service (leader
lease, admin API, decisions on vigil.rollout), in a fast configuration (analysis every
second, small samples, comparisons every 5 candidate events).

Where a test needs a candidate that behaves badly, or traffic without a server, it writes
synthetic InferenceEvents for that version onto vigil.inference.events (as a server
would: same key, same message), so the analysis is driven deterministically.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import grpc
import pytest
from confluent_kafka import Producer
from google.protobuf.message import DecodeError

from eventbus import topics
from inference.api.options import EventOptions
from protos import events_pb2, llm_pb2, llm_pb2_grpc
from rollout.records import RolloutError
from tests.helpers.kafka import read_topic
from tests.helpers.rollout import ProcessorThread, ServiceThread
from tests.helpers.waiting import wait_until

# inconclusive_limit: a busy machine serves fewer requests a second; that must not pause
# a test about promotion or rollback
FAST = dict(interval=1.0, min_requests=12, inconclusive_limit=60, thresholds={"min_samples": 10})


@pytest.fixture(scope="module")
def processor(kafka_broker):
    p = ProcessorThread(kafka_broker.bootstrap_servers, f"rollout-loop-{uuid.uuid4().hex[:6]}")
    yield p
    p.stop()


@pytest.fixture
def services(kafka_broker, tmp_path, processor):
    started = []

    def start(group: str, name: str) -> ServiceThread:
        s = ServiceThread(kafka_broker.bootstrap_servers, group, tmp_path, name)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def status(api, model):
    try:
        return api.call("status", model=model)
    except RolloutError:
        return None


class Traffic:
    """Generate calls in a thread, `rate` per second (0: as fast as the server answers)."""

    def __init__(self, address: str, model: str, rate: float = 0.0):
        self.address, self.model, self.rate = address, model, rate
        self.stop_ = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        with grpc.insecure_channel(self.address) as ch:
            stub = llm_pb2_grpc.LLMStub(ch)
            while not self.stop_.is_set():
                t = time.monotonic()
                stub.Generate(llm_pb2.GenerateRequest(model=self.model, prompt="The quick brown fox",
                                                      sampling=llm_pb2.SamplingParams(max_tokens=2, temperature=0)),
                              timeout=30)
                self.count += 1
                if self.rate:
                    self.stop_.wait(max(0.0, 1 / self.rate - (time.monotonic() - t)))

    def stop(self):
        self.stop_.set()
        self.thread.join(30)


class Injector:
    """Synthetic InferenceEvents for model versions, onto vigil.inference.events."""

    def __init__(self, bootstrap: str):
        # the partitioner of Kafka's Java client and of the servers' aiokafka producer: an event
        # lands in its model's partition, beside the server's events it is compared with
        self.producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3, "linger.ms": 5,
                                  "partitioner": "murmur2_random"})

    def send(self, model, version, route="canary", error=False, latency=0.05):
        ev = events_pb2.InferenceEvent(
            event_id=str(uuid.uuid4()), source="test-injector", request_id=str(uuid.uuid4()), model=model,
            version=version, route=events_pb2.Route.Value(f"ROUTE_{route.upper()}"),
            status=events_pb2.Status.Value("STATUS_INTERNAL" if error else "STATUS_OK"), total_seconds=latency)
        ev.time.GetCurrentTime()
        self.producer.produce(topics.INFERENCE, value=ev.SerializeToString(), key=topics.event_key(model))
        self.producer.poll(0)

    def flush(self):
        self.producer.flush(10)


def two_version_server(start_server, tiny_llama, tmp_path, bootstrap, model):
    s = start_server(model=str(tiny_llama), model_name=model, version="1", quantize="none",
                     events=EventOptions(bootstrap_servers=bootstrap, publish_timeout_ms=1000, topic_partitions=3,
                                         outbox_dir=str(tmp_path / f"outbox-{model}")))
    s.call(s.server.versions.load(model, "2", str(tiny_llama), "none"))
    return s


@pytest.fixture
def loop(start_server, tiny_llama, tmp_path, kafka_broker, services):
    """loop(prefix) -> (model, server with versions 1 and 2, controller holding the lease)."""
    def start(prefix: str):
        model = f"{prefix}-{uuid.uuid4().hex[:6]}"
        server = two_version_server(start_server, tiny_llama, tmp_path, kafka_broker.bootstrap_servers, model)
        ctl = services(f"g-{model}", "ctl")
        wait_until(lambda: ctl.service.leader, 20, "the lease")
        return model, server, ctl
    return start


def weights(server, model):
    return dict(server.server.router.weights.get(model, {}))


def test_good_candidate_is_promoted_through_every_step_and_the_server_follows(
        loop, start_server, tiny_llama, tmp_path, kafka_broker, capsys):
    model, server, ctl = loop("good")
    assert weights(server, model) == {"1": 1.0, "2": 0.0}
    traffic = Traffic(server.address, model)
    try:
        d = ctl.api.call("start", model=model, stable="1", candidate="2", steps=[20, 50, 100], **FAST)
        assert d["weights"] == {"1": 0.8, "2": pytest.approx(0.2)}
        seen = set()

        def promoted():
            seen.add(tuple(sorted((v, round(w, 6)) for v, w in weights(server, model).items())))
            s = status(ctl.api, model)
            assert s["phase"] not in ("rolled_back", "failed", "paused"), s["reason"]
            return s["phase"] == "promoted"
        wait_until(promoted, 90, "promotion", every=0.05)
    finally:
        traffic.stop()
    wait_until(lambda: weights(server, model) == {"1": 0.0, "2": 1.0}, 10, "the server to follow the promotion")
    # the server applied every step's weights on the way
    assert {(("1", 0.8), ("2", 0.2)), (("1", 0.5), ("2", 0.5))} <= seen, seen
    hist = ctl.api.call("history", model=model)
    assert [h["action"] for h in hist] == ["promoted"]
    # the same through `vigil rollout`, as a person types it
    from vigil.cli import main as vigil
    url = ctl.api.url
    assert vigil(["rollout", "history", model, "--url", url]) == 0
    assert vigil(["rollout", "status", model, "--url", url]) == 0
    out = capsys.readouterr().out
    assert "promoted    1 -> 2" in out and f"{model}: promoted" in out, out
    assert vigil(["rollout", "start", model, "--candidate", "1", "--steps", "50,20", "--url", url]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: steps: ")
    # a server that starts now reads the latest state before serving
    late = start_server(model=str(tiny_llama), model_name=model, version="2", quantize="none",
                        events=EventOptions(bootstrap_servers=kafka_broker.bootstrap_servers,
                                            outbox_dir=str(tmp_path / "outbox-late")))
    assert weights(late, model) == {"2": 1.0}


def test_bad_candidate_is_rolled_back_and_the_reason_names_the_check(loop, kafka_broker):
    model, server, ctl = loop("bad")
    traffic = Traffic(server.address, model)
    inject = Injector(kafka_broker.bootstrap_servers)
    try:
        ctl.api.call("start", model=model, stable="1", candidate="2", steps=[20, 50, 100], **FAST)
        wait_until(lambda: weights(server, model).get("2") == pytest.approx(0.2), 10, "the canary weights on the server")
        # the candidate fails half its requests (synthetic events for version 2)
        def failing():
            for _ in range(15):
                inject.send(model, "2", error=True)
            inject.flush()
            return status(ctl.api, model)["phase"] == "rolled_back"
        wait_until(failing, 30, "the rollback", every=0.3)
    finally:
        traffic.stop()
    s = ctl.api.call("status", model=model)
    assert "error_rate" in s["reason"] and "rolled back 2" in s["reason"], s["reason"]
    assert s["figures"], s
    wait_until(lambda: weights(server, model) == {"1": 1.0, "2": 0.0}, 10, "the server to follow the rollback")
    hist = ctl.api.call("history", model=model)
    assert [h["action"] for h in hist] == ["rolled_back"] and "error_rate" in hist[0]["reason"]


def test_one_request_per_second_is_inconclusive_never_a_rollback(loop, kafka_broker):
    model, server, ctl = loop("slow")
    traffic = Traffic(server.address, model, rate=1.0)
    try:
        ctl.api.call("start", model=model, stable="1", candidate="2", steps=[20, 50, 100],
                     **{**FAST, "inconclusive_limit": 3})

        def paused():
            s = status(ctl.api, model)
            assert s["phase"] in ("progressing", "paused"), s["reason"]
            return s["phase"] == "paused" and s
        s = wait_until(paused, 30, "the pause after the inconclusive limit", every=0.2)
    finally:
        traffic.stop()
    assert s["attention"] and "requests needed" in s["reason"], s
    assert ctl.api.call("history", model=model) == []
    assert weights(server, model) == {"1": 0.8, "2": pytest.approx(0.2)}  # held, not rolled back


def test_two_controllers_one_decides_and_the_other_resumes_mid_rollout(kafka_broker, services):
    model = f"ha-{uuid.uuid4().hex[:6]}"
    group = f"g-{model}"
    a, b = services(group, "ctl-a"), services(group, "ctl-b")
    leader, standby = wait_until(lambda: (a, b) if a.service.leader else (b, a) if b.service.leader else None, 20,
                           "a leader")
    time.sleep(1.0)
    assert not standby.service.leader
    with pytest.raises(RolloutError, match="standby"):
        standby.api.call("list_models")
    inject = Injector(kafka_broker.bootstrap_servers)
    stop = threading.Event()

    def feed():  # healthy traffic for both versions: 30 requests/s each
        rng = random.Random(1)
        while not stop.is_set():
            for _ in range(3):
                inject.send(model, "1", route="stable", latency=rng.gauss(0.05, 0.005))
                inject.send(model, "2", route="canary", latency=rng.gauss(0.05, 0.005))
            inject.flush()
            stop.wait(0.1)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        leader.api.call("start", model=model, stable="1", candidate="2", steps=[10, 30, 60, 100], **FAST)
        before = wait_until(lambda: (s := status(leader.api, model)) and s["step"] >= 1 and s, 30, "step 1")
        leader.stop()  # mid-rollout: the standby takes the lease and resumes from vigil.rollout
        wait_until(lambda: standby.service.leader, 30, "the standby to take over")
        after = standby.api.call("status", model=model)
        assert after["candidate"] == "2" and after["step"] >= before["step"], (before, after)
        assert after["generation"] >= before["generation"]
        wait_until(lambda: standby.api.call("status", model=model)["phase"] == "promoted", 60, "promotion by the standby")
    finally:
        stop.set()
        feeder.join(10)
    records = read_topic(kafka_broker.bootstrap_servers, topics.ROLLOUT,
                         lambda r: r.key() == model.encode(), 1000, timeout=5)
    states = [events_pb2.RolloutState.FromString(r.value()) for r in records]
    gens = [s.generation for s in states]
    assert gens == sorted(gens) and len(set(gens)) == len(gens), gens  # one decider at a time, no fork
    sources = [s.source.rsplit("/", 1)[-1] for s in states]
    first_b = sources.index(standby.service.instance)
    assert set(sources[:first_b]) == {leader.service.instance} and set(sources[first_b:]) == {standby.service.instance}
    assert states[-1].phase == events_pb2.RolloutPhase.Value("ROLLOUT_PHASE_PROMOTED")


def test_bluegreen_is_analysed_on_shadow_copies_then_switches_at_once(loop, kafka_broker):
    model, server, ctl = loop("bg")
    traffic = Traffic(server.address, model)
    try:
        ctl.api.call("start", model=model, stable="1", candidate="2", strategy="bluegreen", **FAST)
        wait_until(lambda: server.server.router.shadows.get(model) == ("2",), 10, "the server to shadow version 2")
        assert weights(server, model) == {"1": 1.0, "2": 0.0}  # all answers still come from 1

        def switched():
            s = status(ctl.api, model)
            assert s["phase"] not in ("rolled_back", "failed", "paused"), s["reason"]
            return weights(server, model) == {"1": 0.0, "2": 1.0}
        wait_until(switched, 60, "the switch to 2", every=0.1)
        assert server.server.router.shadows.get(model) == ()
    finally:
        traffic.stop()
    def shadow_copy(record):
        try:
            ev = events_pb2.InferenceEvent.FromString(record.value())
        except DecodeError:  # other tests put undecodable records on the topic on purpose
            return False
        return ev.model == model and ev.route == events_pb2.ROUTE_SHADOW
    copies = [events_pb2.InferenceEvent.FromString(r.value())
              for r in read_topic(kafka_broker.bootstrap_servers, topics.INFERENCE, shadow_copy, 12)]
    assert len(copies) >= 12 and all(e.version == "2" and e.shadow_of for e in copies)
    assert "1" in server.server.router.versions[model]  # the old version stays loaded for a switch back


def test_a_flag_set_through_the_controller_reaches_the_server_and_its_answers(loop, kafka_broker, capsys):
    model, server, ctl = loop("flag")
    from vigil.cli import main as vigil
    url = ctl.api.url
    assert vigil(["rollout", "register", model, "1", "--stable", "1", "--url", url]) == 0
    assert vigil(["rollout", "set-flag", model, "eu-beta", "--percentage", "100", "--rule", "region:in:eu,uk",
                  "--url", url]) == 0
    assert "flag eu-beta 100% where region in ['eu', 'uk']" in capsys.readouterr().out
    wait_until(lambda: "eu-beta" in server.server.router.flags.get(model, {}), 10, "the flag on the server")
    with grpc.insecure_channel(server.address) as ch:
        stub = llm_pb2_grpc.LLMStub(ch)

        def ask(region):
            return stub.Generate(llm_pb2.GenerateRequest(model=model, prompt="hi", routing_key="u1",
                                                         attributes={"region": region},
                                                         sampling=llm_pb2.SamplingParams(max_tokens=1)), timeout=30)
        assert list(ask("uk").flags) == ["eu-beta"] and list(ask("us").flags) == []
    assert vigil(["rollout", "set-flag", model, "bad", "--percentage", "-5", "--url", url]) == 2
    assert "flags.bad.percentage" in capsys.readouterr().err
    assert vigil(["rollout", "remove-flag", model, "eu-beta", "--url", url]) == 0
    wait_until(lambda: not server.server.router.flags.get(model), 10, "the flag gone from the server")
