"""Token sampling with per-request parameters, and the confidence of every choice.

The softmax that sampling needs also gives, in the same pass, the statistics a
response's confidence summary is made of: the top-1 probability and the entropy of
each step's distribution, and the log-probability of the token chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from inference.runtime.kernels import SoftmaxStats, fused_softmax_stats  # noqa: F401 (SoftmaxStats: re-exported)

# logits [N, V] -> SoftmaxStats: Triton on CUDA, its torch reference (in inference.runtime.kernels) elsewhere
softmax_stats = fused_softmax_stats


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0            # 0 is off
    top_p: float = 1.0        # 1 is off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self, max_tokens_limit: int) -> None:
        """Raise ValueError naming the first field out of range (the stop strings' sizes are
        input limits, checked by the serving layer)."""
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise ValueError(f"max_tokens: {self.max_tokens} is outside [1, {max_tokens_limit}]")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise ValueError(f"temperature: {self.temperature} is outside [0, 100]")
        if self.top_k < 0:
            raise ValueError(f"top_k: {self.top_k} is negative")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: {self.top_p} is outside (0, 1]")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: {self.seed} is outside [0, 2^63)")


class Choice(NamedTuple):
    token: int
    logprob: float
    entropy: float
    top1_prob: float


class Sampler:
    """Chooses the next token of each row; one generator per seeded request."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = None
        if params.temperature > 0 and params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0.0


def sample(logits: torch.Tensor, samplers: list[Sampler]) -> list[Choice]:
    """One token for each row of `logits` [N, V], row i drawn by samplers[i]."""
    temps = torch.tensor([s.params.temperature or 1.0 for s in samplers], device=logits.device)
    stats = softmax_stats(logits, temps)
    tokens = logits.argmax(-1)
    for i, s in enumerate(samplers):
        if not s.greedy:
            tokens[i] = torch.multinomial(filter_top_k_top_p(stats.probs[i], s.params), 1, generator=s.generator)[0]
    logprobs = logits.float().gather(1, tokens[:, None]).squeeze(1) / temps - stats.lse
    return [Choice(*row) for row in zip(tokens.tolist(), logprobs.tolist(), stats.entropy.tolist(),
                                         stats.max_prob.tolist())]


def filter_top_k_top_p(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`probs` with everything outside the top-k and the top-p nucleus set to zero."""
    k = params.top_k if 0 < params.top_k < probs.numel() else probs.numel()
    if k == probs.numel() and params.top_p >= 1.0:
        return probs
    top, idx = probs.topk(k)
    if params.top_p < 1.0:
        before = top.cumsum(0) - top
        top = torch.where(before < params.top_p, top, torch.zeros_like(top))
    return torch.zeros_like(probs).scatter_(0, idx, top)
