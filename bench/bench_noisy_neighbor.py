"""Does one noisy API key slow the others? The latency of a quiet key's requests with
nobody else calling, and during a flood from another key: a rate-limited key whose
client waits the `retry-after-ms` it is told, the same key with a client that calls
again at once, and a key without limits; in one run on this machine.

    .venv/bin/python bench/bench_noisy_neighbor.py [--rounds 3] [--requests 10] [--tokens 16] \
        [--flood-concurrency 32] [--noisy-rps 2] [--model demo] [--threads 2]

One `vigil serve` with a key file of three keys: `quiet` (no limits), `noisy`
(`--noisy-rps` requests per second, burst of the same, 2 calls in flight) and `greedy`
(no limits). The flood is another process that keeps `--flood-concurrency` Generate calls
of the same size in flight with one key. Rounds alternate the modes in a shuffled order;
in each, the quiet key sends `--requests` Generate calls one after another. Latency is
the client's.

The flood's client runs on the same cores as the server (a real flood comes from other
machines), so part of what it costs the quiet key here is the flood client's own CPU;
and each refused call costs the server grpc.aio's per-call work (a few hundred
microseconds of CPU, in the event loop's thread).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.common import chat_request, percentile  # noqa: E402
from eventbus.apikeys import hash_secret  # noqa: E402
from inference.runtime.demo import DEMO_MODEL_NAME  # noqa: E402
from protos import llm_pb2_grpc  # noqa: E402

MODES = {"alone": None, "limited, backs off": ("noisy", True), "limited, ignores": ("noisy", False),
          "unlimited": ("greedy", False)}  # the flood's key, and whether its client waits retry-after-ms
SECRETS = {name: f"vgk_bench-{name}-" + "x" * 32 for name in ("quiet", "noisy", "greedy")}
def key_file(path: Path, noisy_rps: float) -> None:
    limits = {"quiet": "", "greedy": "",
              "noisy": f"  requests_per_second: {noisy_rps}\n  burst: {max(1.0, noisy_rps)}\n  max_streams: 2\n"}
    path.write_text("".join(f"- name: {n}\n  tenant: bench\n  sha256: {hash_secret(s)}\n{limits[n]}"
                            for n, s in SECRETS.items()))


def start_server(model: str, keys: Path, threads: int):
    return common.start_server(["--metrics-port", "0", "--model", model, "--threads", str(threads),
                                "--kv-slots", "8", "--max-seq-len", "512", "--auth-keys", str(keys)])


def metadata(name: str):
    return (("authorization", f"Bearer {SECRETS[name]}"),)


async def quiet_calls(address: str, model: str, n: int, tokens: int, timeout: float = 300) -> list[float]:
    latencies = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        for i in range(n):
            start = time.perf_counter()
            await stub.Generate(chat_request(model, tokens, i), metadata=metadata("quiet"), timeout=timeout)
            latencies.append(time.perf_counter() - start)
    return latencies


async def flood(address: str, model: str, key: str, concurrency: int, tokens: int, backoff: bool) -> None:
    """Keep `concurrency` calls in flight until killed. After a refusal a worker waits the
    `retry-after-ms` the server sent (`backoff`), or calls again at once (a client that
    ignores it). Prints counts on SIGTERM."""
    counts = {"ok": 0, "refused": 0, "other": 0}

    async def worker(stub, w):
        i = w
        while True:
            try:
                await stub.Generate(chat_request(model, tokens, i), metadata=metadata(key), timeout=120)
                counts["ok"] += 1
            except grpc.aio.AioRpcError as e:
                counts["refused" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "other"] += 1
                wait = [v for k, v in e.trailing_metadata() or () if k == "retry-after-ms"]
                if backoff and wait:
                    await asyncio.sleep(int(wait[0]) / 1000)
            i += concurrency

    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        import signal
        loop.add_signal_handler(signal.SIGTERM, done.set)
        started = time.monotonic()
        tasks = [asyncio.create_task(worker(stub, w)) for w in range(concurrency)]
        await done.wait()
        for t in tasks:
            t.cancel()
        elapsed = time.monotonic() - started
        print(f"{counts['ok']} {counts['refused']} {counts['other']} {elapsed:.3f}", flush=True)


def start_flood(address: str, model: str, key: str, backoff: bool, concurrency: int,
                tokens: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--flood", address, "--model-name", model, "--key", key,
                             "--flood-concurrency", str(concurrency), "--tokens", str(tokens),
                             *(["--backoff"] if backoff else [])], stdout=subprocess.PIPE, text=True)


def stop_flood(proc: subprocess.Popen) -> tuple[int, int, int, float]:
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    ok, refused, other, elapsed = out.split()
    return int(ok), int(refused), int(other), float(elapsed)


def rate_limited(url: str) -> float:
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith("vigil_key_rate_limited_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=10, help="quiet-key requests per mode and round")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per request, quiet and flood alike")
    ap.add_argument("--flood-concurrency", type=int, default=32, help="flood calls kept in flight")
    ap.add_argument("--noisy-rps", type=float, default=2.0, help="the limited key's requests per second")
    ap.add_argument("--model", default="demo", help="as `vigil serve --model`")
    ap.add_argument("--model-name", default="", help="the served name (default: the demo's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="*", default=[m for m in MODES if m != "alone"], choices=list(MODES)[1:],
                    help="flood modes to run beside `alone`")
    ap.add_argument("--timeout", type=float, default=300, help="seconds a quiet call may take")
    ap.add_argument("--flood", metavar="ADDRESS", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--backoff", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = args.model_name or (DEMO_MODEL_NAME if args.model == "demo" else
                                Path(args.model).name.removesuffix(".gguf").lower())
    if args.flood:
        await flood(args.flood, model, args.key, args.flood_concurrency, args.tokens, args.backoff)
        return

    work = tempfile.TemporaryDirectory(prefix="vigil-bench-keys-")
    keys = Path(work.name) / "keys.yml"
    key_file(keys, args.noisy_rps)
    proc, address, metrics = start_server(args.model, keys, args.threads)
    modes = {m: MODES[m] for m in MODES if m == "alone" or m in args.modes}
    results: dict[str, list[float]] = {m: [] for m in modes}
    floods: dict[str, list[tuple[int, int, int, float]]] = {m: [] for m in modes}
    try:
        await quiet_calls(address, model, 3, args.tokens)  # warm up
        rng = random.Random(args.seed)
        started = time.monotonic()
        for r in range(args.rounds):
            order = list(modes)
            rng.shuffle(order)
            for mode in order:
                flooder = None
                if modes[mode]:
                    flooder = start_flood(address, model, *modes[mode], args.flood_concurrency, args.tokens)
                    await asyncio.sleep(1.5)  # the flood's process starts and reaches its pace
                try:
                    results[mode] += await quiet_calls(address, model, args.requests, args.tokens, args.timeout)
                finally:
                    if flooder is not None:
                        floods[mode].append(stop_flood(flooder))
                await asyncio.sleep(0.5)  # what the flood left running drains
            print(f"round {r + 1}/{args.rounds} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        print(f"\nquiet key's Generate latency, model {model}, {args.tokens} tokens, one call at a time, "
              f"{args.rounds} x {args.requests} per mode; flood: {args.flood_concurrency} calls in flight "
              f"(limited key: {args.noisy_rps:g} requests/s, 2 in flight); {os.cpu_count()} CPUs")
        print(f"{'flood':<18} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'p50 ratio':>10} {'p99 ratio':>10}"
              f"   flood: served/s refused/s")
        base = results["alone"]
        for mode, values in results.items():
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            line = (f"{mode:<18} {len(values):>4} {p50 * 1e3:>8.1f} {p99 * 1e3:>8.1f} "
                    f"{statistics.fmean(values) * 1e3:>8.1f} {p50 / percentile(base, 0.5):>10.3f} "
                    f"{p99 / percentile(base, 0.99):>10.3f}")
            if floods[mode]:
                seconds = sum(f[3] for f in floods[mode])
                line += (f"   {sum(f[0] for f in floods[mode]) / seconds:>14.1f} "
                         f"{sum(f[1] for f in floods[mode]) / seconds:>9.1f}")
            print(line)
        print(f"\nvigil_key_rate_limited_total on the server: {rate_limited(metrics):g}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        work.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
