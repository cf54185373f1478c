"""The whole processor, in process, against river + scipy doing the same work event by event.

    .venv/bin/python bench/bench_processor.py              # 200,000 events, then RSS over 1,000,000
    .venv/bin/python bench/bench_processor.py --quick      # smaller

No Kafka in the loop: records are built once as aiokafka ConsumerRecords (protobuf value,
CloudEvents headers) and handed to ``Runner.process`` in fetches of 5,000, which is what
the consumer loop does with a poll. So the figure is decode + every feature + every
detector (KS, PSI on 8 features, ADWIN on mean log-prob and errors, chi-square on finish
reason, latency sketches, quality windows, trend readings) + feedback joins, on one core.
Every event is served on route stable, with no candidate version to compare it with.
Rates are given per second of wall time (the target) and per second of CPU time (what
the process itself spent: steadier on a shared machine).

Baseline, on the same records: decode each record (protobuf FromString), extract the same
features, then per event river's ADWIN on mean log-prob and errors, river's KSWIN (which
calls scipy.stats.ks_2samp) on each of the 8 continuous features, and a scipy chi-square
on the finish reasons every 100 events. The baseline runs on fewer events (it is slow);
rates are per event either way.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import one_core  # noqa: E402
from aiokafka.structs import ConsumerRecord, TopicPartition  # noqa: E402

from eventbus import cloudevents, codec, topics  # noqa: E402
from protos import events_pb2  # noqa: E402
from stream_processors.processor import PartitionState  # noqa: E402
from stream_processors.settings import RunnerOptions, Settings  # noqa: E402
from stream_processors.runner import Runner  # noqa: E402

FETCH = 5000


def make_records(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    headers = {cls: cloudevents.headers("x", cls.DESCRIPTOR.full_name, "bench", 1.7e9, codec.PROTOBUF)
               for cls in (events_pb2.InferenceEvent, events_pb2.FeedbackEvent)}
    out, fo = [], 0
    for i in range(n):
        model = f"m{i % 4}"
        classify = i % 4 == 3
        e = events_pb2.InferenceEvent(
            event_id=f"e{i}", request_id=f"r{i}", model=model, version="v1", route=1,
            method="Classify" if classify else "Generate", status=1 if rng.random() > 0.01 else 2,
            prompt_tokens=rng.randint(10, 500), completion_tokens=rng.randint(5, 300),
            finish_reason=rng.choice(["stop", "length"]), total_seconds=rng.lognormvariate(-1, 0.3),
            first_token_seconds=rng.uniform(0.01, 0.1))
        e.confidence.mean_logprob = rng.gauss(-1.0 + (0.5 if i > n // 2 else 0.0), 0.2)
        e.confidence.mean_entropy = rng.gauss(2.0, 0.3)
        e.confidence.min_top1_prob = rng.random()
        if classify:
            p = rng.uniform(0.5, 1.0)
            e.label_probabilities["yes"], e.label_probabilities["no"] = p, 1 - p
        e.time.FromNanoseconds(int((1.7e9 + i * 0.001) * 1e9))
        v = e.SerializeToString()
        out.append(ConsumerRecord(topics.INFERENCE, 0, i, 0, 0, model.encode(), v, None, 0, len(v),
                                  headers[events_pb2.InferenceEvent]))
        if classify:
            f = events_pb2.FeedbackEvent(event_id=f"f{i}", request_id=f"r{i}", model=model, version="v1",
                                         label="yes" if rng.random() < p else "no")
            f.time.CopyFrom(e.time)
            v = f.SerializeToString()
            out.append(ConsumerRecord(topics.FEEDBACK, 0, fo, 0, 0, model.encode(), v, None, 0, len(v),
                                      headers[events_pb2.FeedbackEvent]))
            fo += 1
    return out


def ours(records: list, settings: Settings) -> tuple[float, float, Runner]:
    """(wall seconds, CPU seconds, the runner)"""
    runner = Runner(RunnerOptions(metrics_port=-1))
    runner.states[0] = PartitionState(0, settings)
    inf, fb = TopicPartition(topics.INFERENCE, 0), TopicPartition(topics.FEEDBACK, 0)
    t, c = time.perf_counter(), time.process_time()
    for k in range(0, len(records), FETCH):
        chunk, outs = records[k:k + FETCH], []
        runner.process(inf, [r for r in chunk if r.topic == topics.INFERENCE], outs)
        runner.process(fb, [r for r in chunk if r.topic == topics.FEEDBACK], outs)
    return time.perf_counter() - t, time.process_time() - c, runner


def features(ev) -> tuple:
    """The baseline's feature extraction, event by event: the continuous features (as the
    processor's CONTINUOUS), error 0/1 and finish reason."""
    conf = ev.confidence if ev.HasField("confidence") else None
    probs = ev.label_probabilities
    ok = ev.status == 1
    nan = float("nan")
    row = (float(ev.prompt_tokens), float(ev.completion_tokens) if ok else nan,
           conf.mean_logprob if conf is not None else nan, conf.mean_entropy if conf is not None else nan,
           conf.min_top1_prob if conf is not None else nan,
           ev.total_seconds if ok else nan, ev.first_token_seconds if ok and ev.first_token_seconds > 0 else nan,
           max(probs.values()) if probs else nan)
    return row, 0.0 if ok else 1.0, ev.finish_reason


