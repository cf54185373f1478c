"""Where a request's time goes: the latency of each stage (queue, prefill, first token,
decode, publish) from the server's own spans, as p50/p95/p99, and what tracing costs.

    .venv/bin/python bench/bench_latency.py [--rounds 4] [--requests 50] [--concurrency 4] [--tokens 16]
                                            [--model demo] [--quantize int4]

Two `vigil serve` processes load the same model and publish their events to the
embedded broker (Tansu): one with `--otlp-endpoint` pointing at an OTLP/gRPC collector
that this script runs (so the spans travel the way they would to Jaeger or Tempo), one
without tracing, the baseline. They are driven in turn, in rounds of a shuffled order,
with unary Generate calls (chat prompts, `ignore_eos`, so every request makes exactly
--tokens tokens). The table's stages, per request:

  queue        waiting for a KV slot                      (span `queue`)
  prefill      the prompt's forward pass + first token    (span `prefill`)
  first token  the handler's start to the first token     (request span start -> prefill end)
  decode       the other tokens                           (span `decode`)
  per token    decode / (tokens - 1)
  publish      the request's end to the broker's ack      (span `publish vigil.inference.events`)
  other        request span - queue - prefill - decode    (validation, tokenizer, routing, gRPC handler)
  request      the request span                           (handler start -> event recorded)

and the client's latency with tracing on against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent import futures
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from bench.common import drive, interleaved, percentile  # noqa: E402
from eventbus.broker import EmbeddedBroker  # noqa: E402
from inference.api.options import ServerOptions  # noqa: E402
from inference.api.server import model_name  # noqa: E402

PUBLISH = "publish vigil.inference.events"


class Collector:
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with collector.lock:
                    for rs in request.resource_spans:
                        for ss in rs.scope_spans:
                            collector.spans.extend(ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.spans: list = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(1)


def start_server(extra: list[str], args):
    return common.start_server(["--metrics-port", "-1", "--model", args.model, "--quantize", args.quantize,
                                "--threads", str(args.threads), "--kv-slots", "8", "--max-seq-len", "512",
                                *(["--model-name", args.model_name] if args.model_name else []), *extra])


def stages(spans: list, tokens: int, skip: set[bytes]) -> dict[str, list[float]]:
    """Per-stage durations in seconds, one value per traced request (traces in `skip`,
    the warm-up's, left out)."""
    by_trace: dict[bytes, dict[str, object]] = defaultdict(dict)
    for s in spans:
        by_trace[s.trace_id][s.name] = s
    out: dict[str, list[float]] = defaultdict(list)

    def dur(s) -> float:
        return (s.end_time_unix_nano - s.start_time_unix_nano) / 1e9

    for trace_id, named in by_trace.items():
        root = named.get("vigil.v1.LLM/Generate")
        if trace_id in skip or root is None or not {"queue", "prefill", "decode"} <= set(named):
            continue
        q, p, d = named["queue"], named["prefill"], named["decode"]
        out["queue"].append(dur(q))
        out["prefill"].append(dur(p))
        out["first token"].append((p.end_time_unix_nano - root.start_time_unix_nano) / 1e9)
        out["decode"].append(dur(d))
        out["per token"].append(dur(d) / max(1, tokens - 1))
        if PUBLISH in named:
            out["publish"].append(dur(named[PUBLISH]))
        out["other"].append(dur(root) - dur(q) - dur(p) - dur(d))
        out["request"].append(dur(root))
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=50, help="requests per server and round")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="demo", help="a GGUF file, a Hugging Face folder, or demo")
    ap.add_argument("--model-name", default="", help="name it is served under (default: as vigil serve names it)")
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = model_name(ServerOptions(model=args.model, model_name=args.model_name))  # as `vigil serve` names it

    collector = Collector()
    broker = EmbeddedBroker().start()
    outboxes = tempfile.TemporaryDirectory(prefix="vigil-bench-latency-")
    modes = {
        "tracing off": ["--bootstrap-servers", broker.bootstrap_servers, "--outbox-dir", f"{outboxes.name}/off"],
        "tracing on": ["--bootstrap-servers", broker.bootstrap_servers, "--outbox-dir", f"{outboxes.name}/on",
                       "--otlp-endpoint", f"http://127.0.0.1:{collector.port}"],
    }
    servers: dict[str, tuple[subprocess.Popen, str, str]] = {}
    try:
        for mode, extra in modes.items():
            servers[mode] = start_server(extra, args)
        for mode, (_, address, _) in servers.items():  # warm up: first calls, first connections
            await drive(address, model, 2 * args.concurrency, args.concurrency, args.tokens)
        time.sleep(6)  # the batch span processor exports every 5 s: the warm-up's spans arrive now
        with collector.lock:
            warmup = {s.trace_id for s in collector.spans}
        results = await interleaved({mode: s[1] for mode, s in servers.items()}, model, args.rounds,
                                    args.requests, args.concurrency, args.tokens, args.seed)
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()  # `vigil serve` flushes its spans as it stops
        for proc, _, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        outboxes.cleanup()
        collector.stop()

    with collector.lock:
        per_stage = stages(collector.spans, args.tokens, warmup)
    n = len(per_stage["request"])
    print(f"\nper-stage latency from the server's spans, model {model} ({args.quantize}), Generate of {args.tokens} "
          f"tokens, {args.concurrency} concurrent, {n} traced requests (KV slots 8, events to the embedded broker)")
    print(f"{'stage':<12} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'p50 share':>10}")
    whole = percentile(per_stage["request"], 0.5) if n else 1.0
    for stage in ("queue", "prefill", "first token", "decode", "per token", "publish", "other", "request"):
        values = per_stage.get(stage, [])
        if not values:
            print(f"{stage:<12} {0:>5}")
            continue
        p50 = percentile(values, 0.5)
        share = f"{p50 / whole:>9.1%}" if stage in ("queue", "prefill", "decode", "other") else ""
        print(f"{stage:<12} {len(values):>5} {p50 * 1e3:>9.2f} {percentile(values, 0.95) * 1e3:>9.2f} "
              f"{percentile(values, 0.99) * 1e3:>9.2f} {statistics.fmean(values) * 1e3:>9.2f} {share:>10}")

    print(f"\nclient latency, {args.rounds} x {args.requests} requests per server")
    print(f"{'server':<12} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9} {'p50 ratio':>10} {'p99 ratio':>10}")
    base = results["tracing off"]
    for mode, values in results.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        print(f"{mode:<12} {len(values):>5} {p50 * 1e3:>9.1f} {p99 * 1e3:>9.1f} {statistics.fmean(values) * 1e3:>9.1f} "
              f"{p50 / percentile(base, 0.5):>10.3f} {p99 / percentile(base, 0.99):>10.3f}")


if __name__ == "__main__":
    asyncio.run(main())
