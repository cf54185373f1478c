"""Which implementation the kernel functions run: their Triton kernel or their torch reference.

The mode comes from VIGIL_KERNELS, read once at import, or from `set_mode`:
  auto       Triton on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (Triton's
             interpreter, for tests); the torch reference elsewhere. The default.
  triton     the same, but an error where Triton can't run instead of the reference.
  reference  the torch reference everywhere (for comparison on a GPU).

Triton is imported only where it can run (CUDA present, or TRITON_INTERPRET=1, which
must be set before the import). `active` says, without a call, whether it may run at
all in this process: on a CPU-only machine it is False and the runtime's torch code
runs as if this package did not exist.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

MODES = ("auto", "triton", "reference")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class _NoTriton:
    """Stands in for `triton` and `triton.language` where Triton can't run, so that the
    kernel modules import all the same; only their torch references run then."""

    constexpr = None

    @staticmethod
    def jit(fn):
        return fn


triton = tl = _NoTriton()
if INTERPRET or torch.cuda.is_available():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        pass
AVAILABLE = not isinstance(triton, _NoTriton)

_mode = "auto"
active = False


def set_mode(mode: str) -> str:
    """Switch every kernel function to `mode` (one of MODES); returns the previous mode."""
    global _mode, active
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {', '.join(MODES)}")
    previous, _mode = _mode, mode
    active = AVAILABLE and mode != "reference"
    return previous


def mode() -> str:
    return _mode


@contextlib.contextmanager
def using(mode: str):
    """Run a block in `mode`, then switch back."""
    previous = set_mode(mode)
    try:
        yield
    finally:
        set_mode(previous)


def use_triton(x: torch.Tensor) -> bool:
    """Whether a kernel function runs its Triton kernel on `x`."""
    if active and (x.is_cuda or INTERPRET):
        return True
    if _mode == "triton":
        raise RuntimeError(f"kernel mode 'triton', but Triton can't run on a {x.device} tensor here: "
                           "it needs triton installed, and CUDA tensors or TRITON_INTERPRET=1")
    return False


def dot_options(dtype: torch.dtype) -> dict:
    """DOT_DTYPE and PRECISION, the constexprs of a kernel that multiplies `dtype` operands
    with tl.dot: fp32 exactly (not TF32) for fp32; and fp32 for bf16 under the interpreter,
    whose dot multiplies the raw bits of bf16 values (products of bf16 are exact in fp32)."""
    if dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16):
        return dict(DOT_DTYPE=tl.float32, PRECISION="ieee")
    return dict(DOT_DTYPE={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype], PRECISION="tf32")


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, which size the grids of split kernels."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few, so that the tests take the split paths too


set_mode(os.environ.get("VIGIL_KERNELS", "auto"))
