"""The signal contract of eventbus/signals.py, held by the processor that publishes it and
the alerting rules that read it (the end-to-end scenarios are in test_signal_scenarios.py)."""

from __future__ import annotations

import random
import time

import grpc
import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition

from alerting.rules import load_rules
from eventbus import cloudevents, codec, topics
from eventbus.signals import PUBLISHED, SERIES_LABELS, Detector, Feature, kind_of
from inference.api.events import TokenHasher, inference_event
from protos import events_pb2, llm_pb2, llm_pb2_grpc
from stream_processors.processor import PartitionState
from stream_processors.settings import RunnerOptions, Settings
from stream_processors.runner import Runner, signal_message

DEFAULT_RULES = "alerting/default_rules.yml"
SMALL = Settings(ks_window=50, psi_window=80, chi2_window=80, signal_every=100, calibration_every=40,
                 quality_window=10, trend_window=5)


def event(i: int, rng: random.Random, *, model="m", version="v1", tokens=True, classify=False, status=1):
    e = events_pb2.InferenceEvent(
        event_id=f"e{i}", request_id=f"r{i}", model=model, version=version, route=events_pb2.ROUTE_STABLE,
        method="Classify" if classify else "Generate", status=status, prompt_tokens=rng.randint(5, 50),
        completion_tokens=12, finish_reason=rng.choice(["stop", "length"]),
        total_seconds=rng.uniform(0.2, 0.4), first_token_seconds=rng.uniform(0.01, 0.05))
    e.confidence.mean_logprob = rng.gauss(-1, 0.2)
    e.confidence.mean_entropy = rng.gauss(2, 0.3)
    e.confidence.min_top1_prob = rng.random()
    if classify:
        p = rng.random()
        e.label_probabilities.update({"yes": p, "no": 1 - p})
    elif tokens:
        e.completion_token_hashes.extend(rng.randrange(500) for _ in range(12))
    e.time.FromNanoseconds(int((1.7e9 + i) * 1e9))
    return e


def feedback(e, label: str):
    f = events_pb2.FeedbackEvent(event_id="f" + e.event_id, feedback_id="f" + e.event_id, request_id=e.request_id,
                                 model=e.model, version=e.version, label=label)
    f.time.CopyFrom(e.time)
    return f


def run(events, feedbacks=()) -> list:
    state, out = PartitionState(0, SMALL), []
    for k in range(0, len(events), 37):
        state.apply_events(events[k:k + 37], out)
    state.apply_feedback(list(feedbacks), out)
    return out


def test_the_processor_publishes_only_series_of_the_contract_with_series_labels():
    rng = random.Random(1)
    evs = [event(i, rng, status=1 if rng.random() > 0.1 else 7) for i in range(1500)]
    clf = [event(10_000 + i, rng, model="c", classify=True) for i in range(300)]
    fbs = [feedback(e, "yes" if rng.random() < e.label_probabilities["yes"] else "no") for e in clf]
    out = run(evs + clf, fbs)
    seen = {(o.detector, o.feature) for o in out}
    assert seen <= set(PUBLISHED), seen - set(PUBLISHED)
    assert all(set(o.labels) <= set(SERIES_LABELS) for o in out)
    # the measurements the default rules read are among them
    for series in [(Detector.ERROR_RATE, Feature.ERROR), (Detector.ZSCORE, Feature.DISTINCT_1),
                   (Detector.ECE, Feature.LABEL), (Detector.ECE_EQUAL_MASS, Feature.LABEL),
                   (Detector.P99, Feature.TOTAL_SECONDS), (Detector.KS, Feature.FIRST_TOKEN_SECONDS)]:
        assert series in seen, series
    rates = [o.statistic for o in out if o.detector == Detector.ERROR_RATE and o.model == "m"]
    assert len(rates) == 15 and 0.05 < sum(rates) / len(rates) < 0.15
    # and the proto carries a reading's own figures in fields
    ece = next(o for o in out if o.detector == Detector.ECE)
    msg = signal_message(ece, "test")
    assert msg.kind == events_pb2.SIGNAL_KIND_CALIBRATION and sum(b.count for b in msg.reliability) == msg.window_size
    ks = signal_message(next(o for o in out if o.detector == Detector.KS), "test")
    assert ks.events > 0 and not ks.labels


