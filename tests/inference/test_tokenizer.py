import os

import pytest

from inference.runtime.tokenizer import IncrementalDecoder, Tokenizer


TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "pi is 3.14159 and 2024-01-31",
    "  leading and trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n",
    "     \n\n\n    ",
    "héllo wörld, ça va?",
    "こんにちは世界、中文测试",
    "emoji 😀🎉👍🏽 mixed",
    "Привет мир",
    "def f(x):\n    return x ** 2  # code",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'm we've",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color 🌈"}],
]


@pytest.fixture(scope="module")
def gguf_path(demo_gguf):
    return str(demo_gguf)


@pytest.fixture(scope="module")
def ours(gguf_path):
    import gguf
    return Tokenizer.from_gguf(gguf.GGUFReader(gguf_path))  # a reader; the synthetic tests below pass paths


@pytest.fixture(scope="module")
def ref(gguf_path):
    import transformers
    folder, name = os.path.split(gguf_path)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_gguf_encode_matches_transformers(ours, ref):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special=False) == text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_gguf_metadata(ours):
    assert ours.vocab_size == 49152
    assert ours.bos_id == 1 and ours.add_bos is False
    assert ours.eos_ids == {2}  # <|im_end|>: both tokenizer.ggml.eos_token_id and the template's turn end
    assert ours.encode("<|im_start|>") == [1] and ours.encode("12345") == [33, 34, 35, 36, 37]
    assert ours.decode([1, 4093, 2]) == "user"


def test_chat_template_matches_transformers(ours, ref):
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages, add_generation_prompt=False) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False)


def test_hf_folder_roundtrip(ours, ref, tmp_path):
    ref.save_pretrained(tmp_path)
    hf = Tokenizer.from_hf_folder(str(tmp_path))
    for text in TEXTS:
        assert hf.encode(text) == ref.encode(text) == ours.encode(text), text
    for messages in CONVERSATIONS:
        assert hf.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    assert (hf.vocab_size, hf.bos_id, hf.eos_ids, hf.add_bos) == (ours.vocab_size, 1, {2}, False)


def test_hf_folder_generation_config_and_bos(ours, ref, tmp_path):
    ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    cfg = (tmp_path / "tokenizer_config.json").read_text()
    (tmp_path / "tokenizer_config.json").write_text(cfg.replace("{", '{"add_bos_token": true,', 1))
    hf = Tokenizer.from_hf_folder(str(tmp_path))
    assert hf.eos_ids == {0, 2}
    assert hf.add_bos and hf.encode("hi") == [1] + ours.encode("hi")
    assert hf.encode("hi", add_special=False) == ours.encode("hi")


def _stream(tok, ids):
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


def test_incremental_decoder(ours):
    text = "Streaming 😀🎉 emoji, 中文字符 and naïve text 👍🏽!"
    ids = ours.encode(text)
    assert len(ids) > len(text.split())  # multi-byte chars are split across byte-level tokens
    pieces, rest = _stream(ours, ids)
    assert rest == ""
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == ours.decode(ids) == text
    # some token completed no character on its own and was held back
    assert "" in pieces


def test_incremental_decoder_skips_special(ours):
    ids = ours.encode("<|im_start|>assistant\nhi 🎉<|im_end|>")
    pieces, _ = _stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids) == "assistant\nhi 🎉"


def test_no_chat_template_raises(ours):
    bare = Tokenizer(ours.tok, ours.bos_id, ours.eos_ids, None)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_helpers(ours):
    t = Tokenizer(ours.tok, ours.bos_id, ours.eos_ids, ours.chat_template, {"bos_token": "<B>", "eos_token": "<E>"})
    t.chat_template = ("{{ bos_token }}{{ messages | tojson }}{{ strftime_now('%Y') | length }}"
                       "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
                       "{% for m in messages %}\n  {% generation %}{{ m.content }}{% endgeneration %}\n{% endfor %}")
    assert t.apply_chat_template([{"role": "user", "content": "é"}]) == '<B>[{"role": "user", "content": "é"}]4é'
    with pytest.raises(Exception, match="one message only"):
        t.apply_chat_template([{"role": "user", "content": "a"}] * 2)


# --- synthetic GGUF files for the other tokenizer kinds (written with gguf's writer) ---

def _write_gguf(path, model, tokens, types, scores=None, merges=None, pre=None, template=None, add_bos=None):
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64), w.add_embedding_length(8), w.add_block_count(1)
    w.add_head_count(1), w.add_feed_forward_length(8)
    w.add_tokenizer_model(model)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores:
        w.add_token_scores(scores)
    if merges:
        w.add_token_merges(merges)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if template:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    import transformers
    pieces = ["▁", "e", "t", "a", "o", "h", "l", "r", "d", "w", "n", "i", "s", "世", "界", "▁t", "he", "▁the",
              "▁a", "in", "▁in", "er", "▁w", "or", "ld", "▁wor", "▁world", "ll", "▁he", "▁hell", "▁hello",
              "▁世界", "▁世", "is", "▁is", "▁▁", "▁▁▁▁"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens += ["<|im_start|>", "<|im_end|>", "<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0] * 3
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    _write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=scores, template=template)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    tok = Tokenizer.from_gguf(str(tmp_path / "spm.gguf"))
    assert tok.add_bos and tok.bos_id == 1
    assert tok.eos_ids == {2, tokens.index("<|im_end|>")}  # eos + the template's turn end
    for text in ["hello world", " hello  world", "the 世界 is", "x\ny", "héllo 😀", "    lead",
                 "<|im_start|>hello<|im_end|>", "a<think>b", ""]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        pieces_out, rest = _stream(tok, ids)
        assert "".join(pieces_out) + rest == tok.decode(ids)
    assert tok.decode(tok.encode("hello world")) == "hello world"


def _tiny_byte_level(tmp_path, pre):
    # byte-level vocab: every printable byte char plus a few merges
    from inference.runtime.tokenizer import _bytes_to_unicode
    chars = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "1 2", "12 3"]
    tokens = ["<|endoftext|>", "<|begin|>", "<|end|>"] + chars + ["Ġt", "he", "Ġthe", "12", "123"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    _write_gguf(tmp_path / f"{pre}.gguf", "gpt2", tokens, types, merges=merges, pre=pre)
    return tokens


@pytest.mark.parametrize("pre,digits", [("llama-bpe", ["123", "4"]), ("qwen2", list("1234")),
                                        ("default", ["123", "4"]), ("smollm", list("1234"))])
def test_byte_level_pre_tokenizers(tmp_path, pre, digits):
    tokens = _tiny_byte_level(tmp_path, pre)
    tok = Tokenizer.from_gguf(str(tmp_path / f"{pre}.gguf"))
    ids = tok.encode("the 1234<|end|>", add_special=False)
    assert [tokens[i] for i in ids] == ["t", "he", "Ġ"] + digits + ["<|end|>"]
    assert tok.decode(ids) == "the 1234" and tok.eos_ids == {2}
    assert tok.add_bos == (pre == "llama-bpe")  # llama.cpp's default when add_bos_token is absent


def test_unsupported_gguf_tokenizers(tmp_path):
    _tiny_byte_level(tmp_path, "made-up-pre")
    with pytest.raises(ValueError, match="made-up-pre"):
        Tokenizer.from_gguf(str(tmp_path / "made-up-pre.gguf"))
    _write_gguf(tmp_path / "bert.gguf", "bert", ["[UNK]", "[CLS]", "[SEP]"], [2, 3, 3])
    with pytest.raises(NotImplementedError, match="bert"):
        Tokenizer.from_gguf(str(tmp_path / "bert.gguf"))
