"""Parity of inference.runtime.model.Llama with transformers on tiny random models (fp32).

Covers the Llama, Mistral and Qwen2 layouts (GQA ratios 1, 2 and 4, q/k/v bias, tied
embeddings, rope theta and llama3 rope scaling), the KV cache (chunked prefill, one
token at a time, two sequences of different lengths decoded together in any pair of
slots) and greedy decoding against `generate(do_sample=False)`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.runtime.loading import build_model, load_checkpoint
from inference.runtime.model import KVCache
from tests.helpers.models import ATOL, PROMPT, make_random_model

# name -> make_random_model arguments; None is the conftest's `tiny_llama` as it is
VARIANTS = {
    "tiny_llama": None,
    "llama-gqa1": dict(heads=4, kv_heads=4),
    "llama-gqa4-tied": dict(heads=8, kv_heads=2, tie=True, layers=3),
    "mistral-gqa2": dict(arch="mistral", heads=4, kv_heads=2),
    "qwen2-bias": dict(arch="qwen2", heads=4, kv_heads=2, tie=True),
    "llama-rope-theta-1e5": dict(rope_theta=100000.0),  # as SmolLM2
    "llama3-rope-scaling": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
}


class Pair:
    """Our model and transformers' reference, loaded from the same HF folder."""

    def __init__(self, folder: Path):
        from transformers import AutoModelForCausalLM

        self.folder = folder
        self.ckpt = load_checkpoint(folder)
        self.model = build_model(self.ckpt)
        self.ref = AutoModelForCausalLM.from_pretrained(folder).float().eval()
        self.tok = self.ckpt.tokenizer
        self.ids = self.tok.encode(PROMPT)

    def cache(self, slots: int = 1, max_seq_len: int = 128) -> KVCache:
        return KVCache(self.ckpt.config, slots, max_seq_len)

    def ref_logits(self, ids: list[int]) -> torch.Tensor:
        return self.ref(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def pair(request, tiny_llama, tmp_path_factory) -> Pair:
    args = VARIANTS[request.param]
    folder = tiny_llama if args is None else make_random_model(
        tmp_path_factory.mktemp(request.param), tiny_llama, **args)
    with torch.no_grad():
        yield Pair(folder)


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory) -> Pair:
    """One sensitive variant (GQA 2, random norms) for the KV cache tests."""
    with torch.no_grad():
        yield Pair(make_random_model(tmp_path_factory.mktemp("kv"), tiny_llama, layers=3, seed=1))


def forward(p: Pair, ids, cache, slot: int = 0, start: int = 0, last_only=False) -> torch.Tensor:
    with torch.no_grad():
        tokens = torch.tensor([ids])
        positions = torch.arange(start, start + len(ids))[None]
        return p.model(tokens, positions, cache, torch.tensor([slot]), last_only=last_only)[0]


def greedy(p: Pair, ids: list[int], steps: int) -> list[int]:
    """Prefill, then one token at a time through the KV cache; stops on eos like generate."""
    cache = p.cache()
    logits = forward(p, ids, cache, last_only=True)
    out: list[int] = []
    for _ in range(steps):
        token = int(logits[-1].argmax())
        out.append(token)
        if token in p.tok.eos_ids:
            break
        logits = forward(p, [token], cache, start=len(ids) + len(out) - 1)
    return out


# ------------------------------------------------------------------------ parity


def test_config_read(pair):
    cfg, hf = pair.ckpt.config, pair.ref.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.num_layers) == (
        hf.num_attention_heads, hf.num_key_value_heads, hf.num_hidden_layers)
    assert cfg.tie_word_embeddings == bool(hf.tie_word_embeddings)
    theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", getattr(hf, "rope_theta", None))
    assert cfg.rope_theta == pytest.approx(theta), "rope_theta not read from config.json"