def test_nothing_is_published_for_a_feature_without_data():
    rng = random.Random(2)
    out = run([event(i, rng, tokens=False) for i in range(600)])  # Generate: no label probabilities, no tokens
    assert not [o for o in out if o.feature == Feature.TOP_LABEL_PROB]
    assert not [o for o in out if o.detector == Detector.ZSCORE and o.feature != Feature.COMPLETION_TOKENS]


def test_generation_quality_from_token_hashes_without_text():
    rng = random.Random(3)
    evs = [event(i, rng) for i in range(400)]
    for e in evs[200:]:  # collapse into repetition: one token over and over
        del e.completion_token_hashes[:]
        e.completion_token_hashes.extend([7] * 12)
    assert not any(e.HasField("completion_text") for e in evs)
    z = [o for o in run(evs) if o.detector == Detector.ZSCORE and o.feature == Feature.DISTINCT_1]
    assert z and z[-1].statistic < -3 and z[-1].drifted and z[-1].value == pytest.approx(1 / 120)
    assert [o.window_index for o in z] == sorted(o.window_index for o in z)


def test_feedback_scores_give_their_mean_and_adwin_on_them():
    rng = random.Random(5)
    fbs = []
    for i in range(1200):
        f = events_pb2.FeedbackEvent(request_id=f"s{i}", model="g", version="v1",
                                     score=rng.gauss(0.8 if i < 600 else 0.3, 0.1))
        f.time.FromNanoseconds(int((1.7e9 + i) * 1e9))
        fbs.append(f)
    state, out = PartitionState(0, SMALL), []
    for k in range(0, len(fbs), 70):
        state.apply_feedback(fbs[k:k + 70], out)
    means = [o for o in out if (o.detector, o.feature) == (Detector.MEAN, Feature.SCORE)]
    assert len(means) == 1200 // SMALL.score_every
    assert means[0].statistic == pytest.approx(0.8, abs=0.03) and means[-1].statistic == pytest.approx(0.3, abs=0.03)
    detections = [o for o in out if (o.detector, o.feature) == (Detector.ADWIN, Feature.SCORE) and o.drifted]
    assert detections and all(o.kind == events_pb2.SIGNAL_KIND_QUALITY for o in detections)
    assert state.models["g/v1"].n_feedback == 1200


def test_an_over_confident_version_gets_a_temperature_that_cuts_its_ece():
    """A three-label classifier that says 0.9 and is right 70 percent of the time: the
    fitted temperature, judged on the newest third of the window, brings ECE under a third
    of what it was. (One temperature serves one label set: versions whose requests offer
    label sets of different sizes, over-confident by different amounts, get a compromise.)"""
    rng = random.Random(6)
    evs, fbs = [], []
    for i in range(3000):
        e = events_pb2.InferenceEvent(event_id=f"o{i}", request_id=f"o{i}", model="clf", version="v1",
                                      method="Classify", status=1, route=events_pb2.ROUTE_STABLE)
        labels = ["a", "b", "c"]
        top = rng.choice(labels)
        e.label_probabilities.update({k: 0.9 if k == top else 0.05 for k in labels})
        e.time.FromNanoseconds(int((1.7e9 + i) * 1e9))
        evs.append(e)
        fbs.append(feedback(e, top if rng.random() < 0.7 else rng.choice([k for k in labels if k != top])))
    state, out = PartitionState(0, Settings(calibration_every=500, calibration_window=3000, recalibration_every=500)), []
    state.apply_events(evs, out)
    state.apply_feedback(fbs, out)
    fit = [o for o in out if o.detector == Detector.TEMPERATURE][-1].recalibration
    assert fit.temperature > 1 and fit.ece_after <= fit.ece_before / 3, fit
    assert fit.accuracy == pytest.approx(0.7, abs=0.05) and (fit.fitted, fit.held_out) == (2000, 1000)
    print(f"ECE on 1000 held-out pairs: {fit.ece_before:.3f} before, {fit.ece_after:.3f} after "
          f"(temperature {fit.temperature:.2f}); accuracy {fit.accuracy:.3f} both")


@pytest.mark.parametrize("module", ["eventbus.signals", "eventbus.temperature", "stream_processors.recalibration"])
def test_docstring_examples(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(module)).failed == 0


