"""The server's long-lived tasks under the supervisor: the rollout follower's version
watch and the event publisher's pump fail, gRPC health says NOT_SERVING while they are
down, and they go on working after their restart without losing an event."""

from __future__ import annotations

import logging

from tests.helpers.serving import metric
from tests.helpers.waiting import wait_until


def test_server_follower_task_failing_turns_grpc_health_not_serving(start_server, tiny_llama, kafka_broker,
                                                                    tmp_path, caplog):
    """The fault is injected where the follower's version watch asks which versions are
    loaded (RolloutFollower.loaded): it raises until the test has seen the server not serving."""
    import threading
    import uuid

    import grpc
    from confluent_kafka import Producer
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from eventbus import topics
    from inference.api.options import EventOptions
    from protos import events_pb2

    model = f"follow-{uuid.uuid4().hex[:6]}"
    s = start_server(model=str(tiny_llama), model_name=model, version="1", quantize="none",
                     events=EventOptions(bootstrap_servers=kafka_broker.bootstrap_servers,
                                         outbox_dir=str(tmp_path / "outbox")))
    follower = s.server.follower
    state = events_pb2.RolloutState(event_id=f"{model}:1", model=model, stable_version="1", generation=1)
    state.weights.add(version="1", weight=1.0)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers, "log_level": 3})
    producer.produce(topics.ROLLOUT, value=state.SerializeToString(), key=model)
    producer.flush(10)
    wait_until(lambda: model in follower.desired, 30, "the follower to take the record")

    loaded, broken, calls = follower.loaded, threading.Event(), []

    def faulty(m):
        calls.append(m)
        if broken.is_set():
            raise RuntimeError("injected follower fault")
        return loaded(m)

    failures = lambda: metric(s.metrics_url, "vigil_task_failures_total", task="rollout-versions")  # noqa: E731

    follower.loaded = faulty
    with grpc.insecure_channel(s.address) as channel, \
            caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
        check = lambda: health_pb2_grpc.HealthStub(channel).Check(  # noqa: E731
            health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert check() == health_pb2.HealthCheckResponse.SERVING and failures() == 0
        broken.set()
        wait_until(lambda: check() == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "NOT_SERVING")
        assert failures() >= 1
        broken.clear()
        wait_until(lambda: check() == health_pb2.HealthCheckResponse.SERVING, 60, "SERVING again")
    assert "task rollout-versions failed" in caplog.text and "injected follower fault" in caplog.text
    seen = len(calls)
    wait_until(lambda: len(calls) > seen + 2, 30, "the version watch to go on")


def test_server_publisher_pump_failing_is_shown_and_loses_nothing(start_server, tiny_llama, kafka_broker,
                                                                   tmp_path, caplog):
    """The fault is injected in the pump's step (Publisher.step) while requests are served:
    the failure is logged and counted, gRPC health says NOT_SERVING until the pump runs
    again, and every event of every answered request reaches the topic."""
    import asyncio
    import threading
    import uuid

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from eventbus import topics
    from eventbus.consumer import tail
    from inference.api.options import EventOptions
    from protos import llm_pb2, llm_pb2_grpc

    model = f"pump-{uuid.uuid4().hex[:6]}"
    s = start_server(model=str(tiny_llama), model_name=model, version="1", quantize="none",
                     events=EventOptions(bootstrap_servers=kafka_broker.bootstrap_servers,
                                         outbox_dir=str(tmp_path / "outbox")))
    publisher = s.server.publisher
    step, broken = publisher.step, threading.Event()

    async def faulty():
        if broken.is_set():
            raise RuntimeError("injected pump fault")
        return await step()

    failures = lambda: metric(s.metrics_url, "vigil_task_failures_total", task="vigil-publisher")  # noqa: E731

    publisher.step = faulty
    ids = []
    with grpc.insecure_channel(s.address) as channel, caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
        llm = llm_pb2_grpc.LLMStub(channel)
        check = lambda: health_pb2_grpc.HealthStub(channel).Check(  # noqa: E731
            health_pb2.HealthCheckRequest(service=""), timeout=10).status

        def ask():
            ids.append(f"{model}-{len(ids)}")
            llm.Generate(llm_pb2.GenerateRequest(model=model, prompt="hi", request_id=ids[-1],
                                                 sampling=llm_pb2.SamplingParams(max_tokens=2)), timeout=60)
        ask()
        broken.set()
        ask()  # its event wakes the pump, which fails
        wait_until(lambda: check() == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "NOT_SERVING")
        for _ in range(2):
            ask()  # answered while the pump is down: their events wait in the outbox
        assert failures() >= 1
        broken.clear()
        wait_until(lambda: check() == health_pb2.HealthCheckResponse.SERVING, 60, "SERVING again")
        ask()
    assert "task vigil-publisher failed" in caplog.text and "injected pump fault" in caplog.text

    async def delivered() -> set:
        seen = set()
        async for r in tail(kafka_broker.bootstrap_servers, topics.INFERENCE, from_beginning=True, idle_timeout=3):
            if r.message is not None and r.message.model == model:
                seen.add(r.message.request_id)
                if seen == set(ids):
                    break
        return seen
    assert asyncio.run(delivered()) == set(ids)
