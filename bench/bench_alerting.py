"""Alerting core: throughput and notification latency.

1. Signals per second through rules, grouping and routing on one core (the process is
   pinned to one CPU): the default rules (alerting/default_rules.yml) and a routing tree,
   500 label sets (50 model versions x 10 features), three workloads: a storm (every signal
   drifted: alerts stay firing), flapping (a third of the signals flip their series), and
   metric signals (windowed aggregates). Side by side with a naive baseline that tests
   every rule and fingerprints the label set on every signal. Target: >= 50,000 signals/s.
2. Time from a signal to its webhook, beyond group_wait (real clock, loopback HTTP
   receiver in a process of its own): paced (one new group every 5 ms) and a burst (200 new
   groups in the same millisecond). Target: p99 < 50 ms.

Run: .venv/bin/python bench/bench_alerting.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from alerting.clock import ManualClock  # noqa: E402
from alerting.config import config_from_text  # noqa: E402
from alerting.core import AlertingCore  # noqa: E402
from alerting.labels import fingerprint  # noqa: E402
from alerting.rules import load_rules, rules_from_text  # noqa: E402
from alerting.signals import Signal  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEATURES = ["prompt_tokens", "completion_tokens", "mean_logprob", "mean_entropy", "min_top1_prob", "latency",
            "ttft", "finish_reason", "error", "latency_p99"]

ROUTING = """
route:
  receiver: oncall
  group_by: [alertname, model, version]
  group_wait: 30s
  group_interval: 5m
  repeat_interval: 4h
  routes:
    - matchers: ['severity="critical"']
      receiver: pager
      continue: true
    - matchers: ['category="drift"', 'model=~"model-[0-4].*"']
      receiver: team-a
    - matchers: ['category="drift"']
      receiver: team-b
receivers:
  - {name: oncall, webhook_configs: [{url: "http://127.0.0.1:9/a"}]}
  - {name: pager, webhook_configs: [{url: "http://127.0.0.1:9/b"}]}
  - {name: team-a, webhook_configs: [{url: "http://127.0.0.1:9/c"}]}
  - {name: team-b, webhook_configs: [{url: "http://127.0.0.1:9/d"}]}
inhibit_rules:
  - source_matchers: ['severity="critical"']
    target_matchers: ['severity="warning"']
    equal: [model, version]
