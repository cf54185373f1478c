"""Triton kernels: every kernel against its torch reference under Triton's interpreter,
the switch between them, and (with CUDA) the demo model generating through them.

The kernel cases live in tests/kernel_cases.py and run in a child pytest with
TRITON_INTERPRET=1: the variable has to be set before triton is imported, and the rest
of the suite runs without it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.runtime import kernels as K
from inference.runtime.kernels import dispatch
from tests.helpers.models import greedy_decode

CASES = Path(__file__).with_name("kernel_cases.py")
REPO = CASES.parent.parent


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIGIL_KERNELS")}
    return env | extra


def run_cases(**env) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                          cwd=REPO, env=child_env(**env), capture_output=True, text=True, timeout=540)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(summary)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert re.fullmatch(r"=* ?\d+ passed(, \d+ warnings?)? in .*", summary), summary  # none failed or skipped


def test_kernel_cases_under_the_triton_interpreter():
    assert importlib.util.find_spec("triton"), "triton is not installed (a test extra of pyproject.toml)"
    run_cases(TRITON_INTERPRET="1")


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and triton")
def test_kernel_cases_on_cuda():
    run_cases()


@pytest.mark.skipif(torch.cuda.is_available() or dispatch.INTERPRET, reason="CPU-only, without the interpreter")
def test_cpu_runtime_runs_plain_torch():
    """No triton import, `active` off, and every kernel function gives its reference's
    result exactly: the CPU runtime's code is what it was before the kernels."""
    code = ("import sys, inference.api.server; from inference.runtime.kernels import dispatch; "
            "assert not dispatch.active and 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), check=True)
    assert not dispatch.active
    torch.manual_seed(0)
    x, w = torch.randn(3, 64), torch.randn(64)
    assert torch.equal(K.rms_norm(x, w, 1e-5), K.rms_norm_reference(x, w, 1e-5))
    assert torch.equal(K.silu_mul(x, -x), K.silu_mul_reference(x, -x))
    logits = torch.randn(2, 100)
    for a, b in zip(K.fused_softmax_stats(logits, 0.8), K.softmax_stats_reference(logits, 0.8)):
        assert torch.equal(a, b)


@pytest.mark.skipif(dispatch.INTERPRET, reason="checks the switch without the interpreter")
def test_kernel_mode_switch():
    with pytest.raises(ValueError, match="not one of auto, triton, reference"):
        dispatch.set_mode("fast")
    assert dispatch.mode() == "auto"
    with dispatch.using("reference"):
        assert dispatch.mode() == "reference" and not dispatch.active
        assert not dispatch.use_triton(torch.zeros(1))
    assert dispatch.mode() == "auto"
    with dispatch.using("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-5)  # a CPU tensor without the interpreter
    code = "from inference.runtime.kernels import dispatch; print(dispatch.mode())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(VIGIL_KERNELS="reference"),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "reference"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize_mode", ["none", "int4"])
def test_demo_generates_the_same_greedy_tokens_through_kernels_and_references(quantize_mode, demo_gguf):
    """The demo model on the GPU, 32 greedy tokens for two prompts of different lengths
    decoded together, through the Triton kernels and through the torch references."""
    from inference.runtime.loading import build_model, load_checkpoint

    ckpt = load_checkpoint(demo_gguf)
    model = build_model(ckpt, quantize_mode, device="cuda")
    tok = ckpt.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special=False)
               for q in ("What is the capital of France?", "Write a haiku about a lighthouse in winter.")]
    with dispatch.using("triton"):
        tokens = greedy_decode(model, prompts, [3, 1], 32, "cuda")[0]
    with dispatch.using("reference"):
        ref_tokens = greedy_decode(model, prompts, [3, 1], 32, "cuda")[0]
    assert tokens == ref_tokens, f"kernels {tok.decode(tokens[0])!r}\nreference {tok.decode(ref_tokens[0])!r}"
