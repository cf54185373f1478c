"""The analysis of one step: the candidate against the stable version over the same
interval. Checks: error rate (one-sided two-proportion z-test), latency (one-sided
Mann-Whitney U) and confidence (two-sided Mann-Whitney U) distributions, the candidate's
drift signals, calibration (ECE and accuracy from feedback). Each check passes, fails, or
is inconclusive (too little data); inconclusive checks are left out of the score, and an
analysis whose error-rate check is inconclusive is inconclusive as a whole."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scipy import stats

from .config import Thresholds

PASS, MARGINAL, FAIL, INCONCLUSIVE = "pass", "marginal", "fail", "inconclusive"


class Sample:
    """A bounded, deterministic sample of a stream: keeps every `stride`-th value and,
    when full, drops every other one and doubles the stride, so it spans the whole
    interval evenly in at most `cap` values."""

    def __init__(self, cap: int = 2000, stride: int = 1, seen: int = 0, values=None):
        self.cap, self.stride, self.seen = cap, stride, seen
        self.values = list(values or [])

    def add(self, v) -> None:
        self.seen += 1
        if self.seen % self.stride == 0:
            self.values.append(v)
            if len(self.values) >= self.cap:
                self.values = self.values[1::2]
                self.stride *= 2

    def to_dict(self) -> dict:
        return {"cap": self.cap, "stride": self.stride, "seen": self.seen, "values": self.values}

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(d["cap"], d["stride"], d["seen"], [tuple(v) if isinstance(v, list) else v for v in d["values"]])


@dataclass
class Window:
    """What one version did since a time: exact error counts, sampled latencies and
    confidences, feedback pairs (probability, correct), drift verdicts per detector/feature."""
    start: float
    n: int = 0
    errors: int = 0
    latency: Sample = field(default_factory=Sample)
    confidence: Sample = field(default_factory=Sample)
    feedback: Sample = field(default_factory=Sample)
    drift: dict[str, dict] = field(default_factory=dict)

    def add_outcome(self, error: bool, latency: float, confidence: float | None) -> None:
        self.n += 1
        self.errors += bool(error)
        if not error and math.isfinite(latency):
            self.latency.add(_6(latency))
        if confidence is not None and math.isfinite(confidence):
            self.confidence.add(_6(confidence))

    def add_drift(self, detector: str, feature: str, drifted: bool, statistic: float) -> None:
        d = self.drift.setdefault(f"{detector}/{feature}", {"drifted": False, "statistic": 0.0, "signals": 0})
        d["signals"] += 1
        if drifted or not d["drifted"]:
            d["statistic"] = float(statistic)
        d["drifted"] = d["drifted"] or bool(drifted)

    def to_dict(self) -> dict:
        return {"start": self.start, "n": self.n, "errors": self.errors, "latency": self.latency.to_dict(),
                "confidence": self.confidence.to_dict(), "feedback": self.feedback.to_dict(),
                "drift": self.drift}

    @classmethod
    def from_dict(cls, d: dict) -> "Window":
        return cls(d["start"], d["n"], d["errors"], Sample.from_dict(d["latency"]),
                   Sample.from_dict(d["confidence"]), Sample.from_dict(d["feedback"]),
                   {k: dict(v) for k, v in d["drift"].items()})


@dataclass
class Check:
    name: str
    verdict: str  # pass, fail, inconclusive
    text: str
    figures: dict = field(default_factory=dict)


@dataclass
class Analysis:
    verdict: str
    score: float | None
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.verdict == FAIL]

    def figures(self) -> dict:
        return {"verdict": self.verdict, "score": self.score,
                "checks": {c.name: {"verdict": c.verdict, **c.figures} for c in self.checks}}

    def summary(self) -> str:
        score = "" if self.score is None else f"score {self.score:.1f}; "
        shown = self.failed or [c for c in self.checks if c.verdict != INCONCLUSIVE] or self.checks
        return score + "; ".join(f"{c.name} {c.verdict}: {c.text}" for c in shown)


def _6(x: float) -> float:
    return float(f"{x:.6g}")  # six digits are plenty, and halve the state's size


def _r(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def worse_by(bad: int, n1: int, base_bad: int, n2: int, margin: float) -> tuple[float, float, float]:
    """One-sided two-proportion z-test that the first rate exceeds the second by more than
    `margin` (the margin is in the null hypothesis, so a small sample does not fail on a
    point estimate alone), with the Agresti-Caffo adjustment (one success and one failure
    added to each group), which keeps the test honest at small counts. Returns (z, p,
    difference of the raw rates)."""
    a, b = (bad + 1) / (n1 + 2), (base_bad + 1) / (n2 + 2)
    se = math.sqrt(a * (1 - a) / (n1 + 2) + b * (1 - b) / (n2 + 2))
    z = (a - b - margin) / se
    return z, float(stats.norm.sf(z)), bad / n1 - base_bad / n2


def error_rate(c: Window, s: Window, t: Thresholds) -> Check:
    if c.n < t.min_samples or s.n < t.min_samples:
        return Check("error_rate", INCONCLUSIVE, f"{c.n} candidate and {s.n} stable requests, "
                     f"{t.min_samples} needed", {"candidate_n": c.n, "stable_n": s.n})
    z, p, diff = worse_by(c.errors, c.n, s.errors, s.n, t.error_margin)
    p1, p2 = c.errors / c.n, s.errors / s.n
    figs = {"candidate": _r(p1), "candidate_errors": c.errors, "candidate_n": c.n, "stable": _r(p2),
            "stable_errors": s.errors, "stable_n": s.n, "margin": t.error_margin, "z": _r(z), "p": _r(p)}
    return Check("error_rate", FAIL if p < t.alpha else PASS,
                 f"candidate {p1:.3f} ({c.errors}/{c.n}) vs stable {p2:.3f} ({s.errors}/{s.n}), "
                 f"more than {t.error_margin:g} worse: z={z:.2f}, p={p:.2g}", figs)


def _mwu(c: list, s: list, alternative: str):
    res = stats.mannwhitneyu(c, s, alternative=alternative)
    return float(res.pvalue), 2 * float(res.statistic) / (len(c) * len(s)) - 1  # rank-biserial


def latency(c: Window, s: Window, t: Thresholds) -> Check:
    cv, sv = c.latency.values, s.latency.values
    if len(cv) < t.min_samples or len(sv) < t.min_samples:
        return Check("latency", INCONCLUSIVE, f"{len(cv)} candidate and {len(sv)} stable latencies, "
                     f"{t.min_samples} needed", {"candidate_n": len(cv), "stable_n": len(sv)})
    p, r = _mwu(cv, sv, "greater")
    mc, ms = float(_median(cv)), float(_median(sv))
    ratio = mc / ms if ms > 0 else (1.0 if mc == 0 else math.inf)
    bad = p < t.alpha and ratio > t.latency_ratio and mc - ms > t.latency_margin
    figs = {"candidate_median": _r(mc), "stable_median": _r(ms), "ratio": _r(ratio), "p": _r(p),
            "candidate_n": len(cv), "stable_n": len(sv)}
    return Check("latency", FAIL if bad else PASS,
                 f"median {mc:.4g}s vs {ms:.4g}s (x{ratio:.2f}, limit x{t.latency_ratio:g} "
                 f"and +{t.latency_margin:g}s), "
                 f"Mann-Whitney p={p:.2g}", figs)


def confidence(c: Window, s: Window, t: Thresholds) -> Check:
    cv, sv = c.confidence.values, s.confidence.values
    if len(cv) < t.min_samples or len(sv) < t.min_samples:
        return Check("confidence", INCONCLUSIVE, f"{len(cv)} candidate and {len(sv)} stable confidences, "
                     f"{t.min_samples} needed", {"candidate_n": len(cv), "stable_n": len(sv)})
    p, r = _mwu(cv, sv, "two-sided")
    bad = p < t.alpha and abs(r) > t.confidence_effect
    figs = {"candidate_median": _r(_median(cv)), "stable_median": _r(_median(sv)), "effect": _r(r),
            "p": _r(p), "candidate_n": len(cv), "stable_n": len(sv)}
    return Check("confidence", FAIL if bad else PASS,
                 f"median {_median(cv):.4g} vs {_median(sv):.4g}, rank-biserial {r:+.2f} "
                 f"(limit {t.confidence_effect:g}), Mann-Whitney p={p:.2g}", figs)


def drift(c: Window, s: Window, t: Thresholds) -> Check:
    """Fails on a feature the candidate drifted on and the stable version did not (drift
    of both is a change of the input, not of the candidate)."""
    if not c.drift:
        return Check("drift", INCONCLUSIVE, "no drift signals for the candidate", {})
    own = {k: v["statistic"] for k, v in c.drift.items()
           if v["drifted"] and not s.drift.get(k, {}).get("drifted")}
    if own:
        return Check("drift", FAIL, "candidate drifted on " + ", ".join(
            f"{k} (statistic {v:.4g})" for k, v in sorted(own.items())),
            {"drifted": {k: _r(v) for k, v in sorted(own.items())}})
    return Check("drift", PASS, f"{sum(v['signals'] for v in c.drift.values())} signals, none drifted "
                 "on the candidate alone", {"signals": sum(v["signals"] for v in c.drift.values())})


def ece(pairs: list, bins: int = 10) -> float:
    """Expected calibration error over equal-width bins of the predicted probability."""
    sums = [[0, 0.0, 0.0] for _ in range(bins)]
    for prob, correct in pairs:
        b = sums[min(int(prob * bins), bins - 1)]
        b[0] += 1
        b[1] += prob
        b[2] += correct
    return sum(abs(b[1] - b[2]) for b in sums if b[0]) / len(pairs)


def calibration(c: Window, s: Window, t: Thresholds) -> Check:
    cv, sv = c.feedback.values, s.feedback.values
    if len(cv) < t.min_feedback or len(sv) < t.min_feedback:
        return Check("calibration", INCONCLUSIVE, f"feedback on {len(cv)} candidate and {len(sv)} stable "
                     f"requests, {t.min_feedback} needed", {"candidate_n": len(cv), "stable_n": len(sv)})
    ec, es = ece(cv), ece(sv)
    ac, as_ = sum(x[1] for x in cv) / len(cv), sum(x[1] for x in sv) / len(sv)
    z, p, _ = worse_by(sum(not x[1] for x in cv), len(cv), sum(not x[1] for x in sv), len(sv), t.accuracy_margin)
    worse_acc = p < t.alpha
    worse_ece = ec - es > t.ece_margin
    figs = {"candidate_ece": _r(ec), "stable_ece": _r(es), "candidate_accuracy": _r(ac),
            "stable_accuracy": _r(as_), "accuracy_p": _r(p), "candidate_n": len(cv), "stable_n": len(sv)}
    return Check("calibration", FAIL if worse_acc or worse_ece else PASS,
                 f"ECE {ec:.3f} vs {es:.3f} (margin {t.ece_margin:g}), accuracy {ac:.3f} vs {as_:.3f} "
                 f"(p={p:.2g})", figs)


CHECKS = (error_rate, latency, confidence, drift, calibration)


def analyse(candidate: Window, stable: Window, t: Thresholds) -> Analysis:
    checks = [f(candidate, stable, t) for f in CHECKS]
    if checks[0].verdict == INCONCLUSIVE:
        return Analysis(INCONCLUSIVE, None, checks)
    decided = [c for c in checks if c.verdict != INCONCLUSIVE]
    total = sum(t.weights.get(c.name, 1.0) for c in decided)
    score = 100.0 * sum(t.weights.get(c.name, 1.0) for c in decided if c.verdict == PASS) / total if total else 100.0
    verdict = PASS if score >= t.pass_score else MARGINAL if score >= t.marginal_score else FAIL
    return Analysis(verdict, round(score, 1), checks)


def _median(v: list) -> float:
    s = sorted(v)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2
