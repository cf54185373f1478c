"""What comes from outside, fuzzed: Kafka records of any bytes, headers and field values
through the processor's runner (a record is processed or dead-lettered with a reason,
never an exception), and rule files of any shape through check-rules (a list of errors
naming the line and field, never an exception)."""

from __future__ import annotations

import dataclasses
import time

import yaml
from aiokafka.structs import ConsumerRecord, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alerting.rules import parse_rules
from eventbus import cloudevents, codec, topics
from protos import events_pb2
from stream_processors.processor import PartitionState
from stream_processors.settings import RunnerOptions, Settings
from stream_processors.runner import Runner, signal_message

# derandomize: the suite sees the same inputs every run (explore with a larger max_examples by hand)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SMALL = Settings(ks_window=20, psi_window=20, chi2_window=20, signal_every=10, calibration_every=5,
                 quality_window=3, compare_every=5, compare_window=20, compare_min=5)

floats = st.floats(allow_nan=True, allow_infinity=True)
text = st.text(max_size=30)
ints = st.integers(-2 ** 31, 2 ** 31 - 1)


@st.composite
def inference_events(draw):
    e = events_pb2.InferenceEvent(
        event_id=draw(text), request_id=draw(st.sampled_from(["", "r1", "r2", "r3"])),
        method=draw(st.sampled_from(["", "Generate", "Classify", "ModelInfer", "x"])),
        model=draw(st.sampled_from(["", "m", "ü\x00"])), version=draw(st.sampled_from(["", "v1", "v2"])),
        route=draw(st.integers(0, 9)), status=draw(st.integers(0, 12)), prompt_tokens=draw(ints),
        completion_tokens=draw(ints), finish_reason=draw(text), total_seconds=draw(floats),
        first_token_seconds=draw(floats), queue_seconds=draw(floats))
    if draw(st.booleans()):
        e.confidence.mean_logprob, e.confidence.mean_entropy, e.confidence.min_top1_prob = \
            draw(floats), draw(floats), draw(floats)
    for label, p in draw(st.dictionaries(text, floats, max_size=4)).items():
        e.label_probabilities[label] = p
    e.completion_token_hashes.extend(draw(st.lists(st.integers(0, 2 ** 32 - 1), max_size=8)))
    if draw(st.booleans()):
        e.completion_text = draw(text)
    e.time.seconds = draw(st.integers(0, 2 ** 40))
    return e


@st.composite
def feedbacks(draw):
    f = events_pb2.FeedbackEvent(request_id=draw(st.sampled_from(["", "r1", "r2", "r3"])),
                                 model=draw(st.sampled_from(["", "m"])), version=draw(st.sampled_from(["", "v1"])))
    if draw(st.booleans()):
        f.label = draw(text)
    else:
        f.score = draw(floats)
    return f


@st.composite
def records(draw):
    topic = draw(st.sampled_from([topics.INFERENCE, topics.FEEDBACK]))
    out = []
    for i in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["event", "feedback", "bytes", "json"]))
        fmt, ce_type = codec.PROTOBUF, "vigil.events.v1.InferenceEvent"
        if kind == "event":
            value = codec.encode(draw(inference_events()), codec.PROTOBUF)
        elif kind == "feedback":
            value, ce_type = codec.encode(draw(feedbacks()), codec.PROTOBUF), "vigil.events.v1.FeedbackEvent"
        elif kind == "bytes":
            value = draw(st.binary(max_size=200))
        else:
            fmt, value = codec.JSON, draw(st.sampled_from([b"{}", b"[]", b"null", b'{"model": 5}', b'{"model": "m"}',
                                                           b'{"totalSeconds": "NaN", "model": "m"}', b"{" * 500]))
        headers = cloudevents.headers(f"id{i}", draw(st.sampled_from([ce_type, "x.y", ""])), "fuzz", time.time(), fmt)
        if draw(st.booleans()):
            headers = draw(st.lists(st.tuples(text, st.binary(max_size=20)), max_size=4))
        out.append(ConsumerRecord(topic, 0, i, 0, 0, draw(st.binary(max_size=10)), value, None, 0, len(value), headers))
    return topic, out


@FUZZ
@given(batches=st.lists(records(), min_size=1, max_size=4))
def test_any_record_is_processed_or_dead_lettered_with_a_reason(batches):
    runner = Runner(RunnerOptions(metrics_port=-1))
    runner.states[0] = PartitionState(0, SMALL)
    for topic, recs in batches:
        offset = runner.states[0].offsets.get(topic, 0)
        recs = [dataclasses.replace(r, offset=offset + r.offset) for r in recs]
        outs = []
        runner.process(TopicPartition(topic, 0), recs, outs)
        for o in outs:
            if hasattr(o, "detector"):
                signal_message(o, "fuzz").SerializeToString()
            else:
                assert o.error, o
    state = runner.states[0]
    PartitionState.decode(state.encode(), SMALL)  # a checkpoint of whatever came in reads back


rule_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(text, c, max_size=3), max_leaves=12)
rule_keys = st.sampled_from(["alert", "signal", "metric", "for", "keep_firing_for", "stale_after", "labels",
                             "annotations", "detector", "feature", "drifted", "statistic", "p_value", "name",
                             "window", "aggregate", "above", "below", "expr"])


@st.composite
def rule_files(draw):
    rules = draw(st.lists(st.dictionaries(rule_keys, rule_values | st.dictionaries(rule_keys, rule_values, max_size=4),
                                          max_size=6), max_size=3))
    doc = draw(st.sampled_from([{"groups": [{"name": "g", "rules": rules}]}, {"groups": rules}, rules,
                                {"groups": [{"name": draw(rule_values), "rules": draw(rule_values)}]}]))
    return yaml.safe_dump(doc) if draw(st.booleans()) else draw(st.text(max_size=200))


@FUZZ
@given(text_=rule_files())
def test_any_rule_file_gives_rules_or_errors_naming_the_line(text_):
    rules, errors = parse_rules(text_, "fuzz.yml")
    for e in errors:
        assert e.file == "fuzz.yml" and e.line >= 0 and e.field and e.message
