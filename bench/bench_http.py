"""What the HTTP front costs: streamed generation over OpenAI's HTTP API (SSE) against
gRPC's GenerateStream, on the same server, at 1 and 16 streams at once.

    .venv/bin/python bench/bench_http.py [--rounds 6] [--streams 1 16] [--requests 8] [--tokens 32]
                                         [--model demo] [--quantize int4]

One `vigil serve --http-port 0` loads the model; this process drives it in rounds: in
each, per concurrency N, a block of streamed chats over each protocol back to back in a
shuffled order (so a machine's drift falls on both alike; --requests streams, at least
2N, of exactly --tokens tokens each with `ignore_eos`, N at a time):
gRPC with grpc.aio, HTTP with aiohttp reading the server-sent events as they come (the
leanest client, so the figure is the server's front, not a client's parsing). Printed
per concurrency: tokens per second over each protocol (all rounds), HTTP / gRPC, the
smallest, median and largest of the rounds' own ratios (on a machine shared with other
work, the median is the figure to read), and the time to first token (p50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import PROMPTS, percentile  # noqa: E402
from protos import llm_pb2, llm_pb2_grpc  # noqa: E402


def start(options: list[str]) -> tuple[subprocess.Popen, str, str, str]:
    """`vigil serve` with HTTP on; the process, its gRPC address, its HTTP base URL and model name."""
    cmd = [str(REPO / ".venv/bin/vigil"), "serve", "--port", "0", "--http-port", "0", "--metrics-port", "-1",
           *options]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    grpc_address = http_url = model = ""
    for line in proc.stdout:
        if m := re.search(r"gRPC on ([\d.]+:\d+)", line):
            grpc_address = m.group(1)
        if m := re.search(r"HTTP on (http://\S+)/v1", line):
            http_url = m.group(1)
        if m := re.search(r"model (\S+) version", line):
            model = m.group(1)
        if grpc_address and http_url and model:
            return proc, grpc_address, http_url, model
    raise RuntimeError("vigil serve exited before it listened")


async def grpc_stream(stub, model: str, tokens: int, i: int) -> tuple[int, float]:
    chat = llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])])
    request = llm_pb2.GenerateRequest(model=model, chat=chat,
                                      sampling=llm_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True))
    start, first, count = time.perf_counter(), 0.0, 0
    async for message in stub.GenerateStream(request, timeout=300):
        if message.text and not first:
            first = time.perf_counter() - start
        if message.final:
            count = message.completion_tokens
    return count, first


async def http_stream(session: aiohttp.ClientSession, url: str, model: str, tokens: int, i: int) -> tuple[int, float]:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, count = time.perf_counter(), 0.0, 0
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:  # JSON parsed only where needed: the client's cost is not the front's
            if not first and line.startswith(b'data: {') and b'"content":"' in line and b'"content":""' not in line:
                first = time.perf_counter() - start
            elif line.startswith(b'data: {') and b'"usage":{' in line:
                count = json.loads(line[6:])["usage"]["completion_tokens"]
    return count, first


async def drive(run, requests: int, concurrency: int) -> tuple[int, float, list[float]]:
    """`requests` streams, `concurrency` at a time: tokens, seconds, first-token times."""
    queue = list(range(requests))
    tokens, firsts = 0, []

    async def worker():
        nonlocal tokens
        while queue:
            count, first = await run(queue.pop())
            tokens += count
            firsts.append(first)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens, time.perf_counter() - start, firsts


def block_size(args, concurrency: int) -> int:
    """Streams per block: --requests, and at least two waves of the concurrency."""
    return max(args.requests, 2 * concurrency)


async def bench(grpc_address: str, http_url: str, model: str, args) -> dict:
    """Per (protocol, concurrency): a [tokens, seconds, first-token times] per round."""
    rounds = {(p, c): [] for p in ("grpc", "http") for c in args.streams}
    rng = random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=max(args.streams))
    async with grpc.aio.insecure_channel(grpc_address) as channel, \
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        stub = llm_pb2_grpc.LLMStub(channel)
        runs = {"grpc": lambda i: grpc_stream(stub, model, args.tokens, i),
                "http": lambda i: http_stream(session, http_url, model, args.tokens, i)}
        for name in runs:  # warm both paths (and the model's first batch shapes)
            await drive(runs[name], max(args.streams), max(args.streams))
        started = time.monotonic()
        for r in range(args.rounds):
            for concurrency in args.streams:  # the two protocols back to back, in a shuffled order
                order = list(runs)
                rng.shuffle(order)
                for protocol in order:
                    rounds[(protocol, concurrency)].append(
                        await drive(runs[protocol], block_size(args, concurrency), concurrency))
            print(f"round {r + 1}/{args.rounds} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return rounds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests", type=int, default=8,
                   help="streams per protocol, concurrency and round (at least twice the concurrency)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--model", default="demo")
    p.add_argument("--quantize", default="int4")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    proc, grpc_address, http_url, model = start(["--model", args.model, "--quantize", args.quantize,
                                                 "--kv-slots", str(max(16, *args.streams))])
    try:
        rounds = asyncio.run(bench(grpc_address, http_url, model, args))
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"\nmodel {model} ({args.quantize}), {args.tokens} tokens per stream, {args.rounds} rounds; in each, "
          f"per concurrency, a block of streams over each protocol back to back in a shuffled order")
    print(f"{'streams':>7}  {'gRPC tok/s':>10}  {'HTTP tok/s':>10}  {'HTTP/gRPC':>9}  "
          f"{'per round (min, median, max)':>29}  {'TTFT p50 gRPC':>13}  {'HTTP':>8}")
    for c in args.streams:
        g, h = rounds[("grpc", c)], rounds[("http", c)]
        g_rate = sum(x[0] for x in g) / sum(x[1] for x in g)
        h_rate = sum(x[0] for x in h) / sum(x[1] for x in h)
        ratios = sorted((hx[0] / hx[1]) / (gx[0] / gx[1]) for gx, hx in zip(g, h))
        firsts_g, firsts_h = [f for x in g for f in x[2]], [f for x in h for f in x[2]]
        print(f"{c:>7}  {g_rate:>10.1f}  {h_rate:>10.1f}  {h_rate / g_rate:>9.3f}  "
              f"{ratios[0]:>9.3f} {percentile(ratios, 0.5):>9.3f} {ratios[-1]:>9.3f}  "
              f"{percentile(firsts_g, 0.5) * 1000:>10.1f} ms  {percentile(firsts_h, 0.5) * 1000:>5.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
