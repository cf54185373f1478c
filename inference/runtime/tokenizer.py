"""Tokenizer: HF `tokenizers` (Rust) built from a HF folder or from GGUF metadata, plus chat templates.

No transformers at runtime. GGUF building mirrors llama.cpp's vocab types and transformers' GGUF converter.
"""
import functools
import json
import os
from datetime import datetime

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

# GGUF token types (llama.cpp)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"}
_QWEN2_PRES = {"qwen2", "deepseek-r1-qwen"}


def _bytes_to_unicode():
    """GPT-2's byte -> printable char table used by byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_level_pre_tokenizer(pre):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in (None, "default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre == "smollm":  # as SmolLM2's tokenizer.json: digits split one by one, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False
    if pre in _LLAMA3_PRES:  # llama.cpp sets ignore_merges for llama3
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"), byte_level]), True
    if pre in _QWEN2_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"), byte_level]), False
    raise ValueError(f"unsupported GGUF tokenizer.ggml.pre {pre!r} (supported: default, gpt2, smollm, "
                     f"{', '.join(sorted(_LLAMA3_PRES | _QWEN2_PRES))})")


def _merges_from_scores(tokens, scores):
    """SentencePiece BPE without stored merges: every split of a token into two vocab pieces is a merge,
    ranked by the merged token's score (same order as transformers' generate_merges)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for tok, score in zip(tokens, scores):
        local = [(tok[:k], tok[k:], score) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gguf_metadata(reader):
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            out[key] = field.contents()
    return out


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` (assistant masks): render the body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile_template(source):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    def __init__(self, tok, bos_id=None, eos_ids=(), chat_template=None, special_tokens=None):
        self.tok = tok  # tokenizers.Tokenizer
        self.bos_id = bos_id
        self.chat_template = chat_template
        # names passed to the chat template (bos_token, eos_token, ...)
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        with_bos, without = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
        self.add_bos = bos_id is not None and len(with_bos) > len(without) and with_bos[0] == bos_id
        self.eos_ids = set(eos_ids) | self._end_of_turn_ids()

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def id_to_token(self, i):
        return self.tok.id_to_token(i)

    def encode(self, text, add_special=True):
        return self.tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids, skip_special=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def incremental_decoder(self, skip_special=True):
        return IncrementalDecoder(self, skip_special)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead of chat messages")
        template = _compile_template(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **self.special_tokens, **kwargs)

    def _end_of_turn_ids(self):
        """Special tokens the chat template writes right after an assistant message's content
        (e.g. <|im_end|>, <|eot_id|>, <end_of_turn>): generation must stop on them too."""
        if self.chat_template is None:
            return set()
        mark = "Vigil0end0of0turn0probe"
        try:
            text = self.apply_chat_template([{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": mark}], add_generation_prompt=False)
        except Exception:
            return set()
        if mark not in text:
            return set()
        rest = text[text.index(mark) + len(mark):]
        specials = [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special]
        hits = [s for s in specials if s and rest.startswith(s)]
        return {self.tok.token_to_id(max(hits, key=len))} if hits else set()

    @classmethod
    def from_hf_folder(cls, path):
        def load(name):
            p = os.path.join(path, name)
            if os.path.exists(p):
                with open(p, encoding="utf-8") as f:
                    return json.load(f)
            return {}

        tok = _HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        cfg, gen_cfg, model_cfg = load("tokenizer_config.json"), load("generation_config.json"), load("config.json")

        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        jinja_path = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()

        names = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        bos_id = tok.token_to_id(names["bos_token"]) if names["bos_token"] else None
        if bos_id is None:
            bos_id = model_cfg.get("bos_token_id")
            if bos_id is not None:
                names["bos_token"] = tok.id_to_token(bos_id)
        eos_ids = set(_as_list(gen_cfg.get("eos_token_id"))) | set(_as_list(model_cfg.get("eos_token_id")))
        if names["eos_token"] and tok.token_to_id(names["eos_token"]) is not None:
            eos_ids.add(tok.token_to_id(names["eos_token"]))
        if names["eos_token"] is None and eos_ids:
            names["eos_token"] = tok.id_to_token(min(eos_ids))

        # like transformers: explicit add_bos_token/add_eos_token in the config rebuild the post-processor
        if "add_bos_token" in cfg or "add_eos_token" in cfg:
            _set_post_processor(tok, names["bos_token"] if cfg.get("add_bos_token") else None,
                                names["eos_token"] if cfg.get("add_eos_token") else None)
        return cls(tok, bos_id, eos_ids, template, names)

    @classmethod
    def from_gguf(cls, reader_or_path):
        if isinstance(reader_or_path, (str, os.PathLike)):
            import gguf
            reader_or_path = gguf.GGUFReader(reader_or_path)
        md = _gguf_metadata(reader_or_path)
        model = md.get("tokenizer.ggml.model")
        tokens = list(md["tokenizer.ggml.tokens"])
        types = list(md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))

        if model == "gpt2":
            # vocab must be spelled in the byte alphabet; control/user tokens keep their text (added tokens)
            b2u = _bytes_to_unicode()
            alphabet = set(b2u.values())
            vocab = {}
            for i, (t, ty) in enumerate(zip(tokens, types)):
                if ty == NORMAL and not set(t) <= alphabet:
                    t = "".join(b2u[b] for b in t.encode("utf-8"))
                vocab[t] = i
            merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
            pre_tok, ignore_merges = _byte_level_pre_tokenizer(md.get("tokenizer.ggml.pre"))
            tok = _HFTokenizer(BPE(vocab, merges, ignore_merges=ignore_merges))
            if md.get("tokenizer.ggml.pre") in _QWEN2_PRES:
                tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tok
            tok.decoder = decoders.ByteLevel()
            add_bos_default = md.get("tokenizer.ggml.pre") in _LLAMA3_PRES
        elif model == "llama":
            # SentencePiece BPE: ▁ for spaces, <0xNN> byte fallback (as transformers' LlamaTokenizer)
            vocab = {t: i for i, t in enumerate(tokens)}
            if "tokenizer.ggml.merges" in md:
                merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
            else:
                merges = _merges_from_scores(tokens, md["tokenizer.ggml.scores"])
            unk_id = md.get("tokenizer.ggml.unknown_token_id")
            tok = _HFTokenizer(BPE(vocab, merges, unk_token=tokens[unk_id] if unk_id is not None else None,
                                   fuse_unk=True, byte_fallback=True))
            prefix = md.get("tokenizer.ggml.add_space_prefix", True)
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", split=False,
                                                         prepend_scheme="first" if prefix else "never")
            decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            tok.decoder = decoders.Sequence(decs + ([decoders.Strip(" ", 1, 0)] if prefix else []))
            add_bos_default = True
        else:
            raise NotImplementedError(f"GGUF tokenizer.ggml.model {model!r} is not supported (gpt2, llama)")

        tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
        tok.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])

        def tid(key):
            return md.get(f"tokenizer.ggml.{key}_token_id")

        names = {f"{k}_token": tokens[tid(k)] if tid(k) is not None else None for k in ("bos", "eos", "unk")}
        names["pad_token"] = tokens[tid("padding")] if tid("padding") is not None else None
        add_bos = md.get("tokenizer.ggml.add_bos_token", add_bos_default)
        add_eos = md.get("tokenizer.ggml.add_eos_token", False)
        _set_post_processor(tok, names["bos_token"] if add_bos else None, names["eos_token"] if add_eos else None)
        eos_ids = {i for i in (tid("eos"), tid("eot"), tid("eom")) if i is not None}
        return cls(tok, tid("bos"), eos_ids, md.get("tokenizer.chat_template"), names)


def _set_post_processor(tok, bos=None, eos=None):
    single = (f"{bos}:0 " if bos else "") + "$A:0" + (f" {eos}:0" if eos else "")
    pair = single + (f" {bos}:1" if bos else "") + " $B:1" + (f" {eos}:1" if eos else "")
    specials = [(t, tok.token_to_id(t)) for t in {bos, eos} if t]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


class IncrementalDecoder:
    """Streaming detokenizer: feed ids one at a time, get back the newly completed text.

    Decodes a sliding window (prefix..end) and diffs it with (prefix..read) so tokenizers whose decode
    depends on context (SentencePiece's leading space) stay exact; holds text back while it ends in U+FFFD
    (an incomplete UTF-8 sequence split across tokens)."""

    def __init__(self, tokenizer, skip_special=True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids = []
        self.prefix = 0  # start of the context window
        self.read = 0  # ids before this were already emitted

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id):
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text):]
        return ""

    def flush(self):
        """Whatever is still held back (e.g. a generation cut mid-character), with U+FFFD left in."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text):]
