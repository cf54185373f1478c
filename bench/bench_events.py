"""What publishing every request to Kafka costs a request: latency of the demo model with
events off, and with the broker up and down, for the write-ahead outbox (each event
written before its request is answered) and for the in-memory path it replaced (the
code of BEFORE_WAL, run from a copy of that commit), in one run on this machine.

    .venv/bin/python bench/bench_events.py [--rounds 8] [--requests 50] [--concurrency 4] [--tokens 16]

Five `vigil serve` processes load the same model: one without a broker (events stay in
process), and of each code one publishing to the embedded broker (Tansu) and one whose
broker address has nothing listening (every event waits in its on-disk outbox). Only
one is driven at a time, in rounds that alternate between them in a shuffled order, so
drift of the machine falls on all alike. Latency is the client's, per unary Generate
call. Then, in this process, what one publish() call costs the event loop now
(encoding, framing, the write, and with --outbox-fsync-ms 0 the fsync), beside
encoding alone, which the in-memory path also did on the loop, a moment later.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.common import drive, interleaved, percentile  # noqa: E402
from eventbus import topics  # noqa: E402
from eventbus.broker import EmbeddedBroker, free_port  # noqa: E402
from eventbus.publisher import Publisher, PublisherOptions  # noqa: E402
from inference.runtime.demo import DEMO_MODEL_NAME  # noqa: E402
from inference.api.events import to_message  # noqa: E402

BEFORE_WAL = "bdf4e5ccf998b12f8cae9325dd81edab63d642ab"  # the last commit whose publisher held events in memory


def start_server(extra: list[str], threads: int, tree: Path | None = None):
    return common.start_server(["--metrics-port", "0", "--threads", str(threads), "--kv-slots", "8",
                                "--max-seq-len", "512", *extra], tree)


def checkout(rev: str, into: str) -> Path:
    """The repository's files at `rev`, unpacked into a folder (git's own state untouched)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return Path(into)


def an_event(i: int) -> dict:
    """An inference event as the server builds it."""
    return {"event_id": str(uuid.uuid4()), "time": time.time(), "source": "vigil-inference/bench:8001",
            "request_id": f"bench-{i}", "method": "Generate", "model": DEMO_MODEL_NAME, "version": "1",
            "route": "stable", "status": "ok", "error": "", "tenant": "", "trace_id": "", "flags": [],
            "shadow_of": "", "prompt_chars": 120, "prompt_sha256": "a" * 64, "prompt_tokens": 33,
            "completion_tokens": 16, "finish_reason": "length", "queue_seconds": 0.0004,
            "first_token_seconds": 0.04, "total_seconds": 0.38, "mean_logprob": -1.2, "mean_entropy": 2.1,
            "min_top1_prob": 0.2, "label_probabilities": {}, "completion_chars": 80, "completion_sha256": "b" * 64,
            "completion_token_hashes": list(range(16))}


async def publish_cost(bootstrap: str, folder: str, fsync_ms: int, n: int) -> tuple[list[float], list[float]]:
    """Seconds per publish() call and per encoding alone, n events each, broker up."""
    p = Publisher(PublisherOptions(bootstrap_servers=bootstrap, outbox_dir=folder, outbox_fsync_ms=fsync_ms),
                  to_message=to_message)
    await p.start()
    try:
        calls, encodings = [], []
        for i in range(n):
            event = an_event(i)
            start = time.perf_counter()
            p.encode(topics.INFERENCE, DEMO_MODEL_NAME, to_message(topics.INFERENCE, event), time.time())
            encodings.append(time.perf_counter() - start)
            start = time.perf_counter()
            p.publish(topics.INFERENCE, DEMO_MODEL_NAME, event)
            calls.append(time.perf_counter() - start)
            if i % 50 == 49:
                await asyncio.sleep(0)  # let the pump send, as between requests
        await p.flush()
        return calls, encodings
    finally:
        await p.stop()


