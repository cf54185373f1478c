"""Rotary position embedding, Hugging Face Llama's rotate-half convention:
x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1) for the halves x1, x2
of the head dimension. One program per (sequence, position) rotates every head of q and k.
"""

from __future__ import annotations

import torch

from inference.runtime.kernels.dispatch import tl, triton, use_triton


@triton.jit
def _rotate_heads(x_ptr, out_ptr, b, t, H, stride_xb, stride_xh, stride_xt, stride_ob, stride_oh, stride_ot,
                  cos1, sin1, cos2, sin2, HALF, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < H) & (cols < HALF)
    x = x_ptr + b * stride_xb + heads * stride_xh + t * stride_xt + cols
    x1 = tl.load(x, mask=mask).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask).to(tl.float32)
    out = out_ptr + b * stride_ob + heads * stride_oh + t * stride_ot + cols
    tl.store(out, (x1 * cos1 - x2 * sin1).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * cos2 + x1 * sin2).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, Hq, Hkv, HALF,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot,
                   stride_cb, stride_ct, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                   BLOCK_HALF: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    at = b * stride_cb + t * stride_ct + cols
    cos1 = tl.load(cos_ptr + at, mask=cols < HALF).to(tl.float32)
    sin1 = tl.load(sin_ptr + at, mask=cols < HALF).to(tl.float32)
    cos2 = tl.load(cos_ptr + at + HALF, mask=cols < HALF).to(tl.float32)
    sin2 = tl.load(sin_ptr + at + HALF, mask=cols < HALF).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, b, t, Hq, stride_qb, stride_qh, stride_qt, stride_qob, stride_qoh,
                  stride_qot, cos1, sin1, cos2, sin2, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, b, t, Hkv, stride_kb, stride_kh, stride_kt, stride_kob, stride_koh,
                  stride_kot, cos1, sin1, cos2, sin2, HALF, BLOCK_HKV, BLOCK_HALF)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, Hq, T, D], k [B, Hkv, T, D]; cos, sin [T, D], or [B, T, D] for positions
    that differ per sequence. Returns the rotated (q, k), in their own dtypes."""
    if not use_triton(q):
        return apply_rotary_reference(q, k, cos, sin)
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if d % 2 or k.shape != (b, hkv, t, d) or cos.shape[-2:] != (t, d) or sin.shape != cos.shape:
        raise ValueError(f"apply_rotary: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, "
                         f"sin {tuple(sin.shape)} do not fit")
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    cos, sin = (c.contiguous().expand(b, t, d) for c in (cos, sin))  # same strides for both
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rotary_kernel[(b, t)](q, k, cos, sin, q_out, k_out, hq, hkv, d // 2, *q.stride()[:3], *k.stride()[:3],
                           *q_out.stride()[:3], *k_out.stride()[:3], cos.stride(0), cos.stride(1),
                           BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HKV=triton.next_power_of_2(hkv),
                           BLOCK_HALF=triton.next_power_of_2(d // 2))
    return q_out, k_out


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    if cos.dim() == 3:  # per sequence: broadcast over the heads
        cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
