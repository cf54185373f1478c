"""Models made for tests: a tiny random Llama with its own tokenizer, random Llama,
Mistral and Qwen2 layouts at sensitive scales, GGUF files written from them the way
llama.cpp's converter does, and a plain greedy loop over the model and its KV cache."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from inference.runtime.model import KVCache
from inference.runtime.sampling import Sampler, SamplingParams, sample


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_llama(folder: Path, *, vocab_size: int = 320, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, intermediate: int = 128, seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM with a small byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog. " * 4,
              "What is the capital of France? Paris is the capital of France.",
              "Once upon a time there was a small model that answered questions."]
    tok.train_from_iterator(corpus * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHAT_TEMPLATE, "bos_token": None, "eos_token": "<|im_end|>",
        "add_bos_token": False}))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


ATOL = 1e-4  # the bound on max |logits - transformers logits|, fp32


PROMPT = "What is the capital of France? Paris is the capital of France."


def make_random_model(folder: Path, tokenizer_dir: Path, arch: str = "llama", *, hidden: int = 64,
                      layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                      tie: bool = False, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
                      seed: int = 0) -> Path:
    """A transformers model of `arch` saved as a HF folder, with the tokenizer of
    `tokenizer_dir` (the `tiny_llama` fixture) and every parameter drawn at random at a
    scale that makes the test sensitive: unit-scale activations, sharp attention (so
    q/k layout errors show), norm weights and biases far from 1 and 0."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[arch]
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  bos_token_id=1, eos_token_id=2, rope_theta=rope_theta)
    if rope_scaling:
        kwargs["rope_scaling"] = rope_scaling
    if arch == "mistral":
        kwargs["sliding_window"] = None
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0, 0.3 if tie else 1.0)  # tied: keep the layers, not the echo of the input token, in charge
            else:
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.normal_(0, gain / math.sqrt(p.shape[1]))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (n_head is n_head_kv for attn_k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder: Path, path: Path, qtype: str = "F32", permute: bool = True,
               arch: str | None = None) -> Path:
    """The HF folder `folder` as a GGUF file: metadata, a gpt2 (byte-level BPE) vocab
    taken from its tokenizer.json, its chat template, and 2-D weights stored as `qtype`
    (F32, F16, Q8_0, Q4_0, Q4_1; norms and biases stay F32)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    tj = json.loads((folder / "tokenizer.json").read_text())
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    arch = arch or cfg["model_type"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))

    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(theta)
    added = {t["id"]: t["content"] for t in tj["added_tokens"]}
    tokens = [None] * cfg["vocab_size"]
    for text, i in tj["model"]["vocab"].items():
        tokens[i] = text
    tokens = [added.get(i, t) for i, t in enumerate(tokens)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])  # CONTROL / NORMAL
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tcfg["chat_template"])

    qt = GGMLQuantizationType[qtype]
    for name, a in load_file(folder / "model.safetensors").items():
        a = a.astype(np.float32)
        if name in HF_TO_GGUF:
            gname = HF_TO_GGUF[name]
        else:
            parts = name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
            module = ".".join(parts[3:-1])
            gname = f"blk.{parts[2]}.{HF_TO_GGUF_LAYER[module]}.{parts[-1]}"
            if permute and arch == "llama" and parts[-1] == "weight":
                if module == "self_attn.q_proj":
                    a = llama_cpp_permute(a, heads)
                elif module == "self_attn.k_proj":
                    a = llama_cpp_permute(a, kv_heads)
        if a.ndim == 2 and qtype == "F16":
            w.add_tensor(gname, a.astype(np.float16))
        elif a.ndim == 2 and qtype != "F32":
            w.add_tensor(gname, quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@torch.no_grad()
def greedy_decode(model, prompts: list[list[int]], slots: list[int], steps: int, device: str):
    """Greedy: each prompt prefilled into its own cache slot, then all decoded together
    (ragged lengths, slots out of order) through `sample`. Returns the tokens of each
    row, the logits of every step and the (logprob, entropy, top-1) of every choice."""
    cache = KVCache(model.config, max(slots) + 1, max(map(len, prompts)) + steps,
                    dtype=model.norm.weight.dtype, device=device)
    samplers = [Sampler(SamplingParams(), device) for _ in prompts]
    tokens, logits_seen, stats = [], [], []
    for prompt, slot, sampler in zip(prompts, slots, samplers):
        logits = model(torch.tensor([prompt], device=device), torch.arange(len(prompt), device=device)[None],
                       cache, torch.tensor([slot], device=device), last_only=True)[:, -1]
        choice = sample(logits, [sampler])[0]
        tokens.append([choice.token])
        logits_seen.append(logits)
        stats.append(choice[1:])
    positions = [len(p) for p in prompts]
    for _ in range(steps - 1):
        logits = model(torch.tensor([[row[-1]] for row in tokens], device=device),
                       torch.tensor(positions, device=device)[:, None], cache,
                       torch.tensor(slots, device=device))[:, -1]
        logits_seen.append(logits)
        for row, choice in zip(tokens, sample(logits, samplers)):
            row.append(choice.token)
            stats.append(choice[1:])
        positions = [p + 1 for p in positions]
    return tokens, logits_seen, torch.tensor(stats)
