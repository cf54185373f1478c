"""The demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) in every precision, and the
weight-only quantisation of whole models.

- fp32 (dequantised GGUF) against transformers loading the same GGUF: prompt logits
  and 32 greedy tokens.
- Paris, through the chat template, for none / int8 / int4 (and int4 through the engine).
- int4 group 32 takes the GGUF's Q4_1 codes over exactly; group 64 requantises.
- Perplexity on a fixed English text for every precision, printed as a table.
- Tiny models: a quantised build computes what a float model with its dequantised
  weights computes (int8; int4 group 32, 64, 128), and Q4_0/Q4_1 GGUF codes are taken
  over exactly.

Each demo precision is built once per module (`demo_model`); the checkpoint is loaded once.
"""

from __future__ import annotations

import queue

import pytest
import torch
import torch.nn.functional as F

from inference.runtime.loading import build_model, load_checkpoint
from inference.runtime.model import KVCache
from tests.helpers.models import make_random_model, write_gguf

# Written for this test; about 390 tokens with SmolLM2's tokenizer.
TEXT = """\
The village stood at the edge of a wide river, where the water slowed and spread out into \
shallow pools before turning toward the sea. Most of the people who lived there worked on the \
land or on the boats, and the rhythm of their days followed the seasons. In spring the fields \
were ploughed and planted with wheat, barley and beans. In summer the children helped to bring \
in the hay, and the evenings were long and warm. In autumn the harvest was gathered, the apples \
were pressed for cider, and the market in the square was full of carts and voices. Winter was \
quiet. Snow covered the hills, the river froze along its banks, and families gathered around the \
fire to mend nets, tell stories and plan for the year ahead.

The school was a small stone building with two classrooms and a garden behind it. The teacher, \
a patient woman who had grown up in the village herself, taught reading, writing and arithmetic \
in the mornings, and history and science in the afternoons. She believed that every child could \
learn if the lessons were clear and the questions were honest. When the weather was good she took \
the older pupils down to the river to measure how fast the water moved, to count the birds that \
nested in the reeds, and to draw maps of the paths that led into the forest.

Over the years the village changed. A new road was built, and with it came a bus that ran twice \
a day to the nearest town. Some young people left to study at the university or to find work in \
the city, and a few of them never came back. Others returned with new ideas: a small clinic \
opened next to the post office, the old mill was turned into a library, and solar panels appeared \
on the roofs of the barns. Yet the river still flowed past the fields as it always had, and every \
autumn the market filled the square once more.
"""

CONTINUE_PROMPT = "Once upon a time, in a small village by the sea,"
QUESTION = "What is the capital of France?"
DEMO_LOGITS_ATOL = 5e-4  # fp32, same weights; measured ~4e-5 on logits of magnitude ~27

# (quantize, group_size) -> label; int4 group 32 takes the Q4_1 codes over exactly,
# group 64 requantises the dequantised fp32 weights. Group 128 does not divide the demo
# model's hidden size (576) and is covered on a tiny model below.
PRECISIONS = {("none", 32): "fp32", ("int8", 32): "int8", ("int4", 32): "int4 g32 (exact Q4_1)",
              ("int4", 64): "int4 g64 (requantised)"}


@pytest.fixture(scope="module")
def demo_ckpt(demo_gguf):
    return load_checkpoint(demo_gguf)


@pytest.fixture(scope="module")
def demo_model(demo_ckpt):
    """demo_model(quantize, group_size): built once per module."""
    built = {}

    def get(quantize: str = "none", group_size: int = 32):
        if (quantize, group_size) not in built:
            built[quantize, group_size] = build_model(demo_ckpt, quantize, group_size)
        return built[quantize, group_size]

    return get


@pytest.fixture(scope="module")
def hf_demo(demo_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo_gguf.parent), gguf_file=demo_gguf.name,
                                                dtype=torch.float32).eval()


@torch.no_grad()
def greedy(model, ids: list[int], steps: int, eos_ids) -> list[int]:
    """Prefill, then one token at a time through the KV cache; stops after an eos token."""
    cache = KVCache(model.config, 1, len(ids) + steps)
    slot = torch.tensor([0])
    logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], cache, slot, last_only=True)
    out: list[int] = []
    for _ in range(steps):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in eos_ids:
            break
        pos = len(ids) + len(out) - 1
        logits = model(torch.tensor([[token]]), torch.tensor([[pos]]), cache, slot)
    return out


