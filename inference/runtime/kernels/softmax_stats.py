"""Softmax of `logits / temperature` with its confidence statistics, fused.

One program per row. The first sweep keeps, per lane, a running max m, the sum
l = sum(exp(x - m)) and s = sum(exp(x - m) * x), rescaled whenever m grows (online
softmax). Folding the lanes gives the row's max `top` and total = sum(exp(x - top)),
hence lse = top + log(total), the top-1 probability exp(0) / total and the entropy
H = lse - sum(p * x). The second sweep writes the probabilities.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from inference.runtime.kernels.dispatch import tl, triton, use_triton


class SoftmaxStats(NamedTuple):
    probs: torch.Tensor     # [N, V], fp32
    max_prob: torch.Tensor  # [N]
    entropy: torch.Tensor   # [N], nats
    lse: torch.Tensor       # [N], log-sum-exp of logits / temperature


@triton.jit
def _softmax_stats_kernel(logits_ptr, temp_ptr, probs_ptr, max_prob_ptr, entropy_ptr, lse_ptr,
                          V, stride_logits, stride_temp, stride_probs, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    logits_ptr += row * stride_logits
    probs_ptr += row * stride_probs
    t = tl.load(temp_ptr + row * stride_temp)
    cols = tl.arange(0, BLOCK)

    m = tl.full([BLOCK], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK], tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(logits_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) / t
        m_old = m
        m = tl.maximum(m, x)
        shift = tl.where(m > float("-inf"), m, 0.0)  # lanes that saw only -inf: exp(-inf) = 0, no NaN
        alpha = tl.exp(m_old - shift)
        e = tl.exp(x - shift)
        l = l * alpha + e
        s = s * alpha + e * tl.where(x > float("-inf"), x, 0.0)

    top = tl.max(m, axis=0)
    lane_scale = tl.exp(m - top)
    total = tl.sum(l * lane_scale, axis=0)
    lse = top + tl.log(total)
    tl.store(max_prob_ptr + row, 1.0 / total)
    tl.store(entropy_ptr + row, lse - tl.sum(s * lane_scale, axis=0) / total)
    tl.store(lse_ptr + row, lse)

    for start in range(0, V, BLOCK):
        x = tl.load(logits_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) / t
        tl.store(probs_ptr + start + cols, tl.exp(x - top) / total, mask=start + cols < V)


def fused_softmax_stats(logits: torch.Tensor, temperature: torch.Tensor | float) -> SoftmaxStats:
    """Softmax of `logits / temperature` [N, V] with its max, entropy and log-sum-exp.
    `temperature`: a number, or a tensor [N] (one per row)."""
    if not use_triton(logits):
        return softmax_stats_reference(logits, temperature)
    _check(logits)
    n, v = logits.shape
    if n == 0:
        return softmax_stats_reference(logits, temperature)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(n)
    probs = torch.empty(n, v, dtype=torch.float32, device=logits.device)
    max_prob, entropy, lse = torch.empty(3, n, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(v), 4096)
    _softmax_stats_kernel[(n,)](logits, t, probs, max_prob, entropy, lse, v, logits.stride(0), t.stride(0),
                                probs.stride(0), BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return SoftmaxStats(probs, max_prob, entropy, lse)


def softmax_stats_reference(logits: torch.Tensor, temperature: torch.Tensor | float) -> SoftmaxStats:
    _check(logits)
    t = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device)
    scaled = logits.float() / (t[:, None] if t.dim() == 1 else t)
    top = scaled.amax(-1, keepdim=True)
    probs = (scaled - top).exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    lse = (top + total.log()).squeeze(-1)
    # H = lse - sum(p * x); nansum drops the 0 * -inf of masked logits
    entropy = lse - (probs * scaled).nansum(-1)
    return SoftmaxStats(probs, total.squeeze(-1).reciprocal(), entropy, lse)


def _check(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[-1] == 0:
        raise ValueError(f"softmax_stats: logits must be [N, V] with V > 0, got {tuple(logits.shape)}")
