"""Load a Llama-family decoder from a GGUF file or a Hugging Face folder.

Both sources become the same `Checkpoint`: a `ModelConfig`, float32 tensors named
after the modules of `inference.runtime.model.Llama`, the tokenizer of the same source, and,
for GGUF tensors stored as Q4_0/Q4_1 blocks, their integer codes, so that INT4
serving can take them over exactly instead of requantising. Tensors are read from the
memory-mapped file when asked for, and `build_model` builds and quantises one layer at
a time, so a quantised model is never held in fp32 whole.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.runtime.model import Llama, ModelConfig
from inference.runtime.precision import INT4_GROUP_SIZES, QUANTIZE_MODES
from inference.runtime.quantize import (CastLinear, Int4Linear, Int8GroupEmbedding, q4_blocks_to_groups,
                                q8_blocks_to_groups, quantize_model)
from inference.runtime.tokenizer import Tokenizer


# Per layer: the fused module of inference.runtime.model and the source tensors it concatenates.
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
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class LazyTensors(Mapping):
    """name -> value, each made by its function when asked for (and not kept)."""

    def __init__(self, makers: dict[str, Callable[[], object]]):
        self.makers = makers

    def __getitem__(self, name: str):
        return self.makers[name]()

    def __contains__(self, name) -> bool:  # without making the value
        return name in self.makers

    def __iter__(self):
        return iter(self.makers)

    def __len__(self) -> int:
        return len(self.makers)


@dataclass
class Checkpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    source: str
    # model parameter name -> float32 tensor; layer projections still unfused here
    tensors: Mapping[str, torch.Tensor]
    # same names -> (codes uint8 [N, K], scale [N, K/32], zero [N, K/32]) for Q4 blocks
    q4_groups: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # same names -> (codes int8 [N, K], scale [N, K/32]) for Q8_0 blocks
    q8_groups: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
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
    from safetensors import safe_open

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model: {folder} has no config.json")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: {folder} has no *.safetensors files")
    makers, storage = {}, {}
    for f in files:
        handle = safe_open(f, framework="pt")
        for key in handle.keys():
            name = key.removeprefix("model.")
            makers[name] = lambda handle=handle, key=key: handle.get_tensor(key).float()
            kind = handle.get_slice(key).get_dtype()
            storage[name] = SAFETENSORS_DTYPES.get(kind, kind.lower())
    return Checkpoint(config, Tokenizer.from_hf_folder(folder), str(folder), LazyTensors(makers), storage=storage)


def load_gguf(path: Path) -> Checkpoint:
    checkpoint = read_gguf(path)
    # the reader's parsed metadata (a Python object per vocabulary entry) is garbage now
    gc.collect()
    release_freed_memory()
    return checkpoint


@dataclass(frozen=True)
class GGUFTensor:
    """Where a tensor's bytes are in the file: all a checkpoint keeps of the reader."""
    kind: str          # GGML type name: F32, Q4_1, ...
    dtype: np.dtype    # of the stored array
    shape: tuple[int, ...]
    offset: int