@torch.no_grad()
def perplexity(model, ids: list[int]) -> float:
    logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], KVCache(model.config, 1, len(ids)),
                   torch.tensor([0]))[0]
    return float(F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).exp())


# ------------------------------------------------------------- demo: fp32 parity


def test_demo_prompt_logits_match_transformers(demo_ckpt, demo_model, hf_demo):
    ids = demo_ckpt.tokenizer.encode(CONTINUE_PROMPT)
    with torch.no_grad():
        ref = hf_demo(torch.tensor([ids])).logits[0]
        ours = demo_model()(torch.tensor([ids]), torch.arange(len(ids))[None],
                            KVCache(demo_ckpt.config, 1, 64), torch.tensor([0]))[0]
    diff = (ours - ref).abs().max().item()
    print(f"demo fp32 vs transformers: max |logits diff| {diff:.2e} over {len(ids)} positions "
          f"(max |logit| {ref.abs().max():.1f})")
    assert diff <= DEMO_LOGITS_ATOL


def test_demo_greedy_32_tokens_match_transformers(demo_ckpt, demo_model, hf_demo):
    """Both stop after eos (id 2, the GGUF's eos and transformers' generation config);
    this prompt runs the full 32 tokens, so all of them are compared."""
    tok = demo_ckpt.tokenizer
    ids = tok.encode(CONTINUE_PROMPT)
    with torch.no_grad():
        ref = hf_demo.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert hf_demo.generation_config.eos_token_id in tok.eos_ids
    ours = greedy(demo_model(), ids, 32, tok.eos_ids)
    assert ours == ref, f"ours {tok.decode(ours)!r}\nref  {tok.decode(ref)!r}"
    assert len(ours) == 32


# ------------------------------------------------------------------------ Paris


def chat_ids(ckpt) -> list[int]:
    tok = ckpt.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}]), add_special=False)


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_demo_answers_paris(quantize, demo_ckpt, demo_model):
    tok = demo_ckpt.tokenizer
    out = greedy(demo_model(quantize), chat_ids(demo_ckpt), 24, tok.eos_ids)
    answer = tok.decode(out)
    print(f"{quantize}: {answer!r}")
    assert "Paris" in answer


def test_demo_int4_answers_paris_through_the_engine(demo_ckpt, demo_model):
    """The serving path: continuous-batching engine, greedy sampler, eos from the template."""
    from inference.runtime.engine import Engine, Finished, Job
    from inference.runtime.sampling import SamplingParams

    engine = Engine(demo_model("int4"), demo_ckpt.tokenizer, kv_slots=2, max_seq_len=128, max_waiting=4)
    try:
        results: queue.Queue = queue.Queue()
        engine.submit(Job(chat_ids(demo_ckpt), results.put, params=SamplingParams(max_tokens=24)))
        while not isinstance(done := results.get(timeout=120), Finished):
            pass
    finally:
        engine.stop()
    assert done.error == "" and done.finish_reason in ("stop", "length")
    assert "Paris" in done.text


# --------------------------------------------------------------- int4 exactness


def fused_float_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules()
            if n.startswith("layers.") and isinstance(m, torch.nn.Linear)}


def test_demo_int4_g32_takes_q4_1_codes_exactly(demo_ckpt, demo_model):
    """Every layer projection of the int4 build dequantises to the GGUF's own Q4_1
    values, bit for bit (Q/K codes un-permuted like the float tensors)."""
    assert set(demo_ckpt.storage.values()) >= {"Q4_1"}
    float_w = fused_float_weights(demo_model("none"))
    q4 = demo_model("int4", 32)
    assert len(float_w) == 4 * demo_ckpt.config.num_layers
    for name, w in float_w.items():
        module = q4.get_submodule(name)
        assert getattr(module, "group_size", None) == 32, name
        assert torch.equal(module.dequantize(), w), name
    g64 = demo_model("int4", 64).get_submodule("layers.0.mlp.down_proj")
    assert g64.group_size == 64
    assert not torch.equal(g64.dequantize(), float_w["layers.0.mlp.down_proj"])


def test_demo_int4_g128_rejected(demo_ckpt):
    with pytest.raises(ValueError, match=r"group_size.*576"):
        build_model(demo_ckpt, "int4", 128)