def test_prompt_logits_match_transformers(pair):
    ours = forward(pair, pair.ids, pair.cache())
    ref = pair.ref_logits(pair.ids)
    assert ours.shape == ref.shape == (len(pair.ids), pair.ckpt.config.vocab_size)
    diff = (ours - ref).abs().max().item()
    print(f"{pair.folder.name}: max |logits diff| {diff:.2e} (max |logit| {ref.abs().max():.1f})")
    assert diff <= ATOL


def test_greedy_matches_generate(pair):
    from transformers import GenerationConfig

    steps = 16
    gen = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=2, pad_token_id=0)
    with torch.no_grad():
        ref = pair.ref.generate(torch.tensor([pair.ids]), generation_config=gen)[0, len(pair.ids):].tolist()
    ours = greedy(pair, pair.ids, steps)
    assert ours == ref
    assert len(set(ours)) > 1  # a constant stream would prove little


# ----------------------------------------------------------------------- KV cache


def test_last_only_is_last_row(tiny):
    full = forward(tiny, tiny.ids, tiny.cache())
    last = forward(tiny, tiny.ids, tiny.cache(), last_only=True)
    assert last.shape == (1, full.shape[-1])
    torch.testing.assert_close(last[0], full[-1], rtol=0, atol=1e-5)


def test_incremental_decode_matches_full_forward(tiny):
    """Chunked prefill, then one token at a time: every position's logits equal a
    full forward's (ours and transformers')."""
    ids = tiny.ids + tiny.tok.encode(" The quick brown fox jumps over the lazy dog.")
    full = forward(tiny, ids, tiny.cache())
    ref = tiny.ref_logits(ids)
    assert (full - ref).abs().max() <= ATOL
    cache = tiny.cache(slots=3)
    split = len(tiny.ids) - 3
    steps = [forward(tiny, ids[:5], cache, slot=2),
             forward(tiny, ids[5:split], cache, slot=2, start=5)]
    steps += [forward(tiny, [t], cache, slot=2, start=i) for i, t in enumerate(ids[split:], split)]
    incremental = torch.cat(steps)
    assert incremental.shape == full.shape
    assert (incremental - full).abs().max() <= ATOL
    assert cache.k[:, [0, 1]].abs().sum() == 0  # other slots untouched


@pytest.mark.parametrize("slots", [(3, 0), (1, 2)], ids=["scattered", "contiguous"])
def test_two_sequences_decoded_together(tiny, slots):
    """Two prompts of different lengths, prefilled alone in their own slots, then
    greedy-decoded together in one batch: each row's logits equal a full forward of
    that sequence alone (transformers), and the tokens equal its own greedy run."""
    seqs = [tiny.tok.encode("The quick brown fox"), list(tiny.ids)]
    assert len(seqs[0]) != len(seqs[1])
    cache = tiny.cache(slots=4)
    nxt = [int(forward(tiny, s, cache, slot=slot, last_only=True)[-1].argmax()) for s, slot in zip(seqs, slots)]
    for _ in range(6):
        for s, t in zip(seqs, nxt):
            s.append(t)
        tokens = torch.tensor([[s[-1]] for s in seqs])
        positions = torch.tensor([[len(s) - 1] for s in seqs])
        with torch.no_grad():
            logits = tiny.model(tokens, positions, cache, torch.tensor(slots))[:, -1]
        for row, s in enumerate(seqs):
            assert (logits[row] - tiny.ref_logits(s)[-1]).abs().max() <= ATOL, f"row {row} at length {len(s)}"
        nxt = logits.argmax(-1).tolist()
    assert seqs[1][len(tiny.ids):] == greedy(tiny, tiny.ids, 6)


def test_cache_overflow_raises(tiny):
    cache = tiny.cache(max_seq_len=8)
    with pytest.raises(ValueError, match="KV cache"):
        forward(tiny, list(range(10)), cache)
    forward(tiny, list(range(8)), cache)  # exactly full is fine
    with pytest.raises(ValueError, match="position 8"):
        forward(tiny, [5], cache, start=8)
