"""Decode throughput of the demo model: Vigil's gRPC server against `transformers`
generate on the same weights (and llama.cpp on the same GGUF when llama-cpp-python is
installed), all in one run on this machine.

    .venv/bin/python bench/bench_decode.py [--tokens 128] [--quantize int4] [--threads 2]

Vigil runs as a real `vigil serve` subprocess and is driven over gRPC: one stream,
then 4 and 16 concurrent streams (aggregate tokens/s), after timing the first and the
tenth request the server answers (warm-up at load). Every figure is decode
throughput: completion tokens after the first, over the time after the first token
(single stream), or all completion tokens over the wall time (concurrent). Peak RSS is
read from /proc (VmHWM) for the server and for this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference.runtime.demo import DEMO_MODEL_NAME, demo_model_path  # noqa: E402
from protos import llm_pb2, llm_pb2_grpc  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [str(REPO / ".venv/bin/vigil"), "serve", "--port", "0", "--metrics-port", "-1",
           "--quantize", args.quantize, "--threads", str(args.threads), "--kv-slots", "16",
           "--max-seq-len", "512"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        match = re.search(r"gRPC on ([\d.]+:\d+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError("vigil serve exited before it listened")


def request(tokens: int, i: int = 0) -> llm_pb2.GenerateRequest:
    chat = llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role="user", content=f"{PROMPT} ({i})")])
    return llm_pb2.GenerateRequest(model=DEMO_MODEL_NAME, chat=chat, sampling=llm_pb2.SamplingParams(
        max_tokens=tokens, ignore_eos=True))


async def vigil_streams(address: str, streams: int, tokens: int) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        await stub.Generate(request(8))  # warm-up
        if streams == 1:
            r = await stub.Generate(request(tokens))
            return (r.completion_tokens - 1) / (r.timing.total_seconds - r.timing.time_to_first_token_seconds)
        start = time.perf_counter()
        replies = await asyncio.gather(*(stub.Generate(request(tokens, i)) for i in range(streams)))
        return sum(r.completion_tokens for r in replies) / (time.perf_counter() - start)


async def first_and_tenth(address: str, tokens: int = 16) -> tuple[float, float]:
    """Latencies of the first and the tenth request after the server starts listening."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        latencies = []
        for i in range(10):
            start = time.perf_counter()
            await stub.Generate(request(tokens, i))
            latencies.append(time.perf_counter() - start)
    return latencies[0], latencies[9]


def transformers_single(gguf: Path, tokens: int, threads: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        total = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1] - 1) / (total - first)


def llama_cpp_single(gguf: Path, tokens: int, threads: int) -> float | None:
    """In a process of its own, so that a crash of llama.cpp (or of its OpenMP runtime next to
    torch's) costs only its figure."""
    out = subprocess.run([sys.executable, __file__, "--llama-cpp-child", "--tokens", str(tokens),
                          "--threads", str(threads)], capture_output=True, text=True)
    return float(out.stdout.split()[-1]) if out.returncode == 0 and out.stdout.strip() else None


def llama_cpp_child(gguf: Path, tokens: int, threads: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=512, verbose=False)
    messages = [{"role": "user", "content": PROMPT}]
    llm.create_chat_completion(messages, max_tokens=4, temperature=0.0)
    start = time.perf_counter()
    llm.create_chat_completion(messages, max_tokens=1, temperature=0.0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = llm.create_chat_completion(messages, max_tokens=tokens, temperature=0.0, logit_bias={2: -1e9})
    total = time.perf_counter() - start
    return (out["usage"]["completion_tokens"] - 1) / (total - first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--quantize", default="int4", choices=("none", "int8", "int4"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--llama-cpp-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    gguf = demo_model_path()
    if args.llama_cpp_child:
        value = llama_cpp_child(gguf, args.tokens, args.threads)
        return print(value if value is not None else "")

    proc, address = start_server(args)
    try:
        first, tenth = asyncio.run(first_and_tenth(address))
        ours = {n: asyncio.run(vigil_streams(address, n, args.tokens)) for n in (1, 4, 16)}
        server_rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    hf = transformers_single(gguf, args.tokens, args.threads)
    cpp = llama_cpp_single(gguf, args.tokens, args.threads)

    print(f"\ndemo model {gguf.name}, {args.tokens} tokens, {args.threads} threads, vigil --quantize {args.quantize}")
    print(f"{'run':<34}{'tokens/s':>10}{'vs transformers':>17}{'vs llama.cpp':>14}")
    rows = [("transformers generate, 1 stream", hf)]
    if cpp is not None:
        rows.append(("llama.cpp, 1 stream", cpp))
    rows += [(f"vigil gRPC, {n} stream{'s' * (n > 1)}{' (aggregate)' * (n > 1)}", v) for n, v in ours.items()]
    for name, value in rows:
        vs_cpp = f"{value / cpp:.2f}x" if cpp else "n/a"
        print(f"{name:<34}{value:>10.1f}{value / hf:>16.2f}x{vs_cpp:>14}")
    print(f"vigil 16 streams / vigil 1 stream: {ours[16] / ours[1]:.2f}x")
    if cpp is None:
        print("llama.cpp: not measured (not installed, or it crashed; pip install llama-cpp-python builds it)")
    print(f"vigil, 16-token requests after start: first {first * 1e3:.0f} ms, tenth {tenth * 1e3:.0f} ms")
    print(f"peak RSS: vigil server {server_rss:.0f} MB, this process (transformers) {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
