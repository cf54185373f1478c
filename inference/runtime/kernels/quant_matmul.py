"""Weight-only quantised matmul, x @ w.T, with the weight dequantised on the fly.

The formats are the quantizer's (inference/runtime/quantize.py):
  INT8  qweight int8 [N, K], scales [N]: w = q * scale; the scale multiplies the result.
  INT4  qweight uint8 [N, K/2], byte j of a row holding column 2j in its low nibble and
        2j+1 in its high nibble; scales and zeros [N, K/g]; w = (q - 8) * scale + zero.
        One step of the K loop covers one group: the even columns of x meet the low
        nibbles, the odd columns the high ones, so nothing is interleaved.

Programs tile M x N; when that gives too few programs to fill the GPU (decode batches of
a few rows), K is split too and the fp32 partial products are summed afterwards.
"""

from __future__ import annotations

import torch

from inference.runtime.kernels.dispatch import dot_options, num_sms, tl, triton, use_triton


@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, scales_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_os, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(split * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k_mask = k0 + rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + rk[None, :], mask=(rm[:, None] < M) & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + k0 + rk[None, :], mask=(rn[:, None] < N) & k_mask[None, :],
                    other=0)
        w = w.to(tl.float32).to(x.dtype)  # via fp32: the interpreter casts int8 to bf16 bit-wise
        acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=PRECISION)
    acc *= tl.load(scales_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _int4_matmul_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, NUM_GROUPS,
                        stride_xm, stride_qn, stride_sn, stride_os, stride_om, GROUP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    j = tl.arange(0, GROUP // 2)
    m_mask, n_mask = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for group in range(split, NUM_GROUPS, SPLIT_K):
        x = x_ptr + rm[:, None] * stride_xm + group * GROUP + 2 * j[None, :]
        x_even = tl.load(x, mask=m_mask[:, None], other=0.0)
        x_odd = tl.load(x + 1, mask=m_mask[:, None], other=0.0)
        packed = tl.load(qweight_ptr + rn[:, None] * stride_qn + group * (GROUP // 2) + j[None, :],
                         mask=n_mask[:, None], other=0)
        scale = tl.load(scales_ptr + rn * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(zeros_ptr + rn * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        w_even = (((packed & 0x0F).to(tl.float32) - 8) * scale + zero).to(x_even.dtype).to(DOT_DTYPE)
        w_odd = (((packed >> 4).to(tl.float32) - 8) * scale + zero).to(x_even.dtype).to(DOT_DTYPE)
        acc += tl.dot(x_even.to(DOT_DTYPE), tl.trans(w_even), input_precision=PRECISION)
        acc += tl.dot(x_odd.to(DOT_DTYPE), tl.trans(w_odd), input_precision=PRECISION)
    out = out_ptr + split * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 group_size: int | None = None) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] in x.dtype, w given as INT8 (qweight int8 [N, K],
    scales [N]) or INT4 (qweight uint8 [N, K/2], scales and zeros [N, K/group_size])."""
    if not use_triton(x):
        return quant_matmul_reference(x, qweight, scales, zeros, group_size)
    int4 = _check(x, qweight, scales, zeros, group_size)
    lead, k = x.shape[:-1], x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    block_m, block_n, block_k = max(16, min(triton.next_power_of_2(m), 64)), 64, group_size if int4 else 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split_k = max(1, min(triton.cdiv(steps, 4), 2 * num_sms(x.device) // tiles))
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    stride_os = out.stride(0) if split_k > 1 else 0
    qweight, scales = qweight.contiguous(), scales.contiguous()
    if int4:
        zeros = zeros.contiguous()
        _int4_matmul_kernel[grid](x2, qweight, scales, zeros, out, m, n, k // group_size, x2.stride(0),
                                  qweight.stride(0), scales.stride(0), stride_os, out.stride(-2), GROUP=group_size,
                                  BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k, **dot_options(x.dtype))
    else:
        _int8_matmul_kernel[grid](x2, qweight, scales, out, m, n, k, x2.stride(0), qweight.stride(0), stride_os,
                                  out.stride(-2), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                  SPLIT_K=split_k, **dot_options(x.dtype))
    if split_k > 1:
        out = out.sum(0).to(x.dtype)
    return out.view(*lead, n)


def quant_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if qweight.dtype == torch.int8:  # scaling the output is the same as scaling the rows of w
        y = (x2 @ qweight.to(x.dtype).t()) * scales.to(x.dtype)
    else:
        q = torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(n, k)
        w = ((q.view(n, k // group_size, group_size).to(x.dtype) - 8) * scales.to(x.dtype)[..., None]
             + zeros.to(x.dtype)[..., None])
        y = x2 @ w.reshape(n, k).t()
    return y.reshape(*lead, n)


def _check(x, qweight, scales, zeros, group_size) -> bool:
    """Raise ValueError unless the arguments are one of the two formats; True for INT4."""
    k, n = x.shape[-1], qweight.shape[0]
    if qweight.dtype == torch.int8:
        if qweight.shape != (n, k) or scales.shape != (n,):
            raise ValueError(f"quant_matmul: INT8 needs qweight [N, {k}] and scales [N], got "
                             f"{tuple(qweight.shape)} and {tuple(scales.shape)}")
        return False
    if qweight.dtype != torch.uint8:
        raise ValueError(f"quant_matmul: qweight must be int8 (INT8) or uint8 (packed INT4), not {qweight.dtype}")
    if zeros is None or group_size is None or group_size < 32 or group_size & (group_size - 1) or k % group_size:
        raise ValueError(f"quant_matmul: INT4 needs zeros and a group_size, a power of two >= 32 that divides "
                         f"K={k}; got group_size={group_size}")
    if qweight.shape != (n, k // 2) or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"quant_matmul: INT4 needs qweight [N, {k // 2}], scales and zeros [N, {k // group_size}], "
                         f"got {tuple(qweight.shape)}, {tuple(scales.shape)}, {tuple(zeros.shape)}")
    return True
