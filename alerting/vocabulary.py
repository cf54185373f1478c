"""What a rule may name: the series the stream processors publish (the signal contract,
``eventbus/signals.py``) and the windowed metrics over them. `check-rules` rejects a
detector, a feature or a pair of them that nothing publishes, since such a rule would
match nothing, silently. A deployment with detectors of its own extends the vocabulary
with `check-rules --detector NAME --feature NAME` or `Vocabulary.extended(...)`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from eventbus.signals import PUBLISHED, Detector, Feature

# Windowed metrics by name: the series they aggregate and the default aggregate.
METRICS = {
    "error_rate": {"detector": Detector.ERROR_RATE, "feature": Feature.ERROR, "aggregate": "last"},
    "ece": {"detector": Detector.ECE, "feature": Feature.LABEL, "aggregate": "last"},
    "brier": {"detector": Detector.BRIER, "feature": Feature.LABEL, "aggregate": "last"},
    "accuracy": {"detector": Detector.ACCURACY, "feature": Feature.LABEL, "aggregate": "last"},
    "feedback_score": {"detector": Detector.MEAN, "feature": Feature.SCORE, "aggregate": "last"},
    **{f"{name}_{q}": {"detector": Detector(q), "feature": feature, "aggregate": "max"}
       for name, feature in (("latency", Feature.TOTAL_SECONDS), ("ttft", Feature.FIRST_TOKEN_SECONDS))
       for q in ("p50", "p95", "p99")},
}

AGGREGATES = ("last", "mean", "max", "min", "sum", "count")


@dataclass(frozen=True)
class Vocabulary:
    series: frozenset = frozenset(PUBLISHED)        # (detector, feature) pairs
    own_detectors: frozenset = frozenset()          # a deployment's own: any feature
    own_features: frozenset = frozenset()           # a deployment's own: any detector
    metrics: dict = field(default_factory=lambda: dict(METRICS))

    def extended(self, detectors=(), features=()) -> "Vocabulary":
        return Vocabulary(self.series, self.own_detectors | frozenset(detectors),
                          self.own_features | frozenset(features), self.metrics)

    def names(self, kind: str) -> list[str]:
        """Every detector (kind "detector") or feature ("feature") name known."""
        i = 0 if kind == "detector" else 1
        own = self.own_detectors if i == 0 else self.own_features
        return sorted({pair[i] for pair in self.series} | own)

    def knows(self, kind: str, name: str) -> bool:
        return name in self.names(kind)

    def pair(self, detector: str, feature: str) -> bool:
        return ((detector, feature) in self.series or detector in self.own_detectors
                or feature in self.own_features)

    def features_of(self, detector: str) -> list[str]:
        return sorted(f for d, f in self.series if d == detector)


def did_you_mean(name: str, known: list[str]) -> str:
    """A hint for an unknown name: the close known names, or all of them."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(known)})"


DEFAULT = Vocabulary()
