"""`vigil process` against a real broker (Tansu): drift, feedback joins, dead letters,
two processes sharing a group, and a processor killed mid-stream that resumes from its
checkpoint with the same final statistics as an uninterrupted run."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
import zlib

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from eventbus import cloudevents, codec, compat, topics  # noqa: F401  (compat patches aiokafka)
from protos import events_pb2
from stream_processors.processor import PartitionState
from stream_processors.runner import Runner
from stream_processors.settings import RunnerOptions, Settings
from tests.helpers.waiting import until

SMALL = dict(ks_window=100, psi_window=200, chi2_window=200, signal_every=200, calibration_every=50,
             quality_window=20)
CLI_SMALL = ["--ks-window", "100", "--psi-window", "200", "--chi2-window", "200", "--signal-every", "200",
             "--calibration-every", "50", "--quality-window", "20"]


def event(i: int, model: str, version: str, shift: float = 0.0, classify: bool = False, rng=random):
    e = events_pb2.InferenceEvent(
        event_id=f"{model}-{version}-{i}", request_id=f"{model}-{version}-r{i}", model=model, version=version,
        method="Classify" if classify else "Generate", status=1, prompt_tokens=rng.randint(10, 50),
        completion_tokens=rng.randint(5, 30), finish_reason=rng.choice(["stop", "length"]),
        total_seconds=rng.lognormvariate(-1, 0.3), first_token_seconds=rng.uniform(0.01, 0.1))
    e.confidence.mean_logprob = rng.gauss(-1.0 + shift, 0.2)
    e.confidence.mean_entropy = rng.gauss(2.0, 0.3)
    e.confidence.min_top1_prob = rng.random()
    if classify:
        p = rng.uniform(0.5, 1.0)
        e.label_probabilities["yes"], e.label_probabilities["no"] = p, 1 - p
    e.time.FromNanoseconds(int((1.7e9 + i * 0.01) * 1e9))
    return e


def feedback(e: events_pb2.InferenceEvent, label: str):
    f = events_pb2.FeedbackEvent(event_id="fb-" + e.request_id, request_id=e.request_id, model=e.model,
                                 version=e.version, label=label)
    f.time.CopyFrom(e.time)
    return f


def record(message, topic: str):
    key = topics.event_key(message.model).encode()
    headers = cloudevents.headers(message.event_id, message.DESCRIPTOR.full_name, "test", time.time(),
                                  codec.PROTOBUF)
    return topic, message.SerializeToString(), key, headers


async def produce(bootstrap: str, records) -> None:
    # the topics as `vigil process` makes them (6 partitions each, so an event and its feedback
    # share a partition number), not as the broker would auto-create them on first write
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await topics.ensure_topics(admin, [topics.INFERENCE, topics.FEEDBACK, topics.SIGNALS, topics.DEADLETTER,
                                           topics.CHECKPOINTS], topics.TopicOptions())
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(t, v, key=k, headers=h) for t, v, k, h in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class Tail:
    """A topic read from its beginning and followed, without end offsets (Tansu's ListOffsets
    can answer a batch's base offset, too low): tests wait for what they expect to arrive
    (``until``) or for the topic to go quiet (``settle``), never for an end offset."""

    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap, self.topic = bootstrap, topic
        self.records: list = []
        self.latest: dict[bytes, bytes] = {}   # key -> latest value (compacted topics)

    async def __aenter__(self) -> "Tail":
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                         auto_offset_reset="earliest", max_partition_fetch_bytes=32 << 20,
                                         fetch_max_bytes=64 << 20)
        await self.consumer.start()
        deadline = time.monotonic() + 30
        while not (parts := self.consumer.partitions_for_topic(self.topic)):
            assert time.monotonic() < deadline, f"topic {self.topic} not found"
            await self.consumer.topics()  # a fresh client knows no partitions until it asks
            await asyncio.sleep(0.1)
        tps = [TopicPartition(self.topic, p) for p in parts]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.consumer.stop()

    async def poll(self, timeout_ms: int = 200) -> int:
        got = await self.consumer.getmany(timeout_ms=timeout_ms)
        n = 0
        for rs in got.values():
            for r in rs:
                self.records.append(r)
                if r.key is not None:
                    self.latest[r.key] = r.value
                n += 1
        return n

    async def until(self, cond, timeout: float, what: str, show=lambda: "") -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} {show()}")
            await self.poll()

    async def settle(self, quiet: int = 3) -> None:
        """Read on until `quiet` fetches in a row come back empty."""
        empty = 0
        while empty < quiet:
            empty = 0 if await self.poll() else empty + 1

    def signals(self, model: str) -> list[events_pb2.Signal]:
        out = [events_pb2.Signal.FromString(r.value) for r in self.records]
        return [s for s in out if s.model == model]

    def checkpoints(self, group: str, decode: bool = True) -> dict:
        raw = {int(k.decode().rsplit("/", 1)[1]): v for k, v in self.latest.items()
               if k.decode().startswith(group + "/")}
        if not decode:
            return raw
        return {p: PartitionState.decode(v, Settings(**SMALL)) for p, v in raw.items()}

    def counted(self, group: str) -> tuple[int, int]:
        """(events, feedbacks) in the group's latest checkpoints, without building detectors."""
        n_events = n_feedback = 0
        for v in self.checkpoints(group, decode=False).values():
            for m in json.loads(zlib.decompress(v))["models"].values():
                n_events += m["n_events"]
                n_feedback += m["n_feedback"]
        return n_events, n_feedback


def counted(runner: Runner) -> tuple[int, int]:
    ms = [m for st in list(runner.states.values()) for m in st.models.values()]
    return sum(m.n_events for m in ms), sum(m.n_feedback for m in ms)


async def run_in_process(bootstrap: str, group: str, want: tuple[int, int]) -> None:
    """An in-process runner until its state holds `want` (events, feedbacks); it checkpoints
    when it stops."""
    runner = Runner(RunnerOptions(bootstrap_servers=bootstrap, group_id=group, metrics_port=-1,
                                  checkpoint_interval=0.3, session_timeout_ms=6000, settings=Settings(**SMALL)))
    await runner.start()
    task = asyncio.create_task(runner.run())
    deadline = time.monotonic() + 60
    try:
        while counted(runner) != want:
            assert time.monotonic() < deadline and not task.done(), f"runner got to {counted(runner)} of {want}"
            await asyncio.sleep(0.05)
    finally:
        runner.stopping.set()
        await task
        await runner.stop()


def own_broker():
    """A broker of the test's own: a group new to the input topics reads them from the
    beginning, so events other tests left on a shared broker would be counted too."""
    from eventbus.broker import EmbeddedBroker

    return EmbeddedBroker()


def test_drift_feedback_and_dead_letters():
    with own_broker() as broker:
        asyncio.run(drift_feedback_and_dead_letters(broker.bootstrap_servers))


async def drift_feedback_and_dead_letters(bootstrap: str) -> None:
    tag = uuid.uuid4().hex[:6]
    drifting, steady, clf = f"drift-{tag}", f"steady-{tag}", f"clf-{tag}"
    rng = random.Random(1)
    recs = []
    for i in range(1200):
        recs.append(record(event(i, drifting, "v1", shift=0.0 if i < 600 else 1.0, rng=rng), topics.INFERENCE))
        recs.append(record(event(i, steady, "v1", rng=rng), topics.INFERENCE))
        if i == 300:  # undecodable, in the middle of the stream
            recs.append((topics.INFERENCE, b"\xff\xfe not a protobuf", f"{drifting}/v1".encode(),
                         cloudevents.headers("bad-" + tag, "vigil.events.v1.InferenceEvent", "test", time.time(),
                                             codec.PROTOBUF)))
    for i in range(300):
        e = event(i, clf, "v1", classify=True, rng=rng)
        recs.append(record(e, topics.INFERENCE))
        p_yes = e.label_probabilities["yes"]
        recs.append(record(feedback(e, "yes" if rng.random() < p_yes else "no"), topics.FEEDBACK))
    await produce(bootstrap, recs)
    group = "g-" + tag
    await run_in_process(bootstrap, group, (2700, 300))

    async with Tail(bootstrap, topics.SIGNALS) as sig, Tail(bootstrap, topics.DEADLETTER) as dl, \
            Tail(bootstrap, topics.CHECKPOINTS) as cp:
        # everything was flushed before the runner stopped: wait for the last of it to be read
        await sig.until(lambda: any(s.detector == "accuracy" and s.window_size == 300 for s in sig.signals(clf)),
                        30, "the last accuracy signal")
        await sig.settle()
        mine = lambda: [d for d in map(events_pb2.DeadLetter.FromString, (r.value for r in dl.records))
                        if d.key == f"{drifting}/v1".encode() and d.value.startswith(b"\xff\xfe")]
        await dl.until(lambda: mine(), 30, "the dead letter")
        await dl.settle()
        await cp.until(lambda: cp.counted(group) == (2700, 300), 30, "the final checkpoints")

        drifted = {(s.detector, s.feature) for s in sig.signals(drifting) if s.drifted}
        assert ("ks", "mean_logprob") in drifted and ("adwin", "mean_logprob") in drifted, drifted
        steady_signals = sig.signals(steady)
        assert not [(s.detector, s.feature) for s in steady_signals if s.drifted and s.feature == "mean_logprob"]
        readings = [s for s in steady_signals if s.detector == "ks" and s.feature == "mean_logprob"]
        assert readings and all(s.HasField("p_value") and s.window_size > 0 for s in readings)

        cal = sig.signals(clf)
        acc = [s for s in cal if s.detector == "accuracy"]
        eces = {s.detector for s in cal if s.detector.startswith("ece")}
        assert acc and 0.5 < acc[-1].statistic <= 1.0 and acc[-1].window_size == 300
        assert eces == {"ece", "ece_equal_mass"}
        assert any(s.detector == "brier" for s in cal)
        last = [s for s in cal if s.detector == "ece"][-1]
        assert last.reliability and sum(b.count for b in last.reliability) == last.window_size
        assert all(not s.labels for s in sig.signals(steady) + cal)  # nothing in labels but series labels

        letters = mine()
        assert len(letters) == 1 and letters[0].reason and letters[0].topic == topics.INFERENCE
        # processing went on after it: every event of the drifting model was counted
        cps = cp.checkpoints(group)
    counted_ = {k: m.n_events for st in cps.values() for k, m in st.models.items()}
    assert counted_[f"{drifting}/v1"] == 1200 and counted_[f"{steady}/v1"] == 1200
    assert sum(m.n_joined for st in cps.values() for m in st.models.values()) == 300


def start_process(bootstrap: str, group: str, log) -> subprocess.Popen:
    env = dict(os.environ, VIGIL_METRICS_PORT="0")
    return subprocess.Popen([sys.executable, "-m", "vigil.cli", "process", "--bootstrap-servers", bootstrap,
                             "--group-id", group, "--checkpoint-interval", "0.3", "--session-timeout-ms", "6000",
                             "--max-records", "200", *CLI_SMALL],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def summaries(cps: dict[int, PartitionState], models) -> dict:
    return {k: m.summary() for st in cps.values() for k, m in st.models.items() if m.model in models}


def test_group_takeover_and_crash_restart(tmp_path):
    with own_broker() as broker:
        asyncio.run(group_takeover_and_crash_restart(broker.bootstrap_servers, tmp_path))


async def group_takeover_and_crash_restart(bootstrap: str, tmp_path) -> None:
    tag = uuid.uuid4().hex[:6]
    models = [f"m{i}-{tag}" for i in range(6)]
    rng = random.Random(2)
    phases: list[list] = [[], [], []]
    for i in range(1500):
        for j, m in enumerate(models):
            e = event(i, m, "v1", shift=1.0 if (j == 0 and i > 700) else 0.0, classify=(j == 1), rng=rng)
            phases[i * 3 // 1500].append(record(e, topics.INFERENCE))
            if j == 1 and i % 2 == 0:
                phases[i * 3 // 1500].append(record(feedback(e, "yes"), topics.FEEDBACK))
    want = (9000, 750)
    first = (sum(r[0] == topics.INFERENCE for r in phases[0]), sum(r[0] == topics.FEEDBACK for r in phases[0]))
    group = "crash-" + tag
    logs = {n: open(tmp_path / f"{n}.log", "w+") for n in "abc"}
    text = lambda n: (tmp_path / f"{n}.log").read_text()
    procs = {}

    await produce(bootstrap, [])  # creates the topics
    async with Tail(bootstrap, topics.CHECKPOINTS) as cp:
        # two processes share the partitions (a third of the stream is there when they start)
        await produce(bootstrap, phases[0])
        procs["a"], procs["b"] = start_process(bootstrap, group, logs["a"]), start_process(bootstrap, group, logs["b"])
        try:
            both = lambda: all("partition" in text(n) for n in "ab") and cp.counted(group) == first
            await cp.until(both, 120, "both processors to own partitions and checkpoint the first third",
                           lambda: f"{cp.counted(group)} of {first}, {len(cp.latest)} keys, {len(cp.records)} records")
            # a is killed as the rest of the stream starts to arrive; b takes its partitions over
            more = asyncio.create_task(produce(bootstrap, phases[1] + phases[2]))
            await asyncio.sleep(0)  # the producer's task starts
            os.kill(procs["a"].pid, signal.SIGKILL)
            procs["a"].wait()
            await more
            await cp.until(lambda: "resumed from its checkpoint" in text("b"), 90, "b to take a's partitions over")
            await cp.until(lambda: cp.counted(group) == want, 90, "the survivor to finish every partition")
            # a third process joins: the work is shared again, from the checkpoints
            procs["c"] = start_process(bootstrap, group, logs["c"])
            await cp.until(lambda: "resumed from its checkpoint" in text("c"), 120, "c to take partitions over")
        finally:
            for n in ("c", "b", "a"):
                if n in procs:
                    stop(procs[n])
        for n in "bc":
            assert "vigil process: stopped" in text(n), text(n)
        await cp.until(lambda: cp.counted(group) == want, 30, "the final checkpoints")

        # an uninterrupted run over the same records
        ref = "ref-" + tag
        await run_in_process(bootstrap, ref, want)
        await cp.until(lambda: cp.counted(ref) == want, 30, "the reference checkpoints")
        await cp.settle()
        expected = summaries(cp.checkpoints(ref), models)
        got = summaries(cp.checkpoints(group), models)
    assert sum(s["n_events"] for s in expected.values()) == 9000
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == expected[k], k


def test_processor_consume_task_failing_is_shown_and_reads_its_fetch_again(caplog):
    """The fault is injected where the consumer loop hands a fetch to Runner.process: it
    raises until the test has seen the task down; then every event is counted once."""
    from stream_processors.settings import Settings

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
