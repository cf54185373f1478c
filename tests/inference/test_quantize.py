import numpy as np
import pytest
import torch
from torch import nn

from inference.runtime.quantize import (
    Int4Linear, Int8Linear, dequantize_int4, int4_matmul, pack_int4, q4_blocks_to_groups,
    quantize_model, unpack_int4,
)



def _linear(n, k, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    return lin


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------- INT8

@pytest.mark.parametrize("n,k", [(64, 128), (7, 5), (576, 576), (1536, 576)])
def test_int8_matches_dequantised_and_float(n, k):
    lin = _linear(n, k)
    q = Int8Linear.from_float(lin)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (n, k) and q.scales.shape == (n,)
    x = torch.randn(3, k)
    y = q(x)
    ref_q = x.double() @ q.dequantize().double().t()
    assert _rel(y, ref_q) < 1e-5
    # per-channel int8 of N(0, s) weights: ~0.8% relative output error; bound 2%
    assert _rel(y, lin(x)) < 2e-2


def test_int8_leading_dims_and_bf16():
    lin = _linear(96, 64)
    q = Int8Linear.from_float(lin)
    x = torch.randn(2, 3, 5, 64)
    y = q(x)
    assert y.shape == (2, 3, 5, 96)
    assert torch.allclose(y.reshape(-1, 96), q(x.reshape(-1, 64)), atol=0, rtol=0)
    yb = q(x.to(torch.bfloat16))  # scales cast to bf16 by int8_matmul
    assert yb.dtype == torch.bfloat16 and _rel(yb, y) < 1e-2
    qb = Int8Linear.from_float(lin).to(torch.bfloat16)  # buffers cast with the model
    assert qb.weight.dtype == torch.int8 and qb.scales.dtype == torch.bfloat16
    assert _rel(qb(x.to(torch.bfloat16)), y) < 1e-2


# ----------------------------------------------------------------------- INT4

def test_pack_roundtrip_and_nibble_order():
    q = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (4, 32) and p.dtype == torch.uint8
    assert torch.equal(p[:, 0] & 0xF, q[:, 0]) and torch.equal(p[:, 0] >> 4, q[:, 1])
    assert torch.equal(unpack_int4(p), q)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(64, 128), (40, 256), (576, 1536)])
def test_int4_matches_dequantised_and_float(n, k, g):
    lin = _linear(n, k)
    q = Int4Linear.from_float(lin, g)
    assert q.qweight.shape == (n, k // 2) and q.scales.shape == (n, k // g) == q.zeros.shape
    x = torch.randn(4, k)
    y = q(x)
    w = q.dequantize()
    # the CPU int4pack kernel with fp32 activations and fp32 scales is fp32-accurate
    assert _rel(y, x.double() @ w.double().t()) < 1e-5
    # min/max asymmetric int4: ~0.08 (g32) to ~0.10 (g128) relative error; bound 0.15
    assert _rel(y, lin(x)) < 0.15
    # the portable fallback (what non-CPU devices run) agrees
    y_fb = int4_matmul(x, q.qweight, q.scales, q.zeros, g)
    assert _rel(y_fb, y) < 1e-5


def test_int4_leading_dims_batch_and_bf16():
    lin = _linear(48, 128)
    q = Int4Linear.from_float(lin, 32)
    x = torch.randn(2, 16, 128)
    y = q(x)
    assert y.shape == (2, 16, 48)
    assert torch.allclose(y[1, 3], q(x[1, 3]), rtol=1e-5, atol=1e-6)  # 1-D input too
    yb = q(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and _rel(yb, y) < 1e-2


def test_int4_rows_not_multiple_of_16():
    # the CPU pack op needs N % 16 == 0: rows are padded and the output sliced
    lin = _linear(5, 64)
    q = Int4Linear.from_float(lin, 32)
    x = torch.randn(3, 64)
    y = q(x)
    assert y.shape == (3, 5)
    assert _rel(y, x.double() @ q.dequantize().double().t()) < 1e-5


def test_int4_bad_shapes_and_group_size():
    with pytest.raises(ValueError, match="group_size=48"):
        Int4Linear.from_float(_linear(16, 96), 48)
    with pytest.raises(ValueError, match="in_features=96 is not divisible by group_size=64"):
        Int4Linear.from_float(_linear(16, 96), 64)
    with pytest.raises(ValueError, match="0..15"):
        Int4Linear.from_groups(torch.full((16, 32), 16), torch.ones(16, 1), torch.zeros(16, 1), 32)


def test_int4_state_dict_roundtrip():
    src = nn.Sequential(_linear(32, 64, seed=1))
    quantize_model(src, "int4", group_size=32)
    sd = src.state_dict()
    assert set(sd) == {"0.qweight", "0.scales", "0.zeros"}  # only the portable format
    dst = nn.Sequential(Int4Linear(64, 32, 32))
    dst.load_state_dict(sd)  # the CPU layout is rebuilt by a post-hook
    x = torch.randn(2, 64)
    assert torch.equal(dst(x), src(x))


@pytest.mark.parametrize("n,k,g", [(40, 256, 64), (5, 64, 32), (576, 1536, 32)])
def test_int4_keeps_one_copy_of_the_codes_on_cpu(n, k, g):
    gen = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale, zero = torch.rand(n, k // g, generator=gen) / 100, torch.randn(n, k // g, generator=gen) / 100
    q = Int4Linear.from_groups(codes, scale, zero, g, compute_dtype=torch.bfloat16)
    assert q._buffers["qweight"] is None and q._cpu_qweight is not None  # only the CPU layout
    x = torch.randn(3, k)
    y = q(x)
    sd = q.state_dict()  # the portable codes, derived exactly, and not kept
    assert torch.equal(sd["qweight"], pack_int4(codes)) and q._buffers["qweight"] is None
    dst = Int4Linear(k, n, g, compute_dtype=torch.bfloat16)
    dst.load_state_dict(sd)
    assert dst._buffers["qweight"] is None and torch.equal(dst(x), y)
    assert torch.equal(q.qweight, pack_int4(codes))  # asked for: derived and kept
    w = dequantize_int4(pack_int4(codes), scale, zero, g).double()
    assert _rel(int4_matmul(x, q.qweight, q.scales, q.zeros, g), x.double() @ w.t()) < 1e-5  # the portable path
    assert _rel(y, x.double() @ w.t()) < 1e-2  # bf16 activations and scales


# ----------------------------------------------------------------------- model

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"q_proj": _linear(64, 64, i), "down_proj": _linear(64, 128, i + 9)}) for i in range(2))
        self.norm = nn.LayerNorm(64)
        self.lm_head = _linear(100, 64, 5)


