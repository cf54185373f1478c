"""A Llama-family decoder in plain PyTorch, with a slot-based KV cache.

One module covers the SmolLM2, Llama, Mistral and Qwen2 layouts: RMSNorm, rotary
embeddings (Hugging Face's rotate-half convention), grouped-query attention and a
SiLU-gated MLP. The q/k/v and gate/up projections are fused into one matmul each,
which halves the number of small ops per decode step.

Every forward call names, per row, the KV-cache slot it owns and the absolute
position of each token, so the same code runs a prompt's prefill and a decode step
over a batch of sequences of different lengths.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from inference.runtime import kernels
from inference.runtime.kernels import dispatch


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        supported = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
        if archs and not supported.intersection(archs):
            raise ValueError(f"config.json: architectures {archs} is not a Llama-family decoder "
                             f"(supported: {sorted(supported)})")
        heads = cfg["num_attention_heads"]
        # transformers 5 writes rope_theta and the scaling inside "rope_parameters"
        rope = dict(cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", "Qwen2ForCausalLM" in archs)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        )


class KVCache:
    """A bounded pool of KV slots: `slots` sequences of up to `max_seq_len` tokens each.

    On CPU the pool is an anonymous memory map: its pages are zeros that the kernel maps
    in on first write, and `forget` hands a finished sequence's pages back, so the pool
    costs memory in proportion to the tokens held, not to its size."""

    def __init__(self, cfg: ModelConfig, slots: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (cfg.num_layers, slots, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        self.maps: list[mmap.mmap] = []
        if torch.device(device).type == "cpu":
            self.maps = [mmap.mmap(-1, math.prod(shape) * dtype.itemsize) for _ in "kv"]
            self.k, self.v = (torch.frombuffer(m, dtype=dtype).view(shape) for m in self.maps)
        else:
            self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")
        self.slots = slots
        self.max_seq_len = max_seq_len

    def forget(self, slot: int, tokens: int) -> None:
        """Return the memory of a slot's first `tokens` positions to the OS (they read
        as zeros again); the next sequence in the slot writes before it reads."""
        if not self.maps or tokens <= 0:
            return
        layers, _, heads, seq, dim = self.k.shape
        row = seq * dim * self.k.itemsize  # one head's positions in one layer
        length = min(row, -(-tokens * dim * self.k.itemsize // mmap.PAGESIZE) * mmap.PAGESIZE)
        if row % mmap.PAGESIZE:
            return  # rows not page-aligned: keep the pages
        for m in self.maps:
            for layer in range(layers):
                start = ((layer * self.slots + slot) * heads) * row
                for head in range(heads):
                    m.madvise(mmap.MADV_REMOVE, start + head * row, length)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    # on the CPU even under torch.device("meta"), where arange would import torch._dynamo
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.active:
            return kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_out + 2 * kv_out, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_out, cfg.hidden_size, bias=False)
        self.split = (q_out + kv_out, kv_out)

    def forward(self, x, cos, sin, cache: KVCache, slots, kv_rows, positions, mask):
        b, t, _ = x.shape
        qk, v = self.qkv_proj(x).split(self.split, dim=-1)
        qk = qk.view(b, t, self.n_heads + self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim)
        if dispatch.active:
            q, k = kernels.apply_rotary(qk[:, :self.n_heads], qk[:, self.n_heads:], cos[:, 0], sin[:, 0])
        else:
            qk = qk * cos + rotate_half(qk) * sin  # the q and k heads in one go
            q, k = qk[:, :self.n_heads], qk[:, self.n_heads:]

        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
        rows = slots[:, None]
        k_cache[rows, :, positions] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[rows, :, positions] = v.to(v_cache.dtype)
        span = mask.shape[-1]
        if dispatch.active and t == 1:  # decode: read the cache rows in place
            out = kernels.decode_attention(q[:, :, 0], k_cache[:, :, :span], v_cache[:, :, :span],
                                           positions[:, 0] + 1, slots)[:, :, None]
        else:
            keys, values = k_cache[kv_rows, :, :span], v_cache[kv_rows, :, :span]
            out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype),
                                                 attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def slot_rows(slots: torch.Tensor) -> slice | torch.Tensor:
    """The index of the slots' cache rows: a slice (so the cache is read as a view, not
    gathered) when the slots are one contiguous run, else the slots themselves."""
    first = int(slots[0])
    if torch.equal(slots, torch.arange(first, first + len(slots), device=slots.device)):
        return slice(first, first + len(slots))
    return slots


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(kernels.silu_mul(gate, up) if dispatch.active else F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, slots, kv_rows, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, slots, kv_rows, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # no random init: the weights come from a checkpoint, and normal_ on the meta
        # device that loading builds on would import torch._dynamo (150 MB of RSS)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """tokens, positions: [B, T] (int64); slots: [B]. Returns logits [B, T, V] (fp32),
        or [B, 1, V] for the last position of each row when `last_only`."""
        span = int(positions.max()) + 1
        if span > cache.max_seq_len:
            raise ValueError(f"position {span - 1} is past the KV cache's {cache.max_seq_len} tokens")
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        key_pos = torch.arange(span, device=tokens.device)
        mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]
        kv_rows = slot_rows(slots)

        x = self.embed_tokens(tokens)
        dtype = self.norm.weight.dtype
        x, cos, sin = x.to(dtype), cos.to(dtype), sin.to(dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, slots, kv_rows, positions, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()