def scrape(url: str) -> dict[str, float]:
    """The publisher's counters and gauges, summed over their labels."""
    out: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name.startswith(("vigil_events_", "vigil_outbox_")) and not name.endswith("_created"):
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="requests per mode and round")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", default=BEFORE_WAL, help="the commit whose in-memory publisher is compared")
    ap.add_argument("--publish-calls", type=int, default=5000, help="publish() calls timed in this process")
    ap.add_argument("--extra-mode", nargs=2, action="append", default=[], metavar=("NAME", "ARGS"),
                    help="another server to compare, e.g. --extra-mode 'down, no fsync' '--outbox-fsync-ms -1' "
                         "(its broker is the dead address unless ARGS name one)")
    args = ap.parse_args()

    broker = EmbeddedBroker().start()
    outboxes = tempfile.TemporaryDirectory(prefix="vigil-bench-outbox-")
    before = checkout(args.baseline, f"{outboxes.name}/before-code")
    dead = f"127.0.0.1:{free_port()}"
    modes = {"off": ([], None)}
    for code, tree in (("memory", before), ("wal", None)):
        modes[f"up, {code}"] = (["--bootstrap-servers", broker.bootstrap_servers,
                                 "--outbox-dir", f"{outboxes.name}/up-{code}"], tree)
        modes[f"down, {code}"] = (["--bootstrap-servers", dead, "--outbox-dir", f"{outboxes.name}/down-{code}"], tree)
    for i, (name, extra) in enumerate(args.extra_mode):
        extra = extra.split()
        if "--bootstrap-servers" not in extra:
            extra += ["--bootstrap-servers", dead]
        modes[name] = ([*extra, "--outbox-dir", f"{outboxes.name}/extra-{i}"], None)
    servers = {}
    try:
        for mode, (extra, tree) in modes.items():
            servers[mode] = start_server(extra, args.threads, tree)
        for mode, (_, address, _) in servers.items():  # warm up: first calls, first connections
            await drive(address, DEMO_MODEL_NAME, 2 * args.concurrency, args.concurrency, args.tokens)
        results = await interleaved({mode: s[1] for mode, s in servers.items()}, DEMO_MODEL_NAME, args.rounds,
                                    args.requests, args.concurrency, args.tokens, args.seed)
        time.sleep(2)  # let the publishers settle before reading their counters

        print(f"\nrequest latency, demo model, Generate of {args.tokens} tokens, {args.concurrency} concurrent, "
              f"{args.rounds} x {args.requests} requests per mode")
        print("ratios: to events off, and wal to memory with the broker in the same state")
        print(f"{'mode':<16} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'p50/off':>8} {'p99/off':>8} "
              f"{'p50/mem':>8} {'p99/mem':>8}")
        for mode, values in results.items():
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            row = (f"{mode:<16} {len(values):>5} {p50 * 1e3:>9.1f} {p99 * 1e3:>9.1f} "
                   f"{statistics.fmean(values) * 1e3:>9.1f} {p50 / percentile(results['off'], 0.5):>8.3f} "
                   f"{p99 / percentile(results['off'], 0.99):>8.3f}")
            memory = results.get(mode.replace("wal", "memory")) if mode.endswith("wal") else None
            if memory:
                row += f" {p50 / percentile(memory, 0.5):>8.3f} {p99 / percentile(memory, 0.99):>8.3f}"
            print(row)
        print("\npublisher counters (each server's /metrics)")
        for mode in [m for m in modes if m != "off"]:
            counters = scrape(servers[mode][2])
            print(f"  {mode}: " + ", ".join(f"{k.removeprefix('vigil_')}={v:g}" for k, v in sorted(counters.items())))

        print(f"\none publish() call on the event loop, broker up, {args.publish_calls} calls (microseconds)")
        print(f"{'what':<34} {'p50':>7} {'p99':>7} {'mean':>7}")
        for fsync_ms in (1000, 0):
            calls, encodings = await publish_cost(broker.bootstrap_servers, f"{outboxes.name}/calls-{fsync_ms}",
                                                  fsync_ms, args.publish_calls)
            rows = [(f"publish(), --outbox-fsync-ms {fsync_ms}", calls)]
            if fsync_ms:
                rows.append(("encoding alone (the memory path's)", encodings))
            for what, values in rows:
                print(f"{what:<34} {percentile(values, 0.5) * 1e6:>7.1f} {percentile(values, 0.99) * 1e6:>7.1f} "
                      f"{statistics.fmean(values) * 1e6:>7.1f}")
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
        for proc, _, _ in servers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        outboxes.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
