"""What publishing every request to Kafka costs a request: latency of the demo model with
events off, with the broker up, and with the broker down (events go to the outbox), in
one run on this machine.

    .venv/bin/python bench/bench_events.py [--rounds 8] [--requests 50] [--concurrency 4] [--tokens 16]

Three `vigil serve` processes load the same model: one without a broker (events stay in
process), one publishing to the embedded broker (Tansu), one whose broker address has
nothing listening (every event goes to its on-disk outbox). Only one is driven at a
time, in rounds that alternate between them in a shuffled order, so drift of the machine
falls on all three alike. Latency is the client's, per unary Generate call.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.common import drive, interleaved, percentile  # noqa: E402
from eventbus.broker import EmbeddedBroker, free_port  # noqa: E402
from inference.demo import DEMO_MODEL_NAME  # noqa: E402


def start_server(extra: list[str], threads: int):
    return common.start_server(["--metrics-port", "0", "--threads", str(threads), "--kv-slots", "8",
                                "--max-seq-len", "512", *extra])


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
    ap.add_argument("--extra-mode", nargs=2, action="append", default=[], metavar=("NAME", "ARGS"),
                    help="another server to compare, e.g. --extra-mode 'down, no fsync' '--outbox-fsync-ms -1' "
                         "(its broker is the dead address unless ARGS name one)")
    args = ap.parse_args()

    broker = EmbeddedBroker().start()
    outboxes = tempfile.TemporaryDirectory(prefix="vigil-bench-outbox-")
    dead = f"127.0.0.1:{free_port()}"
    modes = {
        "off": [],
        "broker up": ["--bootstrap-servers", broker.bootstrap_servers, "--outbox-dir", f"{outboxes.name}/up"],
        "broker down": ["--bootstrap-servers", dead, "--outbox-dir", f"{outboxes.name}/down"],
    }
    for i, (name, extra) in enumerate(args.extra_mode):
        extra = extra.split()
        if "--bootstrap-servers" not in extra:
            extra += ["--bootstrap-servers", dead]
        modes[name] = [*extra, "--outbox-dir", f"{outboxes.name}/extra-{i}"]
    servers = {}
    try:
        for mode, extra in modes.items():
            servers[mode] = start_server(extra, args.threads)
        for mode, (_, address, _) in servers.items():  # warm up: first calls, first connections
            await drive(address, DEMO_MODEL_NAME, 2 * args.concurrency, args.concurrency, args.tokens)
        results = await interleaved({mode: s[1] for mode, s in servers.items()}, DEMO_MODEL_NAME, args.rounds,
                                    args.requests, args.concurrency, args.tokens, args.seed)
        time.sleep(2)  # let the publishers settle before reading their counters

        print(f"\nrequest latency, demo model, Generate of {args.tokens} tokens, {args.concurrency} concurrent, "
              f"{args.rounds} x {args.requests} requests per mode")
        print(f"{'mode':<16} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'p50 ratio':>10} {'p99 ratio':>10}")
        base = results["off"]
        for mode, values in results.items():
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            print(f"{mode:<16} {len(values):>5} {p50 * 1e3:>9.1f} {p99 * 1e3:>9.1f} "
                  f"{statistics.fmean(values) * 1e3:>9.1f} {p50 / percentile(base, 0.5):>10.3f} "
                  f"{p99 / percentile(base, 0.99):>10.3f}")
        print("\npublisher counters (each server's /metrics)")
        for mode in [m for m in modes if m != "off"]:
            counters = scrape(servers[mode][2])
            print(f"  {mode}: " + ", ".join(f"{k.removeprefix('vigil_')}={v:g}" for k, v in sorted(counters.items())))
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
