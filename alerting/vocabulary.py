"""The detector and feature names a rule may match, and the windowed metrics a rule may
name. `check-rules` rejects a name that is not here (a typo in a rule would otherwise
match nothing, silently).

These are the names the stream processors publish on vigil.signals (issue 6) and that
protos/events.proto's Signal comments list: keep the three in step. Where two names are
current for one thing, both are kept: a feature by its short name and by the
InferenceEvent field it is read from (latency and total_seconds, ttft and
first_token_seconds), ECE as `ece`/`ece_equal_mass` and as calibration.summary()'s
`ece_width`/`ece_mass`, completion length as `completion_length` and quality.py's
`mean_length`. A deployment with detectors of its own extends the vocabulary with
`check-rules --detector NAME --feature NAME` or `Vocabulary.extended(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DETECTORS = frozenset({
    # drift detectors (stream_processors/detectors/*.py `name`), and the trend test (trend.py)
    "adwin", "ks", "psi", "page_hinkley", "chi2", "mann_kendall",
    # a candidate version against the stable one over the same period (compare.py)
    "ks_vs_stable", "chi2_vs_stable",
    # quality against the version's baseline (z-scores)
    "zscore",
    # windowed measurements (statistic = the measured value)
    "ece", "ece_equal_mass", "brier", "accuracy", "error_rate", "quantile",
    # calibration.py summary() names
    "ece_width", "ece_mass",
    # latency quantiles as stream_processors/processor.py names them (feature total_seconds
    # or first_token_seconds, statistic the quantile in seconds)
    "p50", "p95", "p99",
})

FEATURES = frozenset({
    "prompt_tokens", "completion_tokens", "mean_logprob", "mean_entropy", "min_top1_prob",
    "latency", "ttft", "error", "finish_reason",
    # the inference event's own field names for the same measurements
    "total_seconds", "first_token_seconds", "queue_seconds",
    # quality.py METRICS (mean_length is its name for completion_length)
    "distinct_1", "distinct_2", "token_entropy", "completion_length", "mean_length",
    "latency_p50", "latency_p95", "latency_p99", "ttft_p50", "ttft_p95", "ttft_p99",
    "confidence", "label", "top_label_prob",
})

# Feature names with a free suffix (Classify's probability of a label).
FEATURE_PREFIXES = ("label:",)

# Windowed metrics by name: the signals they are computed from and the default aggregate.
METRICS = {
    "error_rate": {"detector": "error_rate", "feature": "error", "aggregate": "last"},
    "ece": {"detector": "ece", "aggregate": "last"},
    "brier": {"detector": "brier", "aggregate": "last"},
    "accuracy": {"detector": "accuracy", "aggregate": "last"},
    # latency quantiles as stream_processors/processor.py publishes them
    "latency_p50": {"detector": "p50", "feature": "total_seconds", "aggregate": "max"},
    "latency_p95": {"detector": "p95", "feature": "total_seconds", "aggregate": "max"},
    "latency_p99": {"detector": "p99", "feature": "total_seconds", "aggregate": "max"},
    "ttft_p99": {"detector": "p99", "feature": "first_token_seconds", "aggregate": "max"},
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
