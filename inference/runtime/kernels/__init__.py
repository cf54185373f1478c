"""Triton kernels for the hot paths of the runtime, each beside its torch reference.

Every public function takes and returns torch tensors and runs its Triton kernel or its
torch reference (`<name>_reference`, same signature), as `dispatch` decides: Triton on
CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1; VIGIL_KERNELS=reference (or
`dispatch.set_mode`) forces the references.
"""

from inference.runtime.kernels import dispatch
from inference.runtime.kernels.decode_attention import decode_attention, decode_attention_reference
from inference.runtime.kernels.quant_matmul import quant_matmul, quant_matmul_reference
from inference.runtime.kernels.rms_norm import rms_norm, rms_norm_reference
from inference.runtime.kernels.rotary import apply_rotary, apply_rotary_reference
from inference.runtime.kernels.silu_mul import silu_mul, silu_mul_reference
from inference.runtime.kernels.softmax_stats import SoftmaxStats, fused_softmax_stats, softmax_stats_reference

__all__ = [
    "SoftmaxStats", "apply_rotary", "apply_rotary_reference", "decode_attention", "decode_attention_reference",
    "dispatch", "fused_softmax_stats", "quant_matmul", "quant_matmul_reference", "rms_norm", "rms_norm_reference",
    "silu_mul", "silu_mul_reference", "softmax_stats_reference",
]