def test_every_default_rule_names_a_published_series():
    for rule in load_rules([DEFAULT_RULES]).rules:
        d, f = rule.matchers["detector"], rule.matchers.get("feature")
        assert any(d.matches_value(a) and (f is None or f.matches_value(b)) for a, b in PUBLISHED), rule.name


def test_kind_of_names_what_is_not_in_the_contract():
    assert kind_of("page_hinkley", "error") == events_pb2.SIGNAL_KIND_QUALITY
    with pytest.raises(KeyError, match="no published series adwin/total_seconds"):
        kind_of("adwin", "total_seconds")


def test_events_without_a_model_or_with_bad_probabilities_are_dead_letters():
    rng = random.Random(4)
    evs = [event(i, rng) for i in range(5)]
    evs[2].model = ""
    evs[3].label_probabilities.update({"yes": 1.5, "no": float("nan")})
    recs = []
    for i, m in enumerate(evs):
        headers = cloudevents.headers(m.event_id, m.DESCRIPTOR.full_name, "test", time.time(), codec.PROTOBUF)
        value = codec.encode(m, codec.PROTOBUF)
        recs.append(ConsumerRecord(topics.INFERENCE, 0, i, 0, 0, b"k", value, None, 0, len(value), headers))
    recs.append(ConsumerRecord(topics.INFERENCE, 0, 5, 0, 0, b"k", b"{}", None, 0, 2,
                               cloudevents.headers("j", "vigil.events.v1.InferenceEvent", "t", time.time(), codec.JSON)))
    runner = Runner(RunnerOptions(metrics_port=-1))
    runner.states[0] = PartitionState(0, SMALL)
    outs = []
    runner.process(TopicPartition(topics.INFERENCE, 0), recs, outs)
    dead = [o for o in outs if not hasattr(o, "detector")]
    assert [d.offset for d in dead] == [2, 3, 5]
    assert [d.error.split(":")[0] for d in dead] == ["vigil.events.v1.InferenceEvent without a model",
                                                     "InferenceEvent.label_probabilities",
                                                     "vigil.events.v1.InferenceEvent without a model"]
    assert runner.states[0].models["m/v1"].n_events == 3


def test_token_hashes_are_keyed_and_stable():
    a, b = TokenHasher(b"key-one"), TokenHasher(b"key-two")
    ids = [5, 9, 5, 49151]
    assert a(ids) == TokenHasher(b"key-one")(ids) and a(ids)[0] == a(ids)[2]
    assert a(ids) != b(ids) and all(0 <= h < 2 ** 32 for h in a(ids))


def test_the_server_puts_token_hashes_not_text_in_its_events(start_server, tiny_llama):
    server = start_server(model=str(tiny_llama), model_name="tiny")
    llm = llm_pb2_grpc.LLMStub(grpc.insecure_channel(server.address))
    request = llm_pb2.GenerateRequest(model="tiny", prompt="The quick brown", request_id="hashes-1",
                                      sampling=llm_pb2.SamplingParams(max_tokens=8, ignore_eos=True))
    ids = [t for m in llm.GenerateStream(request, timeout=60) for t in m.token_ids]
    [ev] = [e for e in server.sink.events(topics.INFERENCE) if e["request_id"] == "hashes-1"]
    assert len(ids) == 8 and ev["completion_token_hashes"] == TokenHasher()(ids)
    assert "completion_text" not in ev
    assert list(inference_event(ev).completion_token_hashes) == ev["completion_token_hashes"]


def test_every_detector_option_of_vigil_process_reaches_its_setting():
    from dataclasses import asdict, fields

    from stream_processors import cli
    from vigil.cli import build_parser

    parser = build_parser()
    process = next(a for a in parser._subparsers._group_actions).choices["process"]
    named = {f.name for f in fields(Settings)} | {"feedback_ttl"}
    argv, want = ["process"], {}
    for action in process._actions:
        if action.dest in named:
            value = action.default * 2 + 1 if isinstance(action.default, int) else action.default / 2
            argv += [action.option_strings[0], str(value)]
            want["feedback_ttl_s" if action.dest == "feedback_ttl" else action.dest] = value
    assert len(want) >= 20
    got = asdict(cli.options(parser.parse_args(argv)).settings)
    assert {k: got[k] for k in want} == want
