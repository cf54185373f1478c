"""Weight-only post-training quantization: INT8 per channel, INT4 group-wise.

INT8 (`Int8Linear`)
    weight  int8 [N, K], symmetric, w ~= weight * scales[:, None]
    scales  fp32 [N]

INT4 (`Int4Linear`), the portable format (what a state_dict holds, and what a
GPU kernel such as the Triton `inference.runtime.kernels.quant_matmul` consumes):
    qweight  uint8 [N, K/2]: byte j of row n holds column 2j in its low nibble
             and column 2j+1 in its high nibble; codes are unsigned, 0..15
    scales   fp32  [N, K/g]
    zeros    fp32  [N, K/g]
    group_size g in (32, 64, 128); group k // g covers columns [k*g, (k+1)*g)
    w[n, k] = (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g]

This is the scale/zero convention of torch's `_weight_int4pack_mm_for_cpu`. On CPU
the module runs that op's own layout (non-persistent buffers, rebuilt after
`load_state_dict`): `_cpu_qweight` from `_convert_weight_to_int4pack_for_cpu`
(rows padded to a multiple of 16, the op's requirement) and `_cpu_scales_zeros`
[K/g, N, 2]. K must be divisible by g (no padding: a ValueError says so). Once that
layout is built the portable `qweight` is dropped (it would be a second copy of the
weights), and derived back from it, exactly, the first time something needs it: a
`state_dict`, `dequantize`, the portable matmul (Triton, or the reference where the
CPU op does not apply), or a move to another device; `scales` and `zeros` stay (the
CPU layout holds them only in the activation dtype).

GGUF: a Q4_1 block (32 weights, value = d*q + m) is group-32 with scale = d,
zero = m + 8*d; a Q4_0 block (value = d*(q - 8)) has scale = d, zero = 0. Both
map across without requantising (`q4_blocks_to_groups`, then `from_groups`).

Dtypes (torch 2.13 CPU, measured): both ops need scales in the activation's dtype
and are fast only for bf16 activations; fp32 (and fp16) activations are exact but
run a slow reference path (int4 ~15x slower than fp32 dense). Either run the model
in bf16 (`model.to(torch.bfloat16)` converts the float buffers), or give the
modules `compute_dtype=torch.bfloat16`: activations are then cast to bf16 for the
matmul and the product stays bf16 (an fp32 residual add promotes it back without an
extra op). All matmuls go through `int8_matmul` and `int4_matmul`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.runtime.kernels.quant_matmul import quant_matmul
from inference.runtime.precision import INT4_GROUP_SIZES

_CPU_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- INT8


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (weight [N, K] int8 * scales [N]).T -> [..., N] in x.dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x.device.type == "cpu" and x.dtype in _CPU_FAST_DTYPES:
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), weight, scales.to(x.dtype))
    else:  # Triton on CUDA, else (x2 @ weight.T) * scales
        y = quant_matmul(x2, weight, scales)
    return y.reshape(*lead, weight.shape[0])


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, device=None, compute_dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, compute_dtype=None) -> "Int8Linear":
        _check_linear(linear)
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        mod = cls(linear.in_features, linear.out_features, device=w.device, compute_dtype=compute_dtype)
        mod.weight.copy_(q)
        mod.scales.copy_(scales)
        return mod

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        return int8_matmul(x if cd is None else x.to(cd), self.weight, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# --------------------------------------------------------------------------- INT4


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> uint8 [N, K/2]: column 2j low nibble, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K]; inverse of `pack_int4`."""
    return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int4(qweight, scales, zeros, group_size: int, dtype=torch.float32) -> torch.Tensor:
    q = unpack_int4(qweight)
    n, k = q.shape
    w = (q.view(n, k // group_size, group_size).to(dtype) - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]
    return w.reshape(n, k)


def int4_matmul(x, qweight, scales, zeros, group_size: int, cpu_qweight=None, cpu_scales_zeros=None,
                n: int | None = None):
    """x [..., K] @ dequantize_int4(...).T -> [..., N] in x.dtype.

    On CPU, with the op's own layout given, runs `_weight_int4pack_mm_for_cpu` (then
    `qweight` may be None, with `n` the number of rows); elsewhere `quant_matmul`
    (Triton on CUDA, dequantise and multiply otherwise)."""
    n = qweight.shape[0] if qweight is not None else n
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if cpu_qweight is not None and x.device.type == "cpu" and x.dtype in _CPU_FAST_DTYPES:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.contiguous(), cpu_qweight, group_size, cpu_scales_zeros.to(x.dtype))
        if y.shape[-1] != n:  # rows were padded to a multiple of 16
            y = y[:, :n]
    else:  # Triton on CUDA, else x2 @ dequantize_int4(...).t()
        y = quant_matmul(x2, qweight, scales, zeros, group_size)
    return y.reshape(*lead, n)


def _check_group(k: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} not supported; use one of {INT4_GROUP_SIZES}")
    if k % group_size:
        raise ValueError(f"in_features={k} is not divisible by group_size={group_size}")


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int = 32, device=None,
                 compute_dtype=None):
        super().__init__()
        _check_group(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = compute_dtype
        n, k, ng = out_features, in_features, in_features // group_size
        self.register_buffer("qweight", torch.full((n, k // 2), 0x88, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(n, ng, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(n, ng, dtype=torch.float32, device=device))
        self.register_buffer("_cpu_qweight", None, persistent=False)
        self.register_buffer("_cpu_scales_zeros", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda mod, _keys: mod.repack())

    @property
    def qweight(self) -> torch.Tensor:
        """The portable packed codes, derived from the CPU layout if they were dropped."""
        buffers = self.__dict__["_buffers"]
        if "qweight" not in buffers:  # while __init__ registers it
            raise AttributeError("qweight")
        if buffers["qweight"] is None:
            buffers["qweight"] = self.portable_qweight()
        return buffers["qweight"]

    @torch.no_grad()
    def repack(self) -> None:
        """(Re)build the CPU op's layout from the portable buffers, then drop the
        portable codes (see the module docstring)."""
        if self.qweight.device.type != "cpu":
            self._cpu_qweight = self._cpu_scales_zeros = None
            return
        n = self.out_features
        pad = -n % 16
        q = unpack_int4(self.qweight).to(torch.int32)
        scales, zeros = self.scales, self.zeros
        if pad:  # pad rows with zero weights: code 8, scale 0, zero 0
            q = torch.cat([q, q.new_full((pad, q.shape[1]), 8)])
            scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
        self._cpu_qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([scales.t(), zeros.t()], dim=-1)
        self._cpu_scales_zeros = sz.to(self.compute_dtype or sz.dtype).contiguous()
        self._buffers["qweight"] = None

    @torch.no_grad()
    def portable_qweight(self, rows: int = 256) -> torch.Tensor:
        """`qweight` read back out of the CPU layout: the op run on rows of the identity
        with scale 1 and zero 8 gives each code itself (small integers, exact in bf16)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        packed = self._buffers["_cpu_qweight"]
        sz = torch.ones(k // g, n + (-n % 16), 2, dtype=torch.bfloat16)
        sz[..., 1] = 8
        q = torch.empty(n, k, dtype=torch.uint8)
        for i in range(0, k, rows):
            eye = torch.zeros(min(rows, k - i), k, dtype=torch.bfloat16)
            eye[:, i:i + len(eye)].fill_diagonal_(1)
            q[:, i:i + len(eye)] = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, g, sz)[:, :n].t()
        return pack_int4(q)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.qweight  # noqa: B018 -- the portable codes are what a state_dict holds
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._cpu_qweight is not None:
            self._buffers["qweight"] = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._buffers["qweight"] is None:  # a place to load into; repack drops it again
            self._buffers["qweight"] = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        if self._buffers["qweight"] is None and fn(torch.empty(0)).device.type != "cpu":
            self.qweight  # noqa: B018 -- off the CPU only the portable form runs
            self._cpu_qweight = self._cpu_scales_zeros = None
        return super()._apply(fn, recurse)

    @classmethod
    @torch.no_grad()
    def from_groups(cls, q, scale, zero, group_size: int = 32, compute_dtype=None) -> "Int4Linear":
        """From already-quantised codes q [N, K] (0..15), scale and zero [N, K/g]."""
        q, scale, zero = (torch.as_tensor(t) for t in (q, scale, zero))
        n, k = q.shape
        _check_group(k, group_size)
        if scale.shape != (n, k // group_size) or zero.shape != scale.shape:
            raise ValueError(f"scale/zero must be [{n}, {k // group_size}], got "
                             f"{tuple(scale.shape)} and {tuple(zero.shape)}")
        if int(q.min()) < 0 or int(q.max()) > 15:
            raise ValueError("int4 codes must be in 0..15")
        mod = cls(k, n, group_size, device=q.device, compute_dtype=compute_dtype)
        mod.qweight.copy_(pack_int4(q))
        mod.scales.copy_(scale)
        mod.zeros.copy_(zero)
        mod.repack()
        return mod

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, group_size: int = 32, compute_dtype=None) -> "Int4Linear":
        """Asymmetric min/max quantisation per group of `group_size` columns."""
        _check_linear(linear)
        w = linear.weight.detach().float()
        n, k = w.shape
        _check_group(k, group_size)
        g = w.reshape(n, k // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
        return cls.from_groups(q.reshape(n, k), scale, lo + 8 * scale, group_size, compute_dtype)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        x = x if cd is None else x.to(cd)
        sz = self._cpu_scales_zeros
        if (sz is not None and x.dtype == sz.dtype and x.dtype in _CPU_FAST_DTYPES and x.is_contiguous()
                and not self.out_features % 16):
            # the common CPU case, without int4_matmul's checks (~15 us a call, 120 calls a token)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.view(-1, self.in_features), self._cpu_qweight,
                                                           self.group_size, sz)
            return y.view(*x.shape[:-1], self.out_features)
        if sz is not None and x.device.type == "cpu" and x.dtype in _CPU_FAST_DTYPES:
            return int4_matmul(x, None, self.scales, self.zeros, self.group_size, self._cpu_qweight, sz,
                               n=self.out_features)
        return int4_matmul(x, self.qweight, self.scales, self.zeros, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# --------------------------------------------------------------------------- fp16


class CastLinear(nn.Module):
    """A bias-free linear whose weights and product are in `dtype` (the lm_head of a
    quantised model: bf16 is 3x faster than fp32 at batch 1 and 4x at batch 16 on
    this CPU, where fp16 is fast only at batch 1)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(dtype))

    @classmethod
    def from_float(cls, linear: nn.Linear, dtype: torch.dtype) -> "CastLinear":
        _check_linear(linear)
        return cls(linear.weight, dtype)

    def pack(self) -> None:
        """Reorder the weight once into oneDNN's blocked layout (CPU, bf16), which
        F.linear would otherwise do on every call, with a weight-sized temporary: the
        demo's lm_head goes from 2.0 to 1.35 ms a token, same logits."""
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.bfloat16 \
                and torch.backends.mkldnn.is_available():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


# --------------------------------------------------------------------------- embedding


class Int8GroupEmbedding(nn.Module):
    """An embedding table kept as int8 codes [V, D] with one fp32 scale per group of 32
    values [V, D/32]: GGUF's Q8_0 blocks, whose rows it returns exactly in fp32, in a
    quarter of the memory of an fp32 table."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.codes[tokens].view(*tokens.shape, -1, 32).float() * self.scales[tokens][..., None]
        return rows.flatten(-2)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: int = 4096) -> torch.Tensor:
        """The whole table in `dtype`, made a block of rows at a time."""
        out = torch.empty(self.codes.shape, dtype=dtype)
        for i in range(0, len(out), rows):
            out[i:i + rows] = self(torch.arange(i, min(i + rows, len(out))))
        return out


# --------------------------------------------------------------------------- GGUF


def q8_blocks_to_groups(raw: np.ndarray):
    """GGUF Q8_0 rows (uint8 [rows, bytes_per_row]; blocks of an f16 scale d and 32 int8
    codes, value = d*q) -> (q int8 [N, K], d fp32 [N, K/32])."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows, nbytes = raw.shape
    if nbytes % 34:
        raise ValueError(f"{nbytes} bytes per row is not a whole number of Q8_0 blocks")
    blocks = raw.reshape(rows, nbytes // 34, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)
    return torch.from_numpy(q), torch.from_numpy(d)



def q4_blocks_to_groups(raw: np.ndarray, kind: str):
    """GGUF Q4_0 / Q4_1 rows (`GGUFReader` tensor.data, uint8 [rows, bytes_per_row])
    -> (q uint8 [N, K] codes 0..15, scale fp32 [N, K/32], zero fp32 [N, K/32]).

    Block layout (ggml): Q4_0 = f16 d, 16 bytes; Q4_1 = f16 d, f16 m, 16 bytes.
    Byte i holds element i in its low nibble and element i + 16 in its high nibble.
    """
    if kind not in ("Q4_0", "Q4_1"):
        raise ValueError(f"kind={kind!r} not supported; use 'Q4_0' or 'Q4_1'")
    head = 2 if kind == "Q4_0" else 4
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows, nbytes = raw.shape
    if nbytes % (head + 16):
        raise ValueError(f"{nbytes} bytes per row is not a whole number of {kind} blocks")
    blocks = raw.reshape(rows, nbytes // (head + 16), head + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., head:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)
    if kind == "Q4_0":
        zero = np.zeros_like(d)
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d  # exact in fp32 for f16 inputs of similar magnitude
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero)


# --------------------------------------------------------------------------- model


def _check_linear(linear: nn.Linear) -> None:
    if linear.bias is not None:
        raise ValueError("quantized linears are bias-free; got a Linear with a bias")


def quantize_model(model: nn.Module, mode: str = "none", group_size: int = 32, skip=(),
                   compute_dtype=None) -> nn.Module:
    """Replace every nn.Linear in `model` (in place) by Int8Linear or Int4Linear.

    `skip`: names to leave in float; a name matches a module's qualified name
    ("layers.0.mlp.down_proj") or its last component ("lm_head").
    `compute_dtype`: see the module docstring (torch.bfloat16 for speed on CPU)."""
    if mode not in ("none", "int8", "int4"):
        raise ValueError(f"mode={mode!r} not supported; use 'none', 'int8' or 'int4'")
    if mode == "none":
        return model
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} not supported; use one of {INT4_GROUP_SIZES}")
    targets = [(f"{pn}.{name}" if pn else name, parent, name, child)
               for pn, parent in model.named_modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear) and not (name in skip or (f"{pn}.{name}" if pn else name) in skip)]
    for full, _, _, child in targets:  # check everything before changing anything
        if mode == "int4" and child.in_features % group_size:
            raise ValueError(f"{full}: in_features={child.in_features} is not divisible by group_size={group_size}")
    for _, parent, name, child in targets:
        new = (Int8Linear.from_float(child, compute_dtype) if mode == "int8"
               else Int4Linear.from_float(child, group_size, compute_dtype))
        setattr(parent, name, new)
    return model