def read_gguf(path: Path) -> Checkpoint:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = {name: f.contents() for name, f in reader.fields.items()
            if not name.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"model: {path.name}: general.architecture {arch!r} is not supported "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    config = gguf_config(meta, arch, reader)

    tensors, q4_groups, q8_groups, storage = {}, {}, {}, {}
    for rt in reader.tensors:
        name = gguf_tensor_name(rt.name)
        t = GGUFTensor(rt.tensor_type.name, rt.data.dtype, tuple(rt.data.shape), int(rt.data_offset))
        # llama.cpp interleaves the rotary halves of Q and K for "llama"; undo it.
        heads = None
        if arch != "qwen2" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
        tensors[name] = lambda t=t, heads=heads: unpermute_rotary(gguf_dequantized(path, t), heads)
        storage[name] = t.kind
        if t.kind in ("Q4_0", "Q4_1"):
            q4_groups[name] = lambda t=t, heads=heads: tuple(
                unpermute_rotary(c, heads) for c in q4_blocks_to_groups(gguf_raw(path, t), t.kind))
        if t.kind == "Q8_0":
            q8_groups[name] = lambda t=t, heads=heads: tuple(
                unpermute_rotary(c, heads) for c in q8_blocks_to_groups(gguf_raw(path, t)))
    return Checkpoint(config, Tokenizer.from_gguf(reader), str(path), LazyTensors(tensors),
                      LazyTensors(q4_groups), LazyTensors(q8_groups), storage)


def gguf_raw(path: Path, t: GGUFTensor) -> np.ndarray:
    """A tensor's stored bytes, read from the file rather than through the reader's
    memory map, whose pages would stay resident while the checkpoint lives."""
    return np.fromfile(path, dtype=t.dtype, count=math.prod(t.shape), offset=t.offset).reshape(t.shape)


def gguf_dequantized(path: Path, t: GGUFTensor, rows: int = 2048) -> torch.Tensor:
    """fp32 values of a GGUF tensor, dequantised a block of rows at a time (gguf's
    dequantiser holds several temporaries the size of its output)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = gguf_raw(path, t)
    kind = GGMLQuantizationType[t.kind]
    out = None
    for i in range(0, len(raw), rows):
        part = dequantize(raw[i:i + rows], kind)
        if out is None:
            out = torch.empty((len(raw), *part.shape[1:]), dtype=torch.float32)
        out[i:i + len(part)] = torch.from_numpy(np.asarray(part, dtype=np.float32))
    return out


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


def unpermute_rotary(w: torch.Tensor, heads: int | None) -> torch.Tensor:
    if heads is None:
        return w
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def build_model(ckpt: Checkpoint, quantize: str = "none", group_size: int = 32,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    """The model of `ckpt`, its projections in the chosen weight-only precision, built
    one layer at a time: a layer's float weights are gone once it is quantised.

    The quantised matmuls take and give bf16 activations (torch's CPU kernels for
    packed int4 and int8 weights are fast only in bf16); norms, rotary embeddings,
    attention and the residual stream stay fp32. The lm_head of a quantised model is
    bf16; its embedding table is kept in its GGUF Q8_0 codes when it has them (exact,
    a quarter of fp32)."""
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
    sources = source_names(model, ckpt)
    used = {n for names in sources.values() for n in names}
    missing = sorted(n for n in used if n not in ckpt.tensors)
    unexpected = sorted(set(ckpt.tensors) - used)
    if missing or unexpected:
        raise ValueError(f"model: {ckpt.source}: missing tensors {missing}, unexpected {unexpected}")

    load_floats(model.norm, "norm", ckpt, sources, dtype)
    tied = sources["lm_head.weight"] == ["embed_tokens.weight"]
    if quantize != "none" and "embed_tokens.weight" in ckpt.q8_groups:
        model.embed_tokens = Int8GroupEmbedding(*ckpt.q8_groups["embed_tokens.weight"])
        if tied:
            model.lm_head = CastLinear(model.embed_tokens.dequantize(torch.bfloat16), torch.bfloat16)
    else:
        load_floats(model.embed_tokens, "embed_tokens", ckpt, sources, dtype)
        if tied:
            model.lm_head.weight = model.embed_tokens.weight
    if not tied:
        load_floats(model.lm_head, "lm_head", ckpt, sources, dtype)
    if quantize != "none":
        if not isinstance(model.lm_head, CastLinear):
            model.lm_head = CastLinear.from_float(model.lm_head, torch.bfloat16)
        if torch.device(device).type == "cpu":
            model.lm_head.pack()
    for i, layer in enumerate(model.layers):
        if quantize == "int4" and group_size == 32:
            for name in PROJECTIONS:
                codes = exact_q4_codes(ckpt, f"layers.{i}", name)
                if codes is not None:
                    parent, _, child = name.rpartition(".")
                    setattr(layer.get_submodule(parent), child,
                            Int4Linear.from_groups(*codes, group_size=32, compute_dtype=torch.bfloat16))
        load_floats(layer, f"layers.{i}", ckpt, sources, dtype)
        if quantize != "none":
            biased = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
            quantize_model(layer, quantize, group_size, skip=biased, compute_dtype=torch.bfloat16)
        release_freed_memory()
    return model.to(device).eval()


def source_names(model: Llama, ckpt: Checkpoint) -> dict[str, list[str]]:
    """Each tensor of `model` -> the checkpoint tensors it is made of (concatenated)."""
    sources = {}
    for key in model.state_dict():
        module, _, suffix = key.rpartition(".")
        names = [key]
        for fused, parts in FUSED.items():
            if module.endswith(fused):
                layer = module.removesuffix(fused)
                names = [f"{layer}{layer_module_name(p)}.{suffix}" for p in parts]
        if key == "lm_head.weight" and (ckpt.config.tie_word_embeddings or key not in ckpt.tensors):
            names = ["embed_tokens.weight"]
        sources[key] = names
    return sources


def load_floats(module: nn.Module, prefix: str, ckpt: Checkpoint, sources: dict[str, list[str]],
                dtype: torch.dtype) -> None:
    """Give every parameter of `module` still on the meta device its checkpoint values."""
    for path, leaf in module.named_modules():
        for name, param in list(leaf.named_parameters(recurse=False)):
            if param.is_meta:
                names = sources[".".join(p for p in (prefix, path, name) if p)]
                value = torch.cat([ckpt.tensors[n] for n in names]) if len(names) > 1 else ckpt.tensors[names[0]]
                setattr(leaf, name, nn.Parameter(value.to(dtype), requires_grad=False))


def exact_q4_codes(ckpt: Checkpoint, layer: str, module_name: str):
    """The source's Q4 codes for a (possibly fused) module, if every part has them."""
    parts = FUSED.get(module_name, (module_name.rsplit(".", 1)[1],))
    names = [f"{layer}.{layer_module_name(p)}.weight" for p in parts]
    if not all(n in ckpt.q4_groups for n in names):
        return None
    groups = [ckpt.q4_groups[n] for n in names]
    return tuple(torch.cat([g[i] for g in groups]) for i in range(3))


def release_freed_memory() -> None:
    """Hand the pages that loading freed back to the OS: glibc keeps freed heap memory
    mapped, and a load frees several times the size of the model it builds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
