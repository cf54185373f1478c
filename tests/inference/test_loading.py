"""inference.runtime.loading: errors that name the problem, and the GGUF path proved on tiny files.

The GGUF files here are written with gguf.GGUFWriter from a tiny random HF folder, the
way llama.cpp's converter writes them (Q and K rows permuted for "llama"), so the GGUF
loader is checked against the folder it came from without the 100 MB demo model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.runtime.loading import build_model, load_checkpoint
from inference.runtime.model import KVCache
from tests.helpers.models import ATOL, PROMPT, make_random_model, write_gguf

def logits_of(source, ids) -> torch.Tensor:
    ckpt = load_checkpoint(source) if not hasattr(source, "config") else source
    model = build_model(ckpt)
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], KVCache(ckpt.config, 1, 64),
                     torch.tensor([0]))[0]


@pytest.fixture(scope="module")
def llama_folder(tiny_llama, tmp_path_factory) -> Path:
    """GQA 4:1 so that the K un-permutation must use the KV head count."""
    return make_random_model(tmp_path_factory.mktemp("gguf-src"), tiny_llama, heads=8, kv_heads=2, seed=3)


@pytest.fixture(scope="module")
def qwen2_folder(tiny_llama, tmp_path_factory) -> Path:
    """q/k/v biases, tied embeddings (no output.weight), no permutation in GGUF."""
    return make_random_model(tmp_path_factory.mktemp("gguf-qwen2"), tiny_llama, arch="qwen2", tie=True, seed=4)


# --------------------------------------------------------------------- GGUF parity


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_loads_to_the_logits_of_its_hf_folder(arch, llama_folder, qwen2_folder, tmp_path):
    folder = llama_folder if arch == "llama" else qwen2_folder
    gguf_ckpt = load_checkpoint(write_gguf(folder, tmp_path / f"{arch}.gguf"))
    hf_ckpt = load_checkpoint(folder)
    eps = hf_ckpt.config.rms_norm_eps  # GGUF stores it as float32
    assert gguf_ckpt.config.rms_norm_eps == pytest.approx(eps, rel=1e-6)
    assert dataclasses.replace(gguf_ckpt.config, rms_norm_eps=eps) == hf_ckpt.config
    assert set(gguf_ckpt.tensors) == set(hf_ckpt.tensors)
    for name, t in hf_ckpt.tensors.items():  # un-permuted Q/K included: bit-exact
        assert torch.equal(gguf_ckpt.tensors[name], t), name
    # tokenizer and chat template from the same source
    tg, th = gguf_ckpt.tokenizer, hf_ckpt.tokenizer
    ids = th.encode(PROMPT)
    assert tg.encode(PROMPT) == ids and tg.decode(ids) == th.decode(ids) == PROMPT
    chat = [{"role": "user", "content": "hi"}]
    assert tg.apply_chat_template(chat) == th.apply_chat_template(chat)
    assert 2 in tg.eos_ids and 2 in th.eos_ids
    diff = (logits_of(gguf_ckpt, ids) - logits_of(hf_ckpt, ids)).abs().max()
    assert diff <= ATOL


def test_gguf_without_llama_cpp_permutation_differs(llama_folder, tmp_path):
    """Control for the test above: a GGUF whose Q/K rows were NOT permuted (not what
    llama.cpp writes) must come out different, so the un-permutation is really tested."""
    ids = load_checkpoint(llama_folder).tokenizer.encode(PROMPT)
    wrong = logits_of(write_gguf(llama_folder, tmp_path / "plain.gguf", permute=False), ids)
    right = logits_of(llama_folder, ids)
    assert (wrong - right).abs().max() > 1e-2


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_quant_types_match_transformers(qtype, llama_folder, tmp_path):
    """Dequantised F16/Q8_0/Q4_0/Q4_1 weights: the same logits as transformers loading
    the same GGUF file (its own dequantiser and un-permutation)."""
    from transformers import AutoModelForCausalLM

    path = write_gguf(llama_folder, tmp_path / f"tiny-{qtype}.gguf", qtype)
    ckpt = load_checkpoint(path)
    assert ckpt.storage["layers.0.self_attn.q_proj.weight"] == qtype
    assert ckpt.storage["layers.0.input_layernorm.weight"] == "F32"
    assert bool(ckpt.q4_groups) == qtype.startswith("Q4")
    ids = ckpt.tokenizer.encode(PROMPT)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    ours = logits_of(ckpt, ids)
    assert (ours - expected).abs().max() <= ATOL
    # and the quantisation did change something (the test would see a wrong dequantiser)
    assert (ours - logits_of(llama_folder, ids)).abs().max() > 1e-5


# ------------------------------------------------------------------------ errors


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.gguf")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"model\.bin.*neither a \.gguf file nor a Hugging Face folder"):
        load_checkpoint(f)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_folder_without_safetensors(tiny_llama, tmp_path):
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_checkpoint(tmp_path)


def test_config_with_unsupported_architecture(tiny_llama, tmp_path):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architectures.*GPT2LMHeadModel"):
        load_checkpoint(tmp_path)


def test_gguf_with_unsupported_architecture(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="general.architecture 'gpt2' is not supported"):
        load_checkpoint(path)


def test_gguf_missing_metadata(llama_folder, tmp_path):
    """A GGUF without a required hyperparameter names the key it lacks."""
    from gguf import GGUFReader, GGUFWriter

    src = GGUFReader(write_gguf(llama_folder, tmp_path / "full.gguf"))
    path = tmp_path / "partial.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_embedding_length(64)
    w.add_head_count(8)
    w.add_vocab_size(len(src.tensors[0].data))
    for t in src.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="llama.feed_forward_length"):
        load_checkpoint(path)


def test_gguf_without_vocabulary(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "novocab.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                       ("attention.head_count", 2), ("attention.layer_norm_rms_epsilon", 1e-5)):
        getattr(w, "add_uint32" if isinstance(value, int) else "add_float32")(f"llama.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises((ValueError, KeyError), match="tokenizer.ggml.tokens"):
        load_checkpoint(path)


def test_folder_with_missing_tensor(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_text((llama_folder / f).read_text())
    tensors = load_file(llama_folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.weight"):
        build_model(load_checkpoint(tmp_path))


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_llama):
    return load_checkpoint(tiny_llama)


@pytest.mark.parametrize("kwargs, field", [
    (dict(quantize="int3"), "quantize"),
    (dict(quantize="fp8"), "quantize"),
    (dict(quantize="int4", group_size=48), "group_size"),
    (dict(quantize="int4", group_size=128), "group_size"),  # hidden 64 is not a multiple of 128
])
def test_build_model_rejects_bad_options(tiny_ckpt, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        build_model(tiny_ckpt, **kwargs)