def baseline(records: list, settings: Settings) -> tuple[float, float]:
    """(wall seconds, CPU seconds)"""
    from river import drift
    from scipy import stats

    per_model: dict = {}
    t, c = time.perf_counter(), time.process_time()
    for r in records:
        if r.topic != topics.INFERENCE:
            events_pb2.FeedbackEvent.FromString(r.value)
            continue
        ev = events_pb2.InferenceEvent.FromString(r.value)
        row, err, fin = features(ev)
        m = per_model.get(ev.model)
        if m is None:
            m = per_model[ev.model] = {"ks": [drift.KSWIN(window_size=100, seed=1) for _ in row],
                                       "adwin": drift.ADWIN(settings.adwin_delta),
                                       "err": drift.ADWIN(settings.adwin_delta), "fin": [], "n": 0}
        for d, x in zip(m["ks"], row):
            if x == x:
                d.update(x)
        m["adwin"].update(row[2])
        m["err"].update(err)
        m["fin"].append(fin)
        m["n"] += 1
        if m["n"] % 100 == 0:
            window = m["fin"][-settings.chi2_window:]
            stats.chisquare([window.count("stop"), window.count("length")])
    return time.perf_counter() - t, time.process_time() - c


def rss_mib() -> tuple[float, float]:
    """(resident now, peak) in MiB."""
    with open("/proc/self/status") as f:
        kb = dict(line.split(":", 1) for line in f)
    return int(kb["VmRSS"].split()[0]) / 1024, int(kb["VmHWM"].split()[0]) / 1024


def memory_run(n: int, settings: Settings) -> list[tuple[int, float, float]]:
    """n events through one processor, made in slices of 20,000 so the input stays small;
    (events, RSS, peak RSS) after each 100,000."""
    runner = Runner(RunnerOptions(metrics_port=-1))
    runner.states[0] = PartitionState(0, settings)
    inf, fb = TopicPartition(topics.INFERENCE, 0), TopicPartition(topics.FEEDBACK, 0)
    marks, done, seed = [], 0, 1
    while done < n:
        chunk = make_records(20_000, seed)
        seed += 1
        runner.states[0].offsets.clear()  # each slice restarts its offsets at 0
        for k in range(0, len(chunk), FETCH):
            part, outs = chunk[k:k + FETCH], []
            runner.process(inf, [r for r in part if r.topic == topics.INFERENCE], outs)
            runner.process(fb, [r for r in part if r.topic == topics.FEEDBACK], outs)
        done += 20_000
        if done % 100_000 == 0:
            marks.append((done, *rss_mib()))
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--baseline-events", type=int, default=20_000)
    ap.add_argument("--rss-events", type=int, default=1_000_000, help="0 skips the memory run")
    ap.add_argument("--memory-only", action="store_true", help="only the memory run (in a fresh process)")
    a = ap.parse_args()
    if a.memory_only:
        marks = memory_run(a.rss_events, Settings())
        print("RSS (MiB) after N events: " + ", ".join(f"{n // 1000}k {now:.0f}" for n, now, _ in marks))
        print(f"peak RSS over the run: {marks[-1][2]:.0f} MiB")
        return
    if a.quick:
        a.events, a.baseline_events, a.rss_events = 50_000, 5_000, 0
    print(f"bench_processor: {one_core()}, in process (no Kafka in the loop), fetches of {FETCH}")
    s = Settings()
    records = make_records(a.events)
    # The records are the bench's, built up front: a consumer holds one fetch at a time. Kept
    # out of the collector's sight, or every full collection would walk all of them.
    gc.freeze()
    n_inf = sum(r.topic == topics.INFERENCE for r in records)
    ours(records[:FETCH * 2], s)  # warm up imports and caches
    dt, cpu, runner = ours(records, s)
    counted = sum(m.n_events for m in runner.states[0].models.values())
    assert counted == n_inf, (counted, n_inf)
    sub = records[:a.baseline_events]
    n_sub = sum(r.topic == topics.INFERENCE for r in sub)
    dt_b, cpu_b = baseline(sub, s)
    r_ours, r_base = n_inf / dt, n_sub / dt_b
    print(f"{'':38}{'events/s':>10}{'us/event':>10}{'per CPU-s':>11}")
    print(f"{'vigil processor (Runner.process)':38}{r_ours:10,.0f}{1e6 / r_ours:10.2f}{n_inf / cpu:11,.0f}   "
          f"({n_inf:,} events + {len(records) - n_inf:,} feedbacks)")
    print(f"{'river ADWIN+KSWIN + scipy, per event':38}{r_base:10,.0f}{1e6 / r_base:10.2f}{n_sub / cpu_b:11,.0f}   "
          f"({n_sub:,} events)")
    print(f"ratio: {r_ours / r_base:.1f}x (CPU: {n_inf / cpu / (n_sub / cpu_b):.1f}x)   targets: >= 100,000 events/s "
          f"({'met' if r_ours >= 1e5 else 'NOT met'}), >= 5x baseline ({'met' if r_ours >= 5 * r_base else 'NOT met'})")
    if a.rss_events:  # in a process of its own, so that its peak is its own
        subprocess.run([sys.executable, __file__, "--memory-only", "--rss-events", str(a.rss_events)], check=True)


if __name__ == "__main__":
    main()
