"""The detector and feature names a rule may match, and the windowed metrics a rule may
name. `check-rules` rejects a name that is not here (a typo in a rule would otherwise
match nothing, silently).

These are the names the stream processors publish on vigil.signals (issue 6): keep the
two in step. A deployment with detectors of its own extends the vocabulary with
`check-rules --detector NAME --feature NAME` or `Vocabulary.extended(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DETECTORS = frozenset({
    # drift detectors
    "adwin", "ks", "psi", "page_hinkley", "chi2", "mann_kendall",
    # quality against the version's baseline (z-scores)
    "zscore",
    # windowed measurements (statistic = the measured value)
    "ece", "ece_equal_mass", "brier", "accuracy", "error_rate", "quantile",
})

FEATURES = frozenset({
    "prompt_tokens", "completion_tokens", "mean_logprob", "mean_entropy", "min_top1_prob",
    "latency", "ttft", "error", "finish_reason",
    # the inference event's own field names for the same measurements
    "total_seconds", "first_token_seconds", "queue_seconds",
    "distinct_1", "distinct_2", "token_entropy", "completion_length",
    "latency_p50", "latency_p95", "latency_p99", "ttft_p50", "ttft_p95", "ttft_p99",
    "confidence", "label",
})

# Feature names with a free suffix (Classify's probability of a label).
FEATURE_PREFIXES = ("label:",)

# Windowed metrics by name: the signals they are computed from and the default aggregate.
METRICS = {
    "error_rate": {"detector": "error_rate", "feature": "error", "aggregate": "last"},
    "ece": {"detector": "ece", "aggregate": "last"},
    "brier": {"detector": "brier", "aggregate": "last"},
    "accuracy": {"detector": "accuracy", "aggregate": "last"},
    "latency_p50": {"detector": "quantile", "feature": "latency_p50", "aggregate": "max"},
    "latency_p95": {"detector": "quantile", "feature": "latency_p95", "aggregate": "max"},
    "latency_p99": {"detector": "quantile", "feature": "latency_p99", "aggregate": "max"},
    "ttft_p99": {"detector": "quantile", "feature": "ttft_p99", "aggregate": "max"},
}

AGGREGATES = ("last", "mean", "max", "min", "sum", "count")


@dataclass(frozen=True)
class Vocabulary:
    detectors: frozenset = DETECTORS
    features: frozenset = FEATURES
    feature_prefixes: tuple = FEATURE_PREFIXES
    metrics: dict = field(default_factory=lambda: dict(METRICS))

    def extended(self, detectors=(), features=()) -> "Vocabulary":
        return Vocabulary(self.detectors | frozenset(detectors), self.features | frozenset(features),
                          self.feature_prefixes, self.metrics)

    def knows(self, kind: str, name: str) -> bool:
        if kind == "detector":
            return name in self.detectors
        if kind == "feature":
            return name in self.features or name.startswith(self.feature_prefixes)
        return True

    def names(self, kind: str):
        return sorted(self.detectors if kind == "detector" else self.features)


DEFAULT = Vocabulary()
