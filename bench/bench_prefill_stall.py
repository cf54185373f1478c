"""A long prompt arriving while other streams decode: their inter-token times with the
prompt prefilled at once against prefilled in chunks, in one run on this machine.

    .venv/bin/python bench/bench_prefill_stall.py [--streams 15] [--prompt-tokens 2000]
        [--tokens 250] [--chunks 256] [--rounds 2] [--threads 1]

The demo model (int4) runs in an engine of this process (the one the server runs, on
its compute thread). `streams` requests decode `tokens` tokens each (greedy, ignoring
end of sequence); once each has 24 tokens, a prompt of `prompt-tokens` tokens arrives.
Every token's arrival is timed as the engine hands it out; the figures are over every
gap between two tokens of the decoding streams: median, p99, max and p99 / median
(and the median of the gaps before the prompt arrived, and the longest gap over it:
with long streams the stall of a prompt prefilled at once is under 1 % of the gaps,
so p99 alone can miss it), and the long prompt's time to its first token. One thread by default: on a shared 2-core machine a 2-thread OpenMP
pool stalls whenever another process takes a core. Modes run in turn, `rounds` times:
the prompt prefilled at once (`prefill_chunk=None`), and in chunks of at most each
of `chunks` tokens (the engine sizes them to the decode step; see its docstring).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference.runtime.compute import ComputeThread, single_threaded_torch  # noqa: E402
from inference.runtime.demo import demo_model_path  # noqa: E402
from inference.runtime.engine import Engine, Finished, Job, TextChunk  # noqa: E402
from inference.runtime.loading import build_model, load_checkpoint  # noqa: E402
from inference.runtime.sampling import SamplingParams  # noqa: E402

TEXT = ("The lighthouse keeper climbed the stairs every evening at dusk, checked the lamp, "
        "wound the clockwork and wrote the weather into the log before the ships came by. ")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def one_round(model, tok, args, chunk: int | None) -> dict:
    engine = Engine(model, tok, kv_slots=args.streams + 1, max_seq_len=args.prompt_tokens + 64,
                    max_waiting=4, prefill_chunk=chunk)
    long_ids = (tok.encode(TEXT * (args.prompt_tokens // 20 + 1), add_special=False))[:args.prompt_tokens]
    arrivals: list[list[float]] = [[] for _ in range(args.streams)]
    done = threading.Event()
    finished = [0]
    long_times: dict[str, float] = {}
    lock = threading.Lock()

    def on_long(out) -> None:
        if isinstance(out, TextChunk) and "first" not in long_times:
            long_times["first"] = time.perf_counter()
        if isinstance(out, Finished):
            with lock:
                finished[0] += 1
                if finished[0] == args.streams + 1:
                    done.set()

    long_job = Job(long_ids, on_long, params=SamplingParams(max_tokens=1, ignore_eos=True))

    def on_stream(i: int):
        def emit(out) -> None:
            if isinstance(out, TextChunk):
                arrivals[i].append(time.perf_counter())
                if "sent" not in long_times and all(len(a) >= 24 for a in arrivals):
                    long_times["sent"] = time.perf_counter()
                    engine.submit(long_job)
            elif isinstance(out, Finished):
                with lock:
                    finished[0] += 1
                    if finished[0] == args.streams + 1:
                        done.set()
        return emit

    prompts = [tok.encode(f"Story number {i}: {TEXT}", add_special=False) for i in range(args.streams)]
    for i, p in enumerate(prompts):
        engine.submit(Job(p, on_stream(i), params=SamplingParams(max_tokens=args.tokens, ignore_eos=True)))
    done.wait()
    engine.stop()
    gaps = [b - a for a_list in arrivals for a, b in zip(a_list, a_list[1:])]
    before = [b - a for a_list in arrivals for a, b in zip(a_list, a_list[1:]) if b < long_times["sent"]]
    med, p99 = statistics.median(gaps), percentile(gaps, 0.99)
    return {"median before": statistics.median(before), "median": med, "p99": p99, "max": max(gaps),
            "ratio": p99 / med, "worst": max(gaps) / statistics.median(before),
            "ttft": long_times.get("first", float("nan")) - long_times.get("sent", float("nan"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=15)
    p.add_argument("--prompt-tokens", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=250)
    p.add_argument("--chunks", default="256", help="prefill_chunk values to run beside 'at once'")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quantize", default="int4", choices=("none", "int8", "int4"))
    args = p.parse_args()

    ComputeThread.shared().set_threads(args.threads)
    with single_threaded_torch():
        ckpt = load_checkpoint(demo_model_path())
        model = build_model(ckpt, args.quantize)
    modes: list[int | None] = [None] + [int(c) for c in args.chunks.split(",") if c]
    results: dict = {m: [] for m in modes}
    one_round(model, ckpt.tokenizer, argparse.Namespace(**{**vars(args), "tokens": 32, "prompt_tokens": 300}),
              256)  # warm-up
    for r in range(args.rounds):
        for m in modes:
            results[m].append(one_round(model, ckpt.tokenizer, args, m))
            print(f"round {r + 1}, {'at once' if m is None else f'chunked, <= {m}'}: "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" if k not in ("ratio", "worst") else f"{k} {v:.2f}"
                              for k, v in results[m][-1].items()), flush=True)

    print(f"\n{args.streams} streams decoding {args.tokens} tokens, a {args.prompt_tokens}-token prompt "
          f"arriving; demo {args.quantize}, {args.threads} threads; {args.rounds} rounds, modes in turn")
    print(f"{'prefill':<16}{'median before':>14}{'median ms':>11}{'p99 ms':>9}{'max ms':>9}{'p99/median':>12}"
          f"{'max/median before':>19}{'long TTFT ms':>14}")
    for m, rows in results.items():
        name = "at once" if m is None else f"chunked, <= {m}"
        avg = {k: statistics.fmean(row[k] for row in rows) for k in rows[0]}
        print(f"{name:<16}{avg['median before'] * 1e3:>14.1f}{avg['median'] * 1e3:>11.1f}{avg['p99'] * 1e3:>9.1f}{avg['max'] * 1e3:>9.1f}"
              f"{avg['ratio']:>12.2f}{avg['worst']:>19.1f}{avg['ttft'] * 1e3:>14.0f}")


if __name__ == "__main__":
    main()