"""


def make_signals(n: int, kind: str, seed: int = 1) -> list[Signal]:
    rng = random.Random(seed)
    sets = [(f"model-{m // 5}", f"v{m % 5}", f) for m in range(50) for f in FEATURES]
    out = []
    flip: dict = {}
    for i in range(n):
        model, version, feature = sets[rng.randrange(len(sets))]
        if feature == "finish_reason":
            det = "chi2"
        elif feature == "error":
            det = "adwin" if kind != "metric" else "error_rate"
        elif feature == "latency_p99":
            det = "quantile"
        else:
            det = "ks"
        drifted = True
        if kind == "flapping" and rng.random() < 1 / 3:
            key = (model, version, feature)
            flip[key] = not flip.get(key, True)
            drifted = flip[key]
        stat = rng.random() * (0.2 if det == "error_rate" else 20 if det == "quantile" else 1)
        out.append(Signal(det, feature, model, version, stat, drifted, 0.0, p_value=0.0001,
                          reference_size=1000, window_size=500))
    return out


def run_core(signals: list[Signal], rules) -> tuple[float, AlertingCore]:
    clock = ManualClock(1_700_000_000.0)
    core = AlertingCore(rules, config_from_text(ROUTING), clock=clock)
    ingest = core.engine.ingest
    step = 0.01  # 100 signals per simulated second: `for` (5m) elapses within a run
    t0 = time.perf_counter()
    now = clock.now()
    for i, s in enumerate(signals):
        now += step
        ingest(s, now)
        if i % 1000 == 999:  # the timer loop's work: due for/keep/group timers, flushes
            clock.set(now)
            core.tick(now)
    clock.set(now)
    core.tick(now)
    return time.perf_counter() - t0, core


def run_naive(signals: list[Signal], rules) -> float:
    """What a straightforward implementation does per signal: test every rule's matchers,
    build the label set, fingerprint it, look the instance up, route when it changes."""
    cfg = config_from_text(ROUTING)
    state: dict[int, bool] = {}
    t0 = time.perf_counter()
    for s in signals:
        for r in rules.rules:
            if not r.matches(s):
                continue
            labels = {"alertname": r.name, "detector": s.detector, "feature": s.feature, "model": s.model,
                      "version": s.version, **{k: t.render({}) for k, t in r.labels.items()}}
            fp = fingerprint(labels)
            cond = r.predicate(s) if r.kind == "signal" else r.predicate(s.statistic)
            if state.get(fp) != cond:
                state[fp] = cond
                cfg.route.match(labels)
    return time.perf_counter() - t0


def throughput(n: int) -> None:
    try:
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {sorted(cpus)[0]})
        pinned = "pinned to one CPU"
    except (AttributeError, OSError):
        cpus, pinned = None, "not pinned"
    try:
        _throughput(n, pinned)
    finally:
        if cpus:
            os.sched_setaffinity(0, cpus)


def _throughput(n: int, pinned: str) -> None:
    rules = load_rules([ROOT / "alerting" / "default_rules.yml"])
    print(f"Throughput: {n:,} signals per workload, {len(rules)} default rules, routing tree with 4 receivers, "
          f"500 label sets ({pinned})")
    print(f"{'workload':10} {'signals/s':>12} {'naive/s':>12} {'ratio':>7} {'firing':>7} {'changes':>8} {'groups':>7}")
    for kind in ("storm", "flapping", "metric"):
        sigs = make_signals(n, kind)
        run_core(sigs[: n // 10], rules)  # warm-up
        best = min(run_core(sigs, rules)[0] for _ in range(3))
        _, core = run_core(sigs, rules)
        naive = min(run_naive(sigs, rules) for _ in range(2))
        firing = sum(1 for i in core.engine.instances.values() if i.state == "firing")
        changes = int(sum(core.metric("vigil_alerting_state_changes_total", state=s)
                          for s in ("pending", "firing", "resolved", "inactive")))
        print(f"{kind:10} {n / best:12,.0f} {n / naive:12,.0f} {naive / best:6.2f}x {firing:7} {changes:8} "
              f"{len(core.dispatcher.groups):7}")


def _receiver_process(port_q, secret: bytes) -> None:
    """A webhook receiver in a process of its own, on a bare asyncio protocol (an aiohttp
    server costs more per request than the sender being measured): records each
    notification's group and arrival on the system-wide monotonic clock, checks its
    signature, and answers GET /results with what it got."""
    import json as _json

    from eventbus.signing import SIGNATURE_HEADER, verify

    got = []
    sig_header = SIGNATURE_HEADER.lower().encode()

    class Http(asyncio.Protocol):
        def connection_made(self, transport):
            self.t, self.buf = transport, b""

        def data_received(self, data):
            self.buf += data
            while True:
                head_end = self.buf.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                head = self.buf[:head_end].split(b"\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in head[1:])}
                n = int(headers.get(b"content-length", b"0"))
                if len(self.buf) < head_end + 4 + n:
                    return
                body = self.buf[head_end + 4:head_end + 4 + n]
                self.buf = self.buf[head_end + 4 + n:]
                if head[0].startswith(b"GET /results"):
                    out = _json.dumps(got).encode()
                else:
                    arrived = time.monotonic()
                    ok = verify(secret, body, headers.get(sig_header, b"").decode())
                    got.append((_json.loads(body)["groupLabels"]["model"], arrived, ok))
                    out = b"ok"
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(out), out))

    async def serve():
        server = await asyncio.get_running_loop().create_server(Http, "127.0.0.1", 0)
        port_q.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(serve())


async def latency(paced: int, burst: int) -> None:
    import multiprocessing as mp

    import aiohttp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_receiver_process, args=(q, b"bench"), daemon=True)
    proc.start()
    port = await asyncio.to_thread(q.get, True, 30)
    url = f"http://127.0.0.1:{port}"
    rules = rules_from_text("""
groups:
  - name: b
    rules:
      - alert: Drift
        signal: {detector: ks, drifted: true}
""")
    gw = 0.2
    core = AlertingCore(rules, config_from_text(f"""
route: {{receiver: r, group_by: [model], group_wait: {int(gw * 1000)}ms, group_interval: 1h}}
receivers:
  - name: r
    max_concurrency: 16
    webhook_configs: [{{url: "{url}/hook", hmac_secret: bench}}]
"""))
    await core.start()
    print(f"\nLatency: signal to webhook beyond group_wait ({gw * 1000:.0f} ms), loopback HTTP to a receiver "
          f"process, HMAC-signed")
    session = aiohttp.ClientSession()
    try:
        sent: dict[str, float] = {}

        async def wave(tag: str, n: int, gap: float):
            for i in range(n):
                model = f"{tag}-{i}"
                sent[model] = time.monotonic()
                core.ingest(Signal("ks", "latency", model, "v1", 0.5, True, time.time(), p_value=0.001))
                if gap:
                    await asyncio.sleep(gap)
            deadline = time.monotonic() + 30
            while True:
                async with session.get(f"{url}/results") as r:
                    got = [g for g in await r.json() if g[0].startswith(tag + "-")]
                if len(got) >= n or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert len(got) == n and all(ok for _, _, ok in got), (len(got), n)
            lat = sorted((arrived - sent[model] - gw) * 1000 for model, arrived, _ in got)
            p = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))]  # noqa: E731
            print(f"  {tag:7} {n:5} groups: p50 {p(0.5):6.1f} ms  p99 {p(0.99):6.1f} ms  max {lat[-1]:6.1f} ms")

        await wave("warm", 20, 0.005)
        await wave("paced", paced, 0.005)
        await wave("burst", burst, 0)
    finally:
        await session.close()
        await core.stop()
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller runs")
    a = ap.parse_args()
    throughput(100_000 if a.quick else 300_000)
    asyncio.run(latency(200 if a.quick else 1000, 200))


if __name__ == "__main__":
    main()
