"""The supervisor of long-lived tasks: a failure is logged with its traceback, counted,
shown as down while the task waits for its restart, and the task goes on working."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from eventbus.supervise import Supervisor


async def until(cond, timeout: float = 10.0, what: str = "a condition", every: float = 0.005):
    """cond()'s first true value (cond may be a coroutine function)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = cond()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


def wait(cond, timeout: float, what: str):
    """cond()'s first true value, from a thread of the test's own."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)
    return got


def task_failures(metrics_url: str, task: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    m = re.search(rf'^vigil_task_failures_total\{{task="{task}"\}} (\S+)$', text, re.M)
    return float(m.group(1))


def test_a_failing_task_is_logged_counted_down_then_restarted(caplog):
    async def main():
        registry = CollectorRegistry()
        changes = []
        sup = Supervisor(registry, min_backoff=0.05, max_backoff=1.0, on_change=lambda s: changes.append(s.ready))
        fail = asyncio.Event()
        ticks = []

        async def work():
            while True:
                if fail.is_set():
                    raise RuntimeError("boom in work")
                ticks.append(1)
                await asyncio.sleep(0.01)

        sup.start("work", work)
        value = lambda name: registry.get_sample_value(name, {"task": "work"})  # noqa: E731
        assert value("vigil_task_failures_total") == 0 and value("vigil_task_up") == 1
        await until(lambda: ticks, what="the task to run")
        fail.set()
        await until(lambda: not sup.ready, what="the task to be down")
        assert sup.down() == ["work"] and value("vigil_task_up") == 0
        await until(lambda: value("vigil_task_failures_total") >= 2, what="a second failure")
        fail.clear()
        ticks.clear()
        await until(lambda: ticks and sup.ready, what="the task to work again")
        assert value("vigil_task_up") == 1 and changes[0] is False and changes[-1] is True
        await sup.stop()
        assert not sup.tasks and value("vigil_task_up") is None

    with caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
        asyncio.run(main())
    failed = [r for r in caplog.records if "task work failed" in r.getMessage()]
    assert failed and "boom in work" in caplog.text and "Traceback" in caplog.text
    assert "1 in a row" in failed[0].getMessage() and "2 in a row" in failed[1].getMessage()


def test_backoff_doubles_and_is_bounded():
    async def main():
        sup = Supervisor(min_backoff=0.02, max_backoff=0.08)
        starts = []

        async def crash():
            starts.append(asyncio.get_running_loop().time())
            raise ValueError("always")

        sup.start("crash", crash)
        await until(lambda: len(starts) >= 6, what="six starts")
        await sup.stop()
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08
        assert all(g < 0.5 for g in gaps), gaps  # bounded by max_backoff, with room for a busy machine

    asyncio.run(main())


def test_a_task_that_returns_ends_and_stop_cancels_the_others():
    async def main():
        sup = Supervisor()
        done, cancelled = asyncio.Event(), asyncio.Event()

        async def once():
            done.set()

        async def forever():
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()

        sup.start("once", once)
        sup.start("forever", forever)
        await asyncio.wait_for(done.wait(), 5)
        await until(lambda: "once" not in sup.tasks, what="the finished task to leave")
        assert sup.ready and list(sup.tasks) == ["forever"]
        with pytest.raises(ValueError, match="already supervised"):
            sup.start("forever", forever)
        await sup.stop("forever")
        assert cancelled.is_set() and not sup.tasks

    asyncio.run(main())


def test_a_cancel_from_inside_is_a_failure_not_an_end(caplog):
    async def main():
        registry = CollectorRegistry()
        sup = Supervisor(registry, min_backoff=0.01)
        runs = []

        async def cancelled_inside():
            runs.append(1)
            if len(runs) == 1:
                raise asyncio.CancelledError()  # as a library's own cancelled retry does
            await asyncio.Event().wait()

        sup.start("inner", cancelled_inside)
        await until(lambda: len(runs) == 2, what="the restart")
        assert registry.get_sample_value("vigil_task_failures_total", {"task": "inner"}) == 1
        await sup.stop()

    with caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
        asyncio.run(main())
    assert "task inner failed" in caplog.text


# ---- the services' tasks under the supervisor, against the embedded broker ----------------

from tests.test_alerting_service import files, options, produce, recorder, signal  # noqa: E402,F401


async def http_get(url: str) -> tuple[int, str]:
    import aiohttp
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


@pytest.mark.asyncio(loop_scope="session")
async def test_alerting_signals_task_failing_is_shown_and_reads_its_batch_again(kafka_broker, files, recorder,
                                                                                caplog):
    """The fault is injected where the signals task hands a batch to the core
    (AlertingCore.ingest_many): it raises until the test has seen the task down."""
    import uuid

    from alerting.service import AlertingService

    model = f"sup-{uuid.uuid4().hex[:6]}"
    service = AlertingService(options(kafka_broker, files, f"t-{model}"))
    await service.start()
    try:
        registry = service.core.registry

        async def ready(want: int):
            status, text = await http_get(f"{service.admin.url}/-/ready")
            return status == want and text

        assert await ready(200)
        ingest, broken = service.core.ingest_many, asyncio.Event()

        def faulty(sigs):
            if broken.is_set():
                raise RuntimeError("injected ingest fault")
            return ingest(sigs)

        service.core.ingest_many = faulty
        taken = lambda: registry.get_sample_value("vigil_alerting_signals_total") or 0  # noqa: E731
        before = taken()
        with caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
            broken.set()
            await produce(kafka_broker.bootstrap_servers, signal(model))
            assert "alerting-signals down" in await until(lambda: ready(503), 30, "not ready")
            assert registry.get_sample_value("vigil_task_failures_total", {"task": "alerting-signals"}) >= 1
            broken.clear()
            await until(lambda: ready(200), 60, "ready again")
        assert "task alerting-signals failed" in caplog.text and "injected ingest fault" in caplog.text
        await until(lambda: taken() > before, 30, "the failed batch taken in after the restart")

        async def fired():  # the rule's `for` passes while signals keep coming
            await produce(kafka_broker.bootstrap_servers, signal(model))
            return recorder.received
        await until(fired, 30, "the alert's webhook", every=0.2)
    finally:
        await service.stop()


def test_processor_consume_task_failing_is_shown_and_reads_its_fetch_again(caplog):
    """The fault is injected where the consumer loop hands a fetch to Runner.process: it
    raises until the test has seen the task down; then every event is counted once."""
    from stream_processors.processor import Settings
    from stream_processors.runner import Runner, RunnerOptions
    from tests.test_processor import SMALL, counted, event, own_broker, produce, record

    async def main(bootstrap: str):
        await produce(bootstrap, [record(event(i, "sup", "v1"), "vigil.inference.events") for i in range(300)])
        runner = Runner(RunnerOptions(bootstrap_servers=bootstrap, group_id="sup", metrics_port=-1,
                                      checkpoint_interval=0.3, session_timeout_ms=6000, settings=Settings(**SMALL)))
        runner.tasks.min_backoff = 0.05
        process, broken = runner.process, asyncio.Event()

        def faulty(tp, records, outs):
            if broken.is_set() and records:
                raise RuntimeError("injected process fault")
            return process(tp, records, outs)

        runner.process = faulty
        value = lambda name: runner.metrics.registry.get_sample_value(name, {"task": "process-consume"})  # noqa: E731
        broken.set()
        await runner.start()
        task = asyncio.create_task(runner.run())
        try:
            await until(lambda: value("vigil_task_up") == 0, 60, "the consumer task down")
            assert value("vigil_task_failures_total") >= 1 and runner.tasks.down() == ["process-consume"]
            broken.clear()
            await until(lambda: counted(runner)[0] == 300, 60, "every event counted")
            assert runner.tasks.ready and value("vigil_task_up") == 1
            await produce(bootstrap, [record(event(i, "sup", "v1"), "vigil.inference.events")
                                      for i in range(300, 400)])
            await until(lambda: counted(runner)[0] == 400, 60, "the events after the restart")
        finally:
            runner.stopping.set()
            await task
            await runner.stop()

    with caplog.at_level(logging.ERROR, logger="eventbus.supervise"), own_broker() as broker:
        asyncio.run(main(broker.bootstrap_servers))
    assert "task process-consume failed" in caplog.text and "injected process fault" in caplog.text


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
    from inference.server import EventOptions
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
    wait(lambda: model in follower.desired, 30, "the follower to take the record")

    loaded, broken, calls = follower.loaded, threading.Event(), []

    def faulty(m):
        calls.append(m)
        if broken.is_set():
            raise RuntimeError("injected follower fault")
        return loaded(m)

    failures = lambda: task_failures(s.metrics_url, "rollout-versions")  # noqa: E731

    follower.loaded = faulty
    with grpc.insecure_channel(s.address) as channel, \
            caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
        check = lambda: health_pb2_grpc.HealthStub(channel).Check(  # noqa: E731
            health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert check() == health_pb2.HealthCheckResponse.SERVING and failures() == 0
        broken.set()
        wait(lambda: check() == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "NOT_SERVING")
        assert failures() >= 1
        broken.clear()
        wait(lambda: check() == health_pb2.HealthCheckResponse.SERVING, 60, "SERVING again")
    assert "task rollout-versions failed" in caplog.text and "injected follower fault" in caplog.text
    seen = len(calls)
    wait(lambda: len(calls) > seen + 2, 30, "the version watch to go on")


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
    from inference.server import EventOptions
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

    failures = lambda: task_failures(s.metrics_url, "vigil-publisher")  # noqa: E731

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
        wait(lambda: check() == health_pb2.HealthCheckResponse.NOT_SERVING, 30, "NOT_SERVING")
        for _ in range(2):
            ask()  # answered while the pump is down: their events wait in the outbox
        assert failures() >= 1
        broken.clear()
        wait(lambda: check() == health_pb2.HealthCheckResponse.SERVING, 60, "SERVING again")
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
