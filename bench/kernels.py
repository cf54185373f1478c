"""The Triton kernels against their torch equivalents, on a CUDA device.

For each kernel and shape: the kernel's time and the torch equivalent's (median of
triton.testing.do_bench, L2 flushed between runs), the kernel's achieved bandwidth over
the bytes it must move at least (inputs read once, outputs written once), that as a
percent of the device's peak, and torch's time over the kernel's (above 1: faster).
Torch equivalents: softmax plus separate statistics (softmax_stats_reference);
F.rms_norm; F.silu(gate) * up; the rotate-half formula; a bf16 matmul on weights
dequantised beforehand (for INT8 and INT4); scaled_dot_product_attention over the
cache rows (decode_attention_reference).

    .venv/bin/python bench/kernels.py [--peak-gbs 3350]

Without CUDA it says so and exits 0: the kernels are checked on the CPU, under
TRITON_INTERPRET=1, by tests/inference/test_kernels.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from inference.runtime import kernels as K # noqa: E402
from inference.runtime.kernels import dispatch  # noqa: E402
from inference.runtime.quantize import Int4Linear, Int8Linear  # noqa: E402

# HBM peak by device name (GB/s); --peak-gbs for anything else
PEAK_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350,
            "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300}
BF16 = torch.bfloat16


def peak_gbs(name: str) -> float | None:
    return next((gbs for key, gbs in PEAK_GBS.items() if key in name), None)


def bench(fn) -> float:
    """Median microseconds of fn()."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cases():
    """(kernel, shape, bytes moved, kernel fn, torch fn); each case is timed before the
    next is made (the functions read the loop's current tensors)."""
    dev = "cuda"
    for n, v in [(1, 49152), (16, 49152), (64, 151936)]:
        logits, temps = torch.randn(n, v, device=dev) * 4, torch.full((n,), 0.8, device=dev)
        yield ("softmax_stats", f"{n}x{v} fp32", nbytes(logits, logits) + 12 * n,
               lambda: K.fused_softmax_stats(logits, temps), lambda: K.softmax_stats_reference(logits, temps))
    for m, d in [(1, 576), (16, 4096), (256, 8192)]:
        x, w = torch.randn(m, d, device=dev, dtype=BF16), torch.randn(d, device=dev, dtype=BF16)
        yield ("rms_norm", f"{m}x{d} bf16", 2 * nbytes(x) + nbytes(w),
               lambda: K.rms_norm(x, w, 1e-5), lambda: K.rms_norm_reference(x, w, 1e-5))
    for m, i in [(1, 1536), (16, 11008), (256, 14336)]:
        gate_up = torch.randn(m, 2 * i, device=dev, dtype=BF16)
        gate, up = gate_up.chunk(2, dim=-1)
        yield ("silu_mul", f"{m}x{i} bf16", 3 * nbytes(gate),
               lambda: K.silu_mul(gate, up), lambda: K.silu_mul_reference(gate, up))
    for b, hq, hkv, t, d in [(1, 9, 3, 1, 64), (16, 32, 8, 1, 128), (1, 32, 8, 2048, 128)]:
        q = torch.randn(b, t, hq, d, device=dev, dtype=BF16).transpose(1, 2)
        k = torch.randn(b, t, hkv, d, device=dev, dtype=BF16).transpose(1, 2)
        cos, sin = torch.randn(b, t, d, device=dev, dtype=BF16), torch.randn(b, t, d, device=dev, dtype=BF16)
        yield ("apply_rotary", f"B{b} Hq{hq} Hkv{hkv} T{t} D{d} bf16", 2 * nbytes(q, k) + nbytes(cos, sin),
               lambda: K.apply_rotary(q, k, cos, sin), lambda: K.apply_rotary_reference(q, k, cos, sin))
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        w = torch.randn(n, k, device=dev) * 0.02
        lin = torch.nn.Linear(k, n, bias=False, device=dev)
        lin.weight.data = w
        w_bf16 = w.to(BF16)
        int8 = Int8Linear.from_float(lin)
        int4 = {g: Int4Linear.from_float(lin, g) for g in (32, 128)}
        for m in (1, 4, 16):
            x = torch.randn(m, k, device=dev, dtype=BF16)
            out = m * n * 2
            yield ("quant_matmul int8", f"{m}x{k} @ {n}x{k}", nbytes(x, int8.weight, int8.scales) + out,
                   lambda: K.quant_matmul(x, int8.weight, int8.scales), lambda: F.linear(x, w_bf16))
            for g, q in int4.items():
                yield (f"quant_matmul int4 g{g}", f"{m}x{k} @ {n}x{k}",
                       nbytes(x, q.qweight, q.scales, q.zeros) + out,
                       lambda: K.quant_matmul(x, q.qweight, q.scales, q.zeros, g), lambda: F.linear(x, w_bf16))
    for b, hq, hkv, s, d in [(1, 9, 3, 512, 64), (16, 32, 8, 2048, 128), (64, 32, 8, 1024, 128),
                             (4, 64, 8, 16384, 128)]:
        q = torch.randn(b, hq, d, device=dev, dtype=BF16)
        k_cache, v_cache = (torch.randn(b, hkv, s, d, device=dev, dtype=BF16) for _ in range(2))
        lengths = torch.full((b,), s, device=dev)
        yield ("decode_attention", f"B{b} Hq{hq} Hkv{hkv} S{s} D{d} bf16", nbytes(k_cache, v_cache) + 2 * nbytes(q),
               lambda: K.decode_attention(q, k_cache, v_cache, lengths),
               lambda: K.decode_attention_reference(q, k_cache, v_cache, lengths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-gbs", type=float, help="the device's peak memory bandwidth, GB/s")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure. The kernels are checked on the CPU, under "
              "TRITON_INTERPRET=1, by tests/inference/test_kernels.py.")
        return 0
    if not dispatch.AVAILABLE:
        print("triton is not installed: pip install triton")
        return 1
    name = torch.cuda.get_device_name()
    peak = args.peak_gbs or peak_gbs(name)
    print(f"{name}, peak {peak or '?'} GB/s, torch {torch.__version__}")
    print(f"{'kernel':<24} {'shape':<30} {'triton us':>10} {'torch us':>10} {'GB/s':>8} {'% peak':>7} {'ratio':>6}")
    with torch.no_grad(), dispatch.using("triton"):
        for kernel, shape, moved, fn, torch_fn in cases():
            t_kernel, t_torch = bench(fn), bench(torch_fn)
            gbs = moved / t_kernel / 1e3
            pct = f"{100 * gbs / peak:.0f}" if peak else "?"
            print(f"{kernel:<24} {shape:<30} {t_kernel:>10.1f} {t_torch:>10.1f} {gbs:>8.0f} {pct:>7} "
                  f"{t_torch / t_kernel:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
