"""The processor's batch paths, without a broker: fields read a column at a time equal the
per-event definition, a fetch decoded in one call equals decoding record by record (bad
records included), and the state does not depend on how the records were fetched."""

from __future__ import annotations

import json
import math
import random
import time

import numpy as np
import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition

from eventbus import cloudevents, codec, topics
from protos import events_pb2
from stream_processors.processor import CONTINUOUS, PartitionState, read_events
from stream_processors.settings import RunnerOptions, Settings
from stream_processors.runner import Runner, fast_decode

SMALL = dict(ks_window=50, psi_window=80, chi2_window=80, signal_every=150, calibration_every=40, quality_window=10,
             calibration_window=300)
WORDS = "the a cat dog sat on mat and ran".split()


def mixed_events(n: int, seed: int = 0) -> list:
    """Every kind of event the processor meets: errors, no confidence, Classify with 2 or 3
    labels, texts, token hashes or neither, several models and versions, zero first-token times."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        classify = rng.random() < 0.3
        e = events_pb2.InferenceEvent(
            event_id=f"e{i}", request_id=f"r{i}" if rng.random() > 0.05 else "", model=rng.choice(["m0", "m1"]),
            version=rng.choice(["v1", "v2"]), route=rng.choice([0, 1, 2, 3, 4]),
            method="Classify" if classify else rng.choice(["Generate", "GenerateStream"]),
            status=1 if rng.random() > 0.1 else rng.choice([2, 4, 7]), prompt_tokens=rng.randint(1, 300),
            completion_tokens=rng.randint(0, 200), finish_reason=rng.choice(["stop", "length", ""]),
            total_seconds=rng.lognormvariate(-1, 0.3), first_token_seconds=rng.choice([0.0, rng.uniform(0, 0.1)]))
        if rng.random() < 0.8:
            e.confidence.mean_logprob = rng.gauss(-1.0 if e.model == "m0" or i < n // 2 else 0.0, 0.2)
            e.confidence.mean_entropy = rng.gauss(2.0, 0.3)
            e.confidence.min_top1_prob = rng.random()
        if classify:
            ps = [rng.random() for _ in range(rng.choice([2, 3]))]
            for j, p in enumerate(ps):
                e.label_probabilities[f"l{j}"] = p / sum(ps)
        elif rng.random() < 0.5:
            e.completion_text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
            if rng.random() < 0.5:  # a server that sends both: the hashes are what counts
                e.completion_token_hashes.extend(rng.randrange(2 ** 32) for _ in range(rng.randint(0, 12)))
        elif rng.random() < 0.5:
            e.completion_token_hashes.extend(rng.randrange(20) for _ in range(rng.randint(0, 12)))
        e.time.FromNanoseconds(int((1.7e9 + i * 0.01) * 1e9))
        out.append(e)
    return out


def row(ev) -> tuple:
    """The features of one event, by definition."""
    ok = ev.status == 1
    conf = ev.confidence if ev.HasField("confidence") else None
    probs = ev.label_probabilities
    nan = math.nan
    return (float(ev.prompt_tokens), float(ev.completion_tokens) if ok else nan,
            conf.mean_logprob if conf else nan, conf.mean_entropy if conf else nan, conf.min_top1_prob if conf else nan,
            ev.total_seconds if ok else nan, ev.first_token_seconds if ok and ev.first_token_seconds > 0 else nan,
            max(probs.values()) if probs else nan)


def test_read_events_equals_the_definition_event_by_event():
    events = mixed_events(3000)
    b = read_events(events)
    expected = np.array([row(e) for e in events]).T
    assert b.X.shape == (len(CONTINUOUS), len(events))
    assert np.array_equal(b.X, expected, equal_nan=True)
    assert b.errors.tolist() == [0.0 if e.status == 1 else 1.0 for e in events]
    assert b.finish == [e.finish_reason for e in events]
    assert b.routes.tolist() == [e.route for e in events]
    assert b.times.tolist() == [e.time.seconds + e.time.nanos * 1e-9 for e in events]
    judged = [e.status == 1 and e.method != "Classify" for e in events]
    assert b.judged.tolist() == judged and b.lengths.tolist() == [e.completion_tokens for e in events]
    assert b.tokens == {i: list(e.completion_token_hashes) or e.completion_text.split() for i, e in enumerate(events)
                        if judged[i] and (e.completion_token_hashes or e.HasField("completion_text"))}
    assert b.labelled == [(i, sorted(e.label_probabilities), [e.label_probabilities[k] for k in sorted(e.label_probabilities)])
                          for i, e in enumerate(events) if e.label_probabilities]
    groups = {}
    for i, e in enumerate(events):
        groups.setdefault((e.model, e.version), []).append(i)
    assert {k: v.tolist() for k, v in b.groups.items()} == groups and list(b.groups) == list(groups)


def records(messages, topic: str, bad_at=(), json_at=()) -> list:
    out = []
    for i, m in enumerate(messages):
        fmt = codec.JSON if i in json_at else codec.PROTOBUF
        headers = cloudevents.headers(m.event_id, m.DESCRIPTOR.full_name, "test", time.time(), fmt)
        value = b"\xff\xfe not a protobuf" if i in bad_at else codec.encode(m, fmt)
        out.append(ConsumerRecord(topic, 0, i, 0, 0, b"k", value, None, 0, len(value), headers))
    return out


@pytest.mark.parametrize("bad_at", [(), (0,), (7, 99)])
def test_a_fetch_decodes_as_its_records_one_by_one(bad_at):
    events = mixed_events(120)
    recs = records(events, topics.INFERENCE, bad_at=bad_at, json_at=(3,))
    decoded = fast_decode(recs, events_pb2.InferenceEvent)
    for i, (e, d) in enumerate(zip(events, decoded)):
        if i in bad_at or i == 3:
            assert d is None          # left for eventbus.consumer.decode (a dead letter, or JSON)
        else:
            assert d == e
    assert fast_decode(recs, events_pb2.FeedbackEvent) == [None] * len(recs)   # a type the headers do not name


def feedback_for(events, rng) -> list:
    out = []
    for e in events:
        if e.label_probabilities and e.request_id and rng.random() < 0.8:
            f = events_pb2.FeedbackEvent(event_id="f" + e.event_id, request_id=e.request_id, model=e.model,
                                         version=e.version, label=rng.choice([*e.label_probabilities, "other"]))
            f.time.CopyFrom(e.time)
            out.append(f)
    return out


def run(fetches, state_every: int | None = None) -> tuple[PartitionState, list]:
    settings = Settings(**SMALL)
    runner = Runner(RunnerOptions(metrics_port=-1, settings=settings))
    runner.states[0] = PartitionState(0, settings)
    outs = []
    for n, (topic, recs) in enumerate(fetches):
        runner.process(TopicPartition(topic, 0), recs, outs)
        if state_every and n % state_every == 0:   # a restart from a checkpoint
            runner.states[0] = PartitionState.decode(runner.states[0].encode(), settings)
    return runner.states[0], outs


def fetched(inf: list, fb: list, size: int) -> list:
    out = []
    for k in range(0, max(len(inf), len(fb)), size):
        out += [(topics.INFERENCE, inf[k:k + size]), (topics.FEEDBACK, fb[k:k + size])]
    return out


def test_state_does_not_depend_on_fetch_sizes_restarts_or_redelivery():
    rng = random.Random(5)
    events = mixed_events(6000, seed=5)
    inf = records(events, topics.INFERENCE, bad_at=(1234,))
    fb = records(feedback_for(events, rng), topics.FEEDBACK)
    big, _ = run(fetched(inf, fb, 2500))
    small, _ = run(fetched(inf, fb, 37), state_every=50)
    again = fetched(inf, fb, 400)
    again.insert(6, (topics.INFERENCE, inf[300:900]))          # a fetch that overlaps what was read
    redelivered, _ = run(again)
    summaries = lambda st: json.loads(json.dumps({k: m.summary() for k, m in st.models.items()}))  # noqa: E731
    assert summaries(small) == summaries(big) == summaries(redelivered)
    assert sum(m.n_events for m in big.models.values()) == len(events) - 1
    assert sum(m.n_joined for m in big.models.values()) > 1000
