"""Load a Llama-family decoder from a GGUF file or a Hugging Face folder.

Both sources become the same `Checkpoint`: a `ModelConfig`, float32 tensors named
after the modules of `inference.model.Llama`, the tokenizer of the same source, and,
for GGUF tensors stored as Q4_0/Q4_1 blocks, their integer codes, so that INT4
serving can take them over exactly instead of requantising.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.model import Llama, ModelConfig, rope_inv_freq
from inference.quantize import CastLinear, Int4Linear, q4_blocks_to_groups, quantize_model
from inference.tokenizer import Tokenizer

QUANTIZE_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)

# Per layer: the fused module of inference.model and the source tensors it concatenates.
FUSED = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
}
HF_LAYER_NAMES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
}
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class Checkpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    source: str
    # model parameter name -> float32 tensor; layer projections still unfused here
    tensors: dict[str, torch.Tensor]
    # same names -> (codes uint8 [N, K], scale [N, K/32], zero [N, K/32]) for Q4 blocks
    q4_groups: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # the source's own storage type per tensor ("F32", "Q4_1", "bf16", ...)
    storage: dict[str, str] = field(default_factory=dict)


def load_checkpoint(source: str | Path) -> Checkpoint:
    path = Path(source)
    if path.is_dir():
        return load_hf_folder(path)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path)
    if not path.exists():
        raise FileNotFoundError(f"model: {source} does not exist")
    raise ValueError(f"model: {source} is neither a .gguf file nor a Hugging Face folder")


def load_hf_folder(folder: Path) -> Checkpoint:
    from safetensors.torch import load_file

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model: {folder} has no config.json")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: {folder} has no *.safetensors files")
    tensors, storage = {}, {}
    for f in files:
        for name, t in load_file(f).items():
            name = name.removeprefix("model.")
            tensors[name] = t.float()
            storage[name] = str(t.dtype).removeprefix("torch.")
    return Checkpoint(config, Tokenizer.from_hf_folder(folder), str(folder), tensors, {}, storage)


def load_gguf(path: Path) -> Checkpoint:
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)
    meta = {name: f.contents() for name, f in reader.fields.items()
            if not name.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"model: {path.name}: general.architecture {arch!r} is not supported "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    config = gguf_config(meta, arch, reader)

    tensors, q4_groups, storage = {}, {}, {}
    for t in reader.tensors:
        name = gguf_tensor_name(t.name)
        kind = t.tensor_type.name
        values = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        codes = None
        if t.tensor_type in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
            codes = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in q4_blocks_to_groups(t.data, kind))
        # llama.cpp interleaves the rotary halves of Q and K for "llama"; undo it.
        if arch != "qwen2" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            values = unpermute_rotary(values, heads)
            if codes is not None:
                codes = tuple(unpermute_rotary(c, heads) for c in codes)
        tensors[name] = values
        storage[name] = kind
        if codes is not None:
            q4_groups[name] = codes
    return Checkpoint(config, Tokenizer.from_gguf(reader), str(path), tensors, q4_groups, storage)


def gguf_config(meta: dict, arch: str, reader) -> ModelConfig:
    def key(k, default=None):
        value = meta.get(f"{arch}.{k}", default)
        if value is None:
            raise ValueError(f"model: GGUF metadata lacks {arch}.{k}")
        return value

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        if "tokenizer.ggml.tokens" not in reader.fields:
            raise ValueError("model: GGUF metadata lacks tokenizer.ggml.tokens (the vocabulary)")
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
    )


def gguf_tensor_name(name: str) -> str:
    fixed = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if parts[0] != "blk" or len(parts) != 4 or parts[2] not in GGUF_LAYER_NAMES:
        raise ValueError(f"model: unexpected GGUF tensor {name!r}")
    return f"layers.{parts[1]}.{layer_module_name(GGUF_LAYER_NAMES[parts[2]])}.{parts[3]}"


def layer_module_name(short: str) -> str:
    return HF_LAYER_NAMES.get(short, short)


def unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def build_model(ckpt: Checkpoint, quantize: str = "none", group_size: int = 32,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    """The model of `ckpt`, its projections in the chosen weight-only precision."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize: {quantize!r} is not one of {', '.join(QUANTIZE_MODES)}")
    if quantize == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size: {group_size} is not one of {INT4_GROUP_SIZES}")
    cfg = ckpt.config
    if quantize == "int4":
        for name, k in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size)):
            if k % group_size:
                raise ValueError(f"group_size: {group_size} does not divide the model's {name} {k}")
    with torch.device("meta"):
        model = Llama(cfg)
    tensors = dict(ckpt.tensors)
    if cfg.tie_word_embeddings or "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    for i in range(cfg.num_layers):
        for fused, parts in FUSED.items():
            for suffix in ("weight", "bias"):
                names = [f"layers.{i}.{layer_module_name(p)}.{suffix}" for p in parts]
                if all(n in tensors for n in names):
                    tensors[f"layers.{i}.{fused}.{suffix}"] = torch.cat([tensors.pop(n) for n in names])
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"model: {ckpt.source}: missing tensors {missing}, unexpected {unexpected}")
    model.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
    if quantize != "none":
        quantize_projections(model, ckpt, quantize, group_size)
    return model.to(device).eval()


def quantize_projections(model: Llama, ckpt: Checkpoint, mode: str, group_size: int) -> None:
    """Weight-only quantisation of the layer projections; the lm_head goes to bf16.

    The quantised matmuls take and give bf16 activations (torch's CPU kernels for
    packed int4 and int8 weights are fast only in bf16); norms, rotary embeddings,
    attention and the residual stream stay fp32."""
    if mode == "int4" and group_size == 32:
        for i in range(ckpt.config.num_layers):
            for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                codes = exact_q4_codes(ckpt, f"layers.{i}", name)
                if codes is not None:
                    parent, _, child = f"layers.{i}.{name}".rpartition(".")
                    setattr(model.get_submodule(parent), child,
                            Int4Linear.from_groups(*codes, group_size=32, compute_dtype=torch.bfloat16))
    biased = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
    quantize_model(model, mode, group_size, skip=("lm_head", *biased), compute_dtype=torch.bfloat16)
    model.lm_head = CastLinear.from_float(model.lm_head, torch.bfloat16)


def exact_q4_codes(ckpt: Checkpoint, layer: str, module_name: str):
    """The source's Q4 codes for a (possibly fused) module, if every part has them."""
    parts = FUSED.get(module_name, (module_name.rsplit(".", 1)[1],))
    names = [f"{layer}.{layer_module_name(p)}.weight" for p in parts]
    if not all(n in ckpt.q4_groups for n in names):
        return None
    return tuple(torch.cat([ckpt.q4_groups[n][i] for n in names]) for i in range(3))