# ------------------------------------------------------------------- perplexity


def test_demo_perplexity(demo_ckpt, demo_model, capsys, record_testsuite_property):
    ids = demo_ckpt.tokenizer.encode(TEXT)
    assert 300 <= len(ids) <= 500
    ppl = {label: perplexity(demo_model(*key), ids) for key, label in PRECISIONS.items()}
    base = ppl["fp32"]
    lines = [f"perplexity of the demo model on a fixed text ({len(ids)} tokens)",
             f"{'precision':<24}{'ppl':>9}{'vs fp32':>10}"]
    lines += [f"{label:<24}{value:>9.3f}{value / base - 1:>+10.2%}" for label, value in ppl.items()]
    lines.append(f"{'int4 g128':<24}{'n/a':>9}  (576 is not a multiple of 128)")
    table = "\n".join(lines)
    with capsys.disabled():
        print("\n" + table)
    for label, value in ppl.items():  # into --junitxml output (works with xunit2)
        record_testsuite_property(f"demo perplexity {label}", f"{value:.4f}")

    # fp32 is a working model on plain English (measured 15.8); a broken one is in the hundreds
    assert base < 30
    # int8 per channel of already 4-bit weights: measured -0.4%
    assert abs(ppl["int8"] / base - 1) <= 0.02
    # the same Q4_1 weights as fp32; only bf16 activations and the fp16 lm_head differ
    # (measured +0.1%): anything past 2% means the codes were not taken over exactly
    assert abs(ppl["int4 g32 (exact Q4_1)"] / base - 1) <= 0.02
    # requantising 4-bit weights to group 64 adds a second rounding error (~8% relative
    # weight error per matrix on top of Q4_1's own): measured +44% on this 135M model,
    # bounded at 1.6x. It must also be worse than the exact take-over.
    g64 = ppl["int4 g64 (requantised)"]
    assert ppl["int4 g32 (exact Q4_1)"] < g64 <= 1.6 * base


# --------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_wide(tiny_llama, tmp_path_factory):
    """hidden 128 and MLP 256, so that every group size (32, 64, 128) divides them."""
    folder = make_random_model(tmp_path_factory.mktemp("wide"), tiny_llama, hidden=128,
                               intermediate=256, heads=4, kv_heads=2, seed=5)
    return load_checkpoint(folder)


@pytest.mark.parametrize("quantize, group_size", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_quantized_build_computes_its_dequantised_weights(tiny_wide, quantize, group_size):
    """A quantised build equals a float model holding its dequantised weights (up to the
    bf16 activations of the quantised matmuls), and differs from the float model."""
    ids = tiny_wide.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    q = build_model(tiny_wide, quantize, group_size)
    ref = build_model(tiny_wide)
    quantized = 0
    with torch.no_grad():
        for name, linear in fused_float_weights(ref).items():
            module = q.get_submodule(name)
            if hasattr(module, "dequantize"):
                if quantize == "int4":
                    assert module.group_size == group_size
                linear.copy_(module.dequantize())
                quantized += 1
    assert quantized == 4 * tiny_wide.config.num_layers
    cache = lambda: KVCache(tiny_wide.config, 1, 64)  # noqa: E731
    args = (torch.tensor([ids]), torch.arange(len(ids))[None])
    with torch.no_grad():
        got = q(*args, cache(), torch.tensor([0]))[0]
        want = ref(*args, cache(), torch.tensor([0]))[0]
        plain = build_model(tiny_wide)(*args, cache(), torch.tensor([0]))[0]
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 2e-2
    assert (plain - want).abs().max() / scale > 1e-3  # the weights really were quantised


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_tiny_gguf_q4_codes_taken_over_exactly(qtype, tiny_llama, tmp_path):
    """Q4_0 and Q4_1 blocks (Q/K rows permuted by the converter) become group-32 int4
    weights that dequantise to exactly the GGUF's values."""
    folder = make_random_model(tmp_path / "src", tiny_llama, heads=8, kv_heads=2, seed=6)
    ckpt = load_checkpoint(write_gguf(folder, tmp_path / f"{qtype}.gguf", qtype))
    float_w = fused_float_weights(build_model(ckpt))
    q4 = build_model(ckpt, "int4", 32)
    for name, w in float_w.items():
        assert torch.equal(q4.get_submodule(name).dequantize(), w), name
