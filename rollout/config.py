"""A rollout's configuration, validated field by field: a bad value raises RolloutError
naming the field."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .records import BLUEGREEN, CANARY, SHADOW, STRATEGIES, RolloutError

DEFAULT_STEPS = (5.0, 10.0, 25.0, 50.0, 100.0)


@dataclass
class Thresholds:
    """When each check fails, and how the checks add up.

    A check fails only when its test is significant (p < alpha) AND the effect is larger
    than its margin, so a large sample does not fail a candidate for a trivial
    difference. Checks without enough data are inconclusive and left out of the score.
    score = 100 * (weight of passing checks) / (weight of decided checks);
    score >= pass_score passes, >= marginal_score is marginal, below fails."""
    alpha: float = 0.01
    min_samples: int = 20            # per version, for a distribution or error test
    error_margin: float = 0.01       # absolute rise of the error rate that matters
    latency_ratio: float = 1.10      # candidate median latency / stable median latency
    latency_margin: float = 0.005    # seconds: a rise of the median below this never fails (ratios of
                                     # millisecond latencies swing with load, not with the version)
    confidence_effect: float = 0.2   # |rank-biserial correlation| of the confidence distributions
    min_feedback: int = 30           # per version, for calibration
    ece_margin: float = 0.05         # rise of expected calibration error
    accuracy_margin: float = 0.05    # fall of accuracy
    weights: dict[str, float] = field(default_factory=lambda: {
        "error_rate": 3.0, "latency": 2.0, "confidence": 3.0, "drift": 3.0, "calibration": 3.0})
    pass_score: float = 95.0
    marginal_score: float = 90.0     # above any score with a failed check under these weights: the
                                     # processors' comparisons always decide the drift check, and at 80
                                     # a latency failure alone (9 of 11) held the step until it paused


@dataclass
class RolloutConfig:
    strategy: str = CANARY
    steps: tuple[float, ...] = DEFAULT_STEPS  # canary: percent of traffic on the candidate
    min_requests: int = 50          # candidate requests before an analysis is conclusive
    interval: float = 60.0          # seconds between analyses; a step lasts at least one
    inconclusive_limit: int = 5     # inconclusive or marginal analyses in a row before pausing
    failure_limit: int = 0          # failed analyses tolerated; one more rolls back
    keep_old_for: float = 600.0     # blue/green: seconds the old version stays loaded after the switch
    watch: float = 1800.0           # seconds after a promotion that the old version stays loaded as the
                                    # last healthy one, for a response policy's fallback (0: none)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self):
        self.steps = tuple(float(s) for s in self.steps)
        if isinstance(self.thresholds, dict):
            unknown = set(self.thresholds) - {f.name for f in fields(Thresholds)}
            if unknown:
                raise RolloutError(f"thresholds.{sorted(unknown)[0]}", "is not a threshold")
            self.thresholds = Thresholds(**self.thresholds)
        validate(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RolloutError(sorted(unknown)[0], "is not a rollout setting")
        return cls(**d)


def _finite(name: str, v, minimum: float = 0.0, positive: bool = False) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise RolloutError(name, f"{v!r} is not a finite number")
    if v < minimum or (positive and v <= minimum):
        raise RolloutError(name, f"{v} must be {'greater than' if positive else 'at least'} {minimum:g}")


def validate(c: RolloutConfig) -> None:
    if c.strategy not in STRATEGIES:
        raise RolloutError("strategy", f"{c.strategy!r} is not one of {', '.join(STRATEGIES)}")
    if c.strategy == CANARY and not c.steps:
        raise RolloutError("steps", "a canary needs at least one step")
    prev = 0.0
    for s in c.steps:
        if not math.isfinite(s) or s <= 0:
            raise RolloutError("steps", f"{s:g} is not a percentage above 0")
        if s > 100:
            raise RolloutError("steps", f"{s:g} is past 100")
        if s <= prev:
            raise RolloutError("steps", f"must increase: {s:g} comes after {prev:g}")
        prev = s
    _finite("interval", c.interval, 0.0, positive=True)
    _finite("keep_old_for", c.keep_old_for)
    _finite("watch", c.watch)
    for name in ("min_requests", "inconclusive_limit", "failure_limit"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise RolloutError(name, f"{v!r} is not a whole number >= 0")
    t = c.thresholds
    if not 0 < t.alpha < 1:
        raise RolloutError("thresholds.alpha", f"{t.alpha!r} is not between 0 and 1")
    for name in ("min_samples", "min_feedback"):
        v = getattr(t, name)
        if not isinstance(v, int) or v < 2:
            raise RolloutError(f"thresholds.{name}", f"{v!r} is not a whole number >= 2")
    for name in ("error_margin", "confidence_effect", "ece_margin", "accuracy_margin"):
        _finite(f"thresholds.{name}", getattr(t, name))
    _finite("thresholds.latency_ratio", t.latency_ratio, 1.0)
    _finite("thresholds.latency_margin", t.latency_margin)
    for k, w in t.weights.items():
        _finite(f"thresholds.weights.{k}", w)
    _finite("thresholds.marginal_score", t.marginal_score)
    _finite("thresholds.pass_score", t.pass_score, t.marginal_score)
    if t.pass_score > 100:
        raise RolloutError("thresholds.pass_score", f"{t.pass_score} is past 100")


def plan(c: RolloutConfig) -> list[tuple[float, bool]]:
    """The steps of a strategy: (candidate's percent of traffic, shadowed)."""
    if c.strategy == CANARY:
        return [(s, False) for s in c.steps]
    if c.strategy == BLUEGREEN:
        return [(0.0, True), (100.0, False)]
    assert c.strategy == SHADOW
    return [(0.0, True)]