@pytest.mark.parametrize("mode,cls", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantize_model(mode, cls):
    m = quantize_model(_Tiny(), mode, group_size=64, skip=("lm_head", "layers.1.q_proj"))
    assert isinstance(m.layers[0]["q_proj"], cls) and isinstance(m.layers[0]["down_proj"], cls)
    assert isinstance(m.layers[1]["down_proj"], cls)
    assert type(m.layers[1]["q_proj"]) is nn.Linear and type(m.lm_head) is nn.Linear
    assert isinstance(m.norm, nn.LayerNorm)


def test_quantize_model_errors():
    m = _Tiny()
    assert quantize_model(m, "none") is m and type(m.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="int3"):
        quantize_model(m, "int3")
    with pytest.raises(ValueError, match="group_size=16"):
        quantize_model(m, "int4", group_size=16)
    m = _Tiny()
    with pytest.raises(ValueError, match=r"(lm_head|q_proj): in_features=64 is not divisible by group_size=128"):
        quantize_model(m, "int4", group_size=128)
    assert not any(isinstance(x, (Int4Linear, Int8Linear)) for x in m.modules())  # left untouched


# ----------------------------------------------------------------------- GGUF

def test_q4_0_maps_exactly():
    import gguf.quants as gq
    from gguf import GGMLQuantizationType as T
    w = np.random.default_rng(0).normal(0, 0.02, (32, 128)).astype(np.float32)
    raw = gq.quantize(w, T.Q4_0)
    q, s, z = q4_blocks_to_groups(raw, "Q4_0")
    assert q.shape == (32, 128) and s.shape == z.shape == (32, 4) and not z.any()
    ref = gq.dequantize(raw, T.Q4_0)
    assert np.array_equal(Int4Linear.from_groups(q, s, z, 32).dequantize().numpy(), ref)


def test_q4_blocks_bad_kind():
    with pytest.raises(ValueError, match="Q8_0"):
        q4_blocks_to_groups(np.zeros((1, 34), np.uint8), "Q8_0")


def test_q4_1_gguf_maps_exactly(demo_gguf):
    import gguf
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(demo_gguf)
    tensors = [t for t in reader.tensors if t.tensor_type.name == "Q4_1"]
    assert tensors, "no Q4_1 tensors in the demo GGUF"
    for t in tensors[:9] + tensors[-9:]:  # every shape; all 210 pass too, in ~1 s
        q, s, z = q4_blocks_to_groups(t.data, "Q4_1")
        mod = Int4Linear.from_groups(q, s, z, 32)
        ref = dequantize(t.data, t.tensor_type)
        w = mod.dequantize()
        assert np.array_equal(w.numpy(), ref), t.name  # bit-exact fp32
        x = torch.randn(2, w.shape[1])
        assert _rel(mod(x), x.double() @ torch.from_numpy(ref).double().t()) < 1e-5, t.name


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compute_dtype_bf16(mode):
    # fp32 activations run the fast bf16 CPU kernel; the product stays bf16
    m = quantize_model(nn.Sequential(_linear(64, 128)), mode, group_size=32, compute_dtype=torch.bfloat16)
    assert m[0].compute_dtype == torch.bfloat16
    x = torch.randn(3, 128)
    y = m(x)
    assert y.dtype == torch.bfloat16
    w = m[0].dequantize().double()
    assert torch.equal(y, m[0](x.bfloat16()))
    assert _rel(y, x.double() @ w.t()) < 1e-2  # bf16 activations and scales: ~0.3%
