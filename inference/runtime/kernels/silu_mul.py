"""SiLU-and-multiply, the gated MLP's activation: silu(gate) * up, in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.runtime.kernels.dispatch import tl, triton, use_triton


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, I, stride_gate, stride_up, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., I] (row-strided views such as the halves of one projection are
    fine) -> silu(gate) * up [..., I] in gate's dtype."""
    if not use_triton(gate):
        return silu_mul_reference(gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    i = gate.shape[-1]
    g2, u2 = gate.reshape(-1, i), up.reshape(-1, i)
    g2, u2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (g2, u2))
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    block = min(triton.next_power_of_2(i), 1024)
    grid = (g2.shape[0], triton.cdiv(i, block))
    _silu_mul_kernel[grid](g2, u2, out, i, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=block)
    return out.view(gate.shape)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
