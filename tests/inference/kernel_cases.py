"""The Triton kernels against their torch references, and the model run through them.

tests/test_kernels.py runs this file in a child pytest with TRITON_INTERPRET=1, where
Triton's interpreter runs the kernels on CPU tensors (the variable has to be set before
triton is imported, and must not reach the rest of the suite). On a machine with CUDA it
also runs as it is: `pytest tests/kernel_cases.py`.

Tolerances, |kernel - reference| <= atol * scale + rtol * |reference|:
  fp32  atol 1e-5, rtol 1e-5: the kernels compute what the references do, in another
        order of summation.
  bf16  atol 1e-2, rtol 1e-2: a kernel rounds its fp32 result to bf16 once (half an ulp,
        2^-9 relative), against a reference computed in fp32 from the same bf16 inputs.
`scale` is 1, or the largest |reference| for sums over many terms (matmul, attention).
The softmax statistics are fp32 whatever the logits' dtype (see SOFTMAX_TOL).
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

from inference.runtime import kernels as K
from inference.runtime import quantize
from inference.runtime import sampling
from inference.runtime.kernels import dispatch
from inference.runtime.loading import build_model, load_checkpoint
from tests.helpers.models import greedy_decode

DEVICE = "cpu" if dispatch.INTERPRET else "cuda"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
SOFTMAX_TOL = dict(probs=dict(atol=1e-8, rtol=1e-4), max_prob=dict(atol=1e-8, rtol=1e-4),
                   entropy=dict(atol=1e-4, rtol=1e-5), lse=dict(atol=1e-5, rtol=1e-6))
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

pytestmark = pytest.mark.skipif(not dispatch.AVAILABLE,
                                reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before the import")


@pytest.fixture(autouse=True)
def triton_only():
    """Every public function must run its Triton kernel here, never fall back."""
    with dispatch.using("triton"):
        yield


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def assert_close(out, ref, dtype, scale=1.0):
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol["atol"] * float(scale), rtol=tol["rtol"])


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ------------------------------------------------------------- softmax statistics


def assert_stats_close(out: K.SoftmaxStats, ref: K.SoftmaxStats, equal_nan=False):
    for name in K.SoftmaxStats._fields:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), equal_nan=equal_nan,
                                   **SOFTMAX_TOL[name], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n, v", [(1, 7), (3, 1000), (2, 4097), (1, 49152), (4, 50000), (2, 151936)])
@pytest.mark.parametrize("per_row", [True, False], ids=["temps", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_stats(n, v, per_row, dtype):
    logits = randn(n, v, dtype=dtype, scale=4.0)
    temperature = torch.rand(n, device=DEVICE) * 1.7 + 0.3 if per_row else 0.7
    assert_stats_close(K.fused_softmax_stats(logits, temperature), K.softmax_stats_reference(logits, temperature))


def test_softmax_stats_strided_rows():
    logits = randn(3, 6000, scale=3.0)[:, 500:5500]
    assert_stats_close(K.fused_softmax_stats(logits, 1.3), K.softmax_stats_reference(logits, 1.3))


def test_softmax_stats_minus_inf():
    logits = randn(4, 50000, scale=3.0)
    logits[0, :5000] = float("-inf")     # a whole first block of -inf
    logits[1, ::3] = float("-inf")       # masked tokens everywhere
    logits[2, :] = float("-inf")
    logits[2, 12345] = 2.5               # one token left
    logits[3, 40000:] = float("-inf")    # -inf in the last, partial block
    out = K.fused_softmax_stats(logits, torch.tensor([1.0, 0.5, 2.0, 1.0], device=DEVICE))
    assert_stats_close(out, K.softmax_stats_reference(logits, torch.tensor([1.0, 0.5, 2.0, 1.0], device=DEVICE)))
    assert out.probs[0, :5000].eq(0).all() and out.probs[1, ::3].eq(0).all()
    assert out.probs[2, 12345] == 1 and out.probs[2].sum() == 1
    assert out.max_prob[2] == 1 and out.entropy[2] == 0 and out.lse[2] == 1.25


def test_softmax_stats_all_equal():
    v = 49152
    logits = torch.full((2, v), 3.0, device=DEVICE)
    out = K.fused_softmax_stats(logits, torch.tensor([1.0, 2.0], device=DEVICE))
    assert_stats_close(out, K.softmax_stats_reference(logits, torch.tensor([1.0, 2.0], device=DEVICE)))
    torch.testing.assert_close(out.probs, torch.full_like(logits, 1 / v))
    torch.testing.assert_close(out.max_prob, torch.full((2,), 1 / v, device=DEVICE))
    torch.testing.assert_close(out.entropy, torch.full((2,), math.log(v), device=DEVICE))
    torch.testing.assert_close(out.lse, torch.tensor([3.0, 1.5], device=DEVICE) + math.log(v))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter: -inf - -inf
def test_softmax_stats_all_minus_inf_is_nan_like_the_reference():
    logits = torch.full((1, 3000), float("-inf"), device=DEVICE)
    assert K.fused_softmax_stats(logits, 1.0).probs.isnan().all()
    assert K.softmax_stats_reference(logits, 1.0).probs.isnan().all()


def test_softmax_stats_rejects_empty_rows():
    for bad in (torch.zeros(2, 0, device=DEVICE), torch.zeros(5, device=DEVICE)):
        for fn in (K.fused_softmax_stats, K.softmax_stats_reference):
            with pytest.raises(ValueError, match=r"logits must be \[N, V\] with V > 0"):
                fn(bad, 1.0)
    assert K.fused_softmax_stats(torch.zeros(0, 10, device=DEVICE), 1.0).probs.shape == (0, 10)


# ------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 576), (7, 1000), (2, 4096)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(shape, dtype):
    x = randn(*shape, dtype=dtype, scale=3.0)
    weight = (1 + 0.3 * randn(shape[-1])).to(dtype)
    out = K.rms_norm(x, weight, 1e-5)
    assert_close(out, K.rms_norm_reference(x.float(), weight.float(), 1e-5), dtype)


def test_rms_norm_of_a_strided_view():
    x = randn(4, 3, 200)[:, 1]
    weight = randn(200)
    assert_close(K.rms_norm(x, weight, 1e-6), K.rms_norm_reference(x, weight, 1e-6), torch.float32)


# ---------------------------------------------------------------- SiLU and multiply


@pytest.mark.parametrize("shape", [(1, 1536), (4, 7, 300), (3, 2500)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(shape, dtype):
    projected = randn(*shape[:-1], 2 * shape[-1], dtype=dtype, scale=3.0)
    gate, up = projected.chunk(2, dim=-1)  # row-strided views, as the MLP has them
    assert_close(K.silu_mul(gate, up), K.silu_mul_reference(gate.float(), up.float()), dtype)


# ------------------------------------------------------------------------ rotary


def rotary_tables(positions: torch.Tensor, d: int):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("b, hq, hkv, t, d", [(1, 4, 4, 1, 64), (2, 9, 3, 7, 64), (3, 16, 2, 5, 80),
                                              (1, 8, 1, 3, 128)])
@pytest.mark.parametrize("per_sequence", [True, False], ids=["positions[B,T]", "positions[T]"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rotary(b, hq, hkv, t, d, per_sequence, dtype):
    # q and k laid out as the attention makes them: [B, T, H, D] projections, transposed
    q = randn(b, t, hq, d, dtype=dtype).transpose(1, 2)
    k = randn(b, t, hkv, d, dtype=dtype).transpose(1, 2)
    positions = (torch.arange(t, device=DEVICE) + torch.tensor([[0], [17], [300]], device=DEVICE)[:b]
                 if per_sequence else torch.arange(5, 5 + t, device=DEVICE))
    cos, sin = (x.to(dtype) for x in rotary_tables(positions, d))
    q_out, k_out = K.apply_rotary(q, k, cos, sin)
    q_ref, k_ref = K.apply_rotary_reference(q.float(), k.float(), cos.float(), sin.float())
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)


# -------------------------------------------------------------- quantised matmul


def linear(n: int, k: int) -> torch.nn.Linear:
    lin = torch.nn.Linear(k, n, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.05)
    return lin


@pytest.mark.parametrize("m", [1, 5, 16, 33])
@pytest.mark.parametrize("n, k", [(40, 64), (100, 200), (576, 576)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_matmul_int8(m, n, k, dtype):
    q = quantize.Int8Linear.from_float(linear(n, k)).to(DEVICE)
    x = randn(m, k, dtype=dtype)
    out = K.quant_matmul(x, q.weight, q.scales)
    ref = x.float() @ q.dequantize().t()
    assert_close(out, ref, dtype, scale=ref.abs().max())
    if dtype == torch.float32:
        assert_close(out, K.quant_matmul_reference(x, q.weight, q.scales), dtype, scale=ref.abs().max())


@pytest.mark.parametrize("m", [1, 5, 16, 33])
@pytest.mark.parametrize("n, k, group_size", [(40, 96, 32), (100, 320, 64), (72, 384, 128), (48, 640, 32)],
                         ids=["3x32", "5x64", "3x128", "20x32"])  # groups per row, and their size
@pytest.mark.parametrize("dtype", DTYPES)
def test_quant_matmul_int4(m, n, k, group_size, dtype):
    q = quantize.Int4Linear.from_float(linear(n, k), group_size).to(DEVICE)
    x = randn(m, k, dtype=dtype)
    out = K.quant_matmul(x, q.qweight, q.scales, q.zeros, group_size)
    ref = x.float() @ q.dequantize().t()
    assert_close(out, ref, dtype, scale=ref.abs().max())
    if dtype == torch.float32:
        assert_close(out, K.quant_matmul_reference(x, q.qweight, q.scales, q.zeros, group_size), dtype,
                     scale=ref.abs().max())


def test_quant_matmul_keeps_leading_dims():
    q = quantize.Int4Linear.from_float(linear(24, 64), 32).to(DEVICE)
    x = randn(2, 3, 64)
    out = K.quant_matmul(x, q.qweight, q.scales, q.zeros, 32)
    assert out.shape == (2, 3, 24)
    assert_close(out, x @ q.dequantize().t(), torch.float32, scale=out.abs().max())


def test_quant_matmul_rejects_bad_formats():
    q = quantize.Int4Linear.from_float(linear(24, 64), 32).to(DEVICE)
    x = randn(2, 64)
    with pytest.raises(ValueError, match="INT4 needs zeros and a group_size"):
        K.quant_matmul(x, q.qweight, q.scales)
    with pytest.raises(ValueError, match="group_size=48"):
        K.quant_matmul(x, q.qweight, q.scales, q.zeros, 48)
    with pytest.raises(ValueError, match="qweight must be int8"):
        K.quant_matmul(x, q.dequantize(), q.scales)
    with pytest.raises(ValueError, match="INT8 needs"):
        K.quant_matmul(x, torch.zeros(24, 32, dtype=torch.int8, device=DEVICE), torch.ones(24, device=DEVICE))


# ------------------------------------------------------------- decode attention


# batch, query heads, KV heads (GQA ratio 1, 3, 8), cache length, head dim, lengths, cache rows
ATTENTION_CASES = {
    "b1-gqa1-two-splits": (1, 4, 4, 200, 64, [77], None),
    "gqa3-ragged-slots": (3, 9, 3, 150, 64, [1, 150, 77], [4, 0, 2]),
    "gqa8-long": (2, 16, 2, 300, 128, [300, 129], None),
    "gqa8-short-cache": (4, 8, 1, 40, 64, [3, 40, 17, 1], [5, 1, 2, 0]),
    "d80": (2, 6, 2, 100, 80, [5, 100], [1, 0]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention(case, dtype):
    b, hq, hkv, s, d, lengths, slots = ATTENTION_CASES[case]
    rows = b if slots is None else max(slots) + 2  # a pool with rows nobody reads
    q = randn(b, hq, d, dtype=dtype)
    k_cache, v_cache = randn(rows, hkv, s, d, dtype=dtype, scale=2.0), randn(rows, hkv, s, d, dtype=dtype)
    lengths = torch.tensor(lengths, device=DEVICE)
    slots = None if slots is None else torch.tensor(slots, device=DEVICE)
    out = K.decode_attention(q, k_cache, v_cache, lengths, slots)
    ref = K.decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), lengths, slots)
    assert_close(out, ref, dtype, scale=ref.abs().max())


def test_decode_attention_matches_a_plain_softmax():
    b, hq, hkv, s, d = 2, 6, 2, 70, 64
    q, k_cache, v_cache = randn(b, hq, d), randn(b, hkv, s, d), randn(b, hkv, s, d)
    lengths = torch.tensor([70, 33], device=DEVICE)
    out = K.decode_attention(q, k_cache, v_cache, lengths)
    for i in range(b):
        n = int(lengths[i])
        keys = k_cache[i, :, :n].repeat_interleave(hq // hkv, 0)
        values = v_cache[i, :, :n].repeat_interleave(hq // hkv, 0)
        weights = torch.softmax((keys @ q[i, :, :, None])[..., 0] / math.sqrt(d), dim=-1)
        assert_close(out[i], (weights[:, None] @ values)[:, 0], torch.float32)


def test_decode_attention_rejects_bad_lengths_and_shapes():
    q, cache = randn(2, 4, 64), randn(3, 2, 50, 64)
    slots = torch.tensor([2, 0], device=DEVICE)
    for lengths in ([0, 10], [51, 10]):
        with pytest.raises(ValueError, match=r"every length must be in 1\.\.50"):
            K.decode_attention(q, cache, cache, torch.tensor(lengths), slots)
    with pytest.raises(ValueError, match="do not fit"):
        K.decode_attention(randn(2, 3, 64), cache, cache, torch.tensor([1, 1], device=DEVICE), slots)
    with pytest.raises(ValueError, match="do not fit"):
        K.decode_attention(q, cache, cache, torch.tensor([1, 1], device=DEVICE))  # 3 rows, no slots


# ---------------------------------------------------------- the model through them


def counted(fn, name, calls):
    def call(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return call


@pytest.mark.parametrize("quantize_mode", ["none", "int8", "int4"])
def test_tiny_model_through_the_kernels(quantize_mode, tiny_llama, monkeypatch):
    """What the runtime does on CUDA, on a tiny random Llama: RMSNorm, rotary, SiLU,
    decode attention over the slot cache, the quantised matmuls (taken off torch's CPU
    ops, as on a GPU) and the sampler's softmax statistics, all through the kernels."""
    monkeypatch.setattr(quantize, "_CPU_FAST_DTYPES", ())
    calls = collections.Counter()
    for module, name in [(K, "rms_norm"), (K, "apply_rotary"), (K, "silu_mul"), (K, "decode_attention"),
                         (quantize, "quant_matmul"), (sampling, "softmax_stats")]:
        monkeypatch.setattr(module, name, counted(getattr(module, name), name, calls))
    ckpt = load_checkpoint(tiny_llama)
    model = build_model(ckpt, quantize_mode, device=DEVICE)
    prompts = [ckpt.tokenizer.encode("The quick brown fox", add_special=False),
               ckpt.tokenizer.encode("Once upon a time there was a model", add_special=False)]
    assert len(prompts[0]) != len(prompts[1])
    with dispatch.using("triton"):
        tokens, logits, stats = greedy_decode(model, prompts, [2, 0], 8, DEVICE)
    layers = model.config.num_layers  # 9 forward passes: 2 prefills, 7 decode steps
    assert calls["rms_norm"] == 9 * (2 * layers + 1) and calls["decode_attention"] == 7 * layers
    assert calls["apply_rotary"] == calls["silu_mul"] == 9 * layers and calls["softmax_stats"] == 9
    assert calls["quant_matmul"] == (0 if quantize_mode == "none" else 4 * 9 * layers)
    with dispatch.using("reference"):
        ref_tokens, ref_logits, ref_stats = greedy_decode(model, prompts, [2, 0], 8, DEVICE)
    assert tokens == ref_tokens
    atol = 1e-4 if quantize_mode == "none" else 2e-2  # bf16 activations into the quantised matmuls
    for out, ref in zip(logits, ref_logits):
        torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    torch.testing.assert_close(stats, ref_stats, atol=atol, rtol=0)
