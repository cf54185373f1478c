"""What the benchmarks share: pinning to one core, percentiles, a `vigil serve` in a
subprocess, and a closed loop of Generate calls against it."""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc

from protos import llm_pb2, llm_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow.",
           "Write one sentence about the sea.", "How many legs does a spider have?"]


def one_core() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to cpu {cpu}"
    except (AttributeError, OSError):
        return "not pinned"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def start_server(options: list[str], tree: Path | None = None) -> tuple[subprocess.Popen, str, str]:
    """`vigil serve --port 0 OPTIONS`; the process, its gRPC address and its metrics URL
    (empty with --metrics-port -1), once it listens. `tree`: run the code of that copy of
    the repository instead (with this one's virtual environment)."""
    cmd = [str(REPO / ".venv/bin/vigil"), "serve", "--port", "0", *options]
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        match = re.search(r"gRPC on ([\d.]+:\d+)(?:.*metrics on (\S+))?", line)
        if match:
            return proc, match.group(1), match.group(2) or ""
    raise RuntimeError(f"vigil serve {' '.join(options)} exited before it listened")


def chat_request(model: str, tokens: int, i: int) -> llm_pb2.GenerateRequest:
    """The i-th of the benchmarks' chats, `tokens` long whatever the model says."""
    chat = llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])])
    return llm_pb2.GenerateRequest(model=model, chat=chat, sampling=llm_pb2.SamplingParams(
        max_tokens=tokens, ignore_eos=True))


async def drive(address: str, model: str, n: int, concurrency: int, tokens: int) -> list[float]:
    """n Generate calls, `concurrency` at a time; their latencies in seconds."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        queue = list(range(n))

        async def worker():
            while queue:
                i = queue.pop()
                start = time.perf_counter()
                await stub.Generate(chat_request(model, tokens, i), timeout=120)
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def interleaved(addresses: dict[str, str], model: str, rounds: int, requests: int, concurrency: int,
                      tokens: int, seed: int) -> dict[str, list[float]]:
    """`rounds` rounds of `requests` calls to each server, in a shuffled order each round,
    so that a machine's drift over the run falls on every server alike; latencies by name."""
    results: dict[str, list[float]] = {name: [] for name in addresses}
    rng = random.Random(seed)
    started = time.monotonic()
    for r in range(rounds):
        order = list(addresses)
        rng.shuffle(order)
        for name in order:
            results[name] += await drive(addresses[name], model, requests, concurrency, tokens)
        print(f"round {r + 1}/{rounds} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return results
