"""Peak RSS of `vigil serve --model demo` (its default options: int4, 16 KV slots of 1,024
tokens) over its start and a few requests, and the latency of the first and the tenth
request after it listens.

    .venv/bin/python bench/bench_serve_memory.py [extra vigil serve options]

Read from the server's /proc/PID/status: VmHWM (the peak), VmRSS, RssAnon, RssFile and
RssShmem (the KV pool, a shared anonymous map whose pages exist once written), when it
listens and after the requests: ten 16-token requests one after another (the first
and the tenth timed), 16 of 32 tokens at once, and one with a prompt of about 700
tokens.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference.runtime.demo import DEMO_MODEL_NAME  # noqa: E402
from protos import llm_pb2, llm_pb2_grpc  # noqa: E402


def memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) // 1024
    return out


def request(i: int, tokens: int, text: str = "Tell me about lighthouses.") -> llm_pb2.GenerateRequest:
    chat = llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role="user", content=f"{text} ({i})")])
    return llm_pb2.GenerateRequest(model=DEMO_MODEL_NAME, chat=chat,
                                   sampling=llm_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True))


async def drive(address: str) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        latencies = []
        for i in range(10):
            start = time.perf_counter()
            await stub.Generate(request(i, 16))
            latencies.append(time.perf_counter() - start)
        await asyncio.gather(*(stub.Generate(request(i, 32)) for i in range(16)))
        await stub.Generate(request(0, 16, "word " * 700))
    return latencies


def main() -> None:
    cmd = [str(REPO / ".venv/bin/vigil"), "serve", "--port", "0", "--metrics-port", "-1", "--model", "demo",
           *sys.argv[1:]]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if match := re.search(r"gRPC on ([\d.]+:\d+)", line):
                break
        else:
            raise RuntimeError("vigil serve exited before it listened")
        print(f"listening after {time.perf_counter() - started:.1f} s: {memory(proc.pid)} (MB)")
        latencies = asyncio.run(drive(match.group(1)))
        print(f"after the requests: {memory(proc.pid)} (MB)")
        print(f"16-token requests after start: first {latencies[0] * 1e3:.0f} ms, tenth {latencies[9] * 1e3:.0f} ms,"
              f" median of the ten {sorted(latencies)[5] * 1e3:.0f} ms")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
