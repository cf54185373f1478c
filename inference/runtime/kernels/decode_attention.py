"""Attention of one new query token per sequence over its KV cache (flash-decoding).

The keys of each sequence are cut into splits; one program per (sequence, KV head,
split) runs an online softmax over its split for all the query heads that share that
KV head (grouped-query attention), and leaves the running max m, the sum l and the
unnormalised output. A second kernel folds the splits of each query head together.
Splits past a sequence's length do nothing: no host sync on the lengths is needed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from inference.runtime.kernels.dispatch import dot_options, num_sms, tl, triton, use_triton


@triton.jit
def _decode_attention_split_kernel(q_ptr, k_ptr, v_ptr, lengths_ptr, slots_ptr, m_ptr, l_ptr, acc_ptr,
                                   scale, Hq, D, GROUP, SPLIT_LEN, NUM_SPLITS, stride_qb, stride_qh,
                                   stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                   DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + b)
    length = tl.load(lengths_ptr + b)

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g  # the query heads that read this KV head
    d = tl.arange(0, BLOCK_D)
    qd_mask = (g[:, None] < GROUP) & (d[None, :] < D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=qd_mask, other=0.0)
    dtype = q.dtype  # the reference attends in q's dtype
    k_ptr += slot * stride_kb + kv_head * stride_kh
    v_ptr += slot * stride_vb + kv_head * stride_vh

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, length)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nd_mask = (n[:, None] < end) & (d[None, :] < D)
        k = tl.load(k_ptr + n[:, None] * stride_ks + d[None, :], mask=nd_mask, other=0.0).to(dtype)
        v = tl.load(v_ptr + n[:, None] * stride_vs + d[None, :], mask=nd_mask, other=0.0).to(dtype)
        s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
        s = tl.where(n[None, :] < end, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        p = p.to(dtype).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(DOT_DTYPE), input_precision=PRECISION)
        m = m_new

    part = (b * Hq + heads) * NUM_SPLITS + split
    tl.store(m_ptr + part, m, mask=g < GROUP)
    tl.store(l_ptr + part, l, mask=g < GROUP)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=qd_mask)


@triton.jit
def _decode_attention_reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, Hq, D, NUM_SPLITS, stride_ob, stride_oh,
                                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    part = (b * Hq + head) * NUM_SPLITS + s
    m = tl.load(m_ptr + part, mask=s < NUM_SPLITS, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=s < NUM_SPLITS, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=(s[:, None] < NUM_SPLITS) & (d[None, :] < D),
                  other=0.0)
    weight = tl.where(m > float("-inf"), tl.exp(m - tl.max(m, axis=0)), 0.0)  # empty splits weigh nothing
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     slots: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D]; k_cache, v_cache [B, Hkv, S, D], or a pool of cache rows with `slots`
    [B] naming the row of each sequence; lengths [B] (int). Sequence b attends to its
    first lengths[b] keys, scale 1/sqrt(D). Returns [B, Hq, D] in q's dtype.
    Lengths outside 1..S raise ValueError when `lengths` is on the CPU (on a GPU the
    check would wait for it); on a GPU a length of 0 gives NaN."""
    _check(q, k_cache, v_cache, lengths, slots)
    if not use_triton(q):
        return decode_attention_reference(q, k_cache, v_cache, lengths, slots)
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    if slots is None:
        slots = torch.arange(b, device=q.device)
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    block_n, block_d = 64, triton.next_power_of_2(d)
    splits = max(1, min(triton.cdiv(s, block_n), triton.cdiv(2 * num_sms(q.device), b * hkv)))
    split_len = triton.cdiv(triton.cdiv(s, splits), block_n) * block_n
    splits = triton.cdiv(s, split_len)
    m, l = torch.empty(2, b, hq, splits, dtype=torch.float32, device=q.device)
    acc = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    _decode_attention_split_kernel[(b, hkv, splits)](
        q, k_cache, v_cache, lengths, slots, m, l, acc, 1.0 / math.sqrt(d), hq, d, hq // hkv, split_len, splits,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)), BLOCK_N=block_n, BLOCK_D=block_d,
        **dot_options(q.dtype))
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    _decode_attention_reduce_kernel[(b, hq)](m, l, acc, out, hq, d, splits, out.stride(0), out.stride(1),
                                             BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d)
    return out


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               lengths: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
    if slots is not None:
        k_cache, v_cache = k_cache[slots], v_cache[slots]
    mask = torch.arange(k_cache.shape[2], device=q.device) < lengths[:, None]  # [B, S]
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache.to(q.dtype), v_cache.to(q.dtype),
                                         attn_mask=mask[:, None, None], enable_gqa=True)
    return out[:, :, 0]


def _check(q, k_cache, v_cache, lengths, slots) -> None:
    b, hq, d = q.shape
    rows, hkv, s, _ = k_cache.shape
    if (v_cache.shape != k_cache.shape or k_cache.shape[-1] != d or hq % hkv
            or lengths.shape != (b,) or (slots is None and rows != b) or (slots is not None and slots.shape != (b,))):
        raise ValueError(f"decode_attention: shapes q {tuple(q.shape)}, caches {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}, lengths {tuple(lengths.shape)}"
                         f"{'' if slots is None else f', slots {tuple(slots.shape)}'} do not fit")
    if lengths.device.type == "cpu" and b and not bool(((lengths >= 1) & (lengths <= s)).all()):
        raise ValueError(f"decode_attention: every length must be in 1..{s} (the cache's length), "
                         f"got {lengths.tolist()}")
