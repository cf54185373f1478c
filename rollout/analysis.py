"""The analysis of one step: the candidate against the stable version, from the processors'
comparisons of the two over the same traffic (the `*_vs_stable` series of
eventbus/signals.py). Nothing is computed from events here: each check reads the latest
comparison published since the step began and applies the rollout's thresholds to it.

Checks: error rate (the processors' one-sided two-proportion test), latency per output
token (Mann-Whitney, one-sided, and the medians), confidence (Mann-Whitney, two-sided, on
the mean log-probability), the candidate's drift signals, calibration (accuracy and ECE of
joined feedback). Each check passes, fails, or is inconclusive (no comparison yet, or one
over too few values); inconclusive checks are left out of the score, and an analysis whose
error-rate check is inconclusive is inconclusive as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field

from eventbus.signals import Detector, Feature

from .config import Thresholds
from .records import SignalObs

PASS, MARGINAL, FAIL, INCONCLUSIVE = "pass", "marginal", "fail", "inconclusive"

ERRORS = f"{Detector.ERROR_RATE_VS_STABLE}/{Feature.ERROR}"
LATENCY = (f"{Detector.MANN_WHITNEY_VS_STABLE}/{Feature.TOKEN_SECONDS}",
           f"{Detector.MEDIAN_VS_STABLE}/{Feature.TOKEN_SECONDS}")
CONFIDENCE = (f"{Detector.MANN_WHITNEY_VS_STABLE}/{Feature.MEAN_LOGPROB}",
              f"{Detector.MEDIAN_VS_STABLE}/{Feature.MEAN_LOGPROB}")
ACCURACY = f"{Detector.ACCURACY_VS_STABLE}/{Feature.LABEL}"
ECE = f"{Detector.ECE_VS_STABLE}/{Feature.LABEL}"
# Comparisons the checks read; the others of kind drift (ks_vs_stable, chi2_vs_stable, a
# version's own detectors) are drift verdicts.
JUDGED = frozenset({Detector.ERROR_RATE_VS_STABLE, Detector.MANN_WHITNEY_VS_STABLE, Detector.MEDIAN_VS_STABLE,
                    Detector.ACCURACY_VS_STABLE, Detector.ECE_VS_STABLE})


@dataclass
class Window:
    """What the signals said about one version since a time: for a candidate, the latest
    comparison with stable per series and its count of compared events (`base` is the
    count when the window began, so `sample` is what came since); for any version, its
    drift verdicts per detector/feature."""
    start: float
    base: int = 0
    events: int = 0
    readings: dict[str, dict] = field(default_factory=dict)
    drift: dict[str, dict] = field(default_factory=dict)

    @property
    def sample(self) -> int:
        """Candidate events compared since the window began (to within the processors'
        `--compare-every`: they publish a comparison every that many)."""
        return max(0, self.events - self.base)

    def add_reading(self, s: SignalObs) -> None:
        key = f"{s.detector}/{s.feature}"
        old = self.readings.get(key)
        if old is None or s.events >= old["events"]:
            self.readings[key] = {"statistic": s.statistic, "p": s.p_value, "value": s.value,
                                  "stable_n": s.reference_size, "candidate_n": s.window_size,
                                  "events": s.events, "time": s.time}
        if s.feature != Feature.LABEL:   # counts of joined feedback are not counts of requests
            if s.events < self.base:     # the processors' count started again (a new comparison)
                self.base = self.events = 0
            self.events = max(self.events, s.events)

    def add_drift(self, detector: str, feature: str, drifted: bool, statistic: float) -> None:
        d = self.drift.setdefault(f"{detector}/{feature}", {"drifted": False, "statistic": 0.0, "signals": 0})
        d["signals"] += 1
        if drifted or not d["drifted"]:
            d["statistic"] = float(statistic)
        d["drifted"] = d["drifted"] or bool(drifted)

    def to_dict(self) -> dict:
        return {"start": self.start, "base": self.base, "events": self.events, "readings": self.readings,
                "drift": self.drift}

    @classmethod
    def from_dict(cls, d: dict) -> "Window":
        """A window of a record; one written before the controller read comparisons starts
        afresh at its start."""
        return cls(d["start"], int(d.get("base", 0)), int(d.get("events", 0)),
                   {k: dict(v) for k, v in d.get("readings", {}).items()},
                   {k: dict(v) for k, v in d.get("drift", {}).items()})


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


def _r(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _missing(name: str, what: str, readings: list[dict | None], needed: int) -> Check | None:
    """Inconclusive when a comparison is missing or over fewer than `needed` values a side."""
    if any(r is None for r in readings):
        return Check(name, INCONCLUSIVE, f"no comparison of {what} with stable in this step yet", {})
    r = readings[0]
    if min(r["candidate_n"], r["stable_n"]) < needed:
        return Check(name, INCONCLUSIVE, f"{what} compared over {r['candidate_n']} candidate and {r['stable_n']} "
                     f"stable values, {needed} needed",
                     {"candidate_n": r["candidate_n"], "stable_n": r["stable_n"]})
    return None


def error_rate(c: Window, s: Window, t: Thresholds) -> Check:
    e = c.readings.get(ERRORS)
    if (no := _missing("error_rate", "error rates", [e], t.min_samples)) is not None:
        return no
    p1, p2, p = e["value"], e["value"] - e["statistic"], e["p"]
    n1, n2 = e["candidate_n"], e["stable_n"]
    figs = {"candidate": _r(p1), "candidate_n": n1, "stable": _r(p2), "stable_n": n2, "difference": _r(e["statistic"]),
            "margin": t.error_margin, "p": _r(p)}
    bad = p < t.alpha and e["statistic"] > t.error_margin
    return Check("error_rate", FAIL if bad else PASS,
                 f"candidate {p1:.3f} of {n1} vs stable {p2:.3f} of {n2} requests, worse by more than the "
                 f"processors' margin: p={p:.2g} (fails past {t.error_margin:g} worse at p<{t.alpha:g})", figs)


def latency(c: Window, s: Window, t: Thresholds) -> Check:
    mw, med = (c.readings.get(k) for k in LATENCY)
    if (no := _missing("latency", "time per output token", [mw, med], t.min_samples)) is not None:
        return no
    r, p2 = mw["statistic"], mw["p"]
    p = p2 / 2 if r > 0 else 1 - p2 / 2   # one-sided: the candidate slower
    mc = med["value"]
    ms = mc - med["statistic"]
    ratio = mc / ms if ms > 0 else (1.0 if mc == 0 else float("inf"))
    bad = p < t.alpha and ratio > t.latency_ratio and mc - ms > t.latency_margin
    figs = {"candidate_median": _r(mc), "stable_median": _r(ms), "ratio": _r(ratio), "effect": _r(r), "p": _r(p),
            "candidate_n": mw["candidate_n"], "stable_n": mw["stable_n"]}
    return Check("latency", FAIL if bad else PASS,
                 f"median {mc:.4g}s vs {ms:.4g}s per token (x{ratio:.2f}, limit x{t.latency_ratio:g} "
                 f"and +{t.latency_margin:g}s), Mann-Whitney p={p:.2g}", figs)


def confidence(c: Window, s: Window, t: Thresholds) -> Check:
    mw, med = (c.readings.get(k) for k in CONFIDENCE)
    if (no := _missing("confidence", "confidences", [mw, med], t.min_samples)) is not None:
        return no
    r, p = mw["statistic"], mw["p"]
    mc = med["value"]
    ms = mc - med["statistic"]
    bad = p < t.alpha and abs(r) > t.confidence_effect
    figs = {"candidate_median": _r(mc), "stable_median": _r(ms), "effect": _r(r), "p": _r(p),
            "candidate_n": mw["candidate_n"], "stable_n": mw["stable_n"]}
    return Check("confidence", FAIL if bad else PASS,
                 f"median {mc:.4g} vs {ms:.4g}, rank-biserial {r:+.2f} (limit {t.confidence_effect:g}), "
                 f"Mann-Whitney p={p:.2g}", figs)


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


def calibration(c: Window, s: Window, t: Thresholds) -> Check:
    acc, ece = c.readings.get(ACCURACY), c.readings.get(ECE)
    if (no := _missing("calibration", "joined feedback", [acc, ece], t.min_feedback)) is not None:
        return no
    ac, ec = acc["value"], ece["value"]
    as_, es = ac - acc["statistic"], ec - ece["statistic"]
    worse_acc = acc["p"] < t.alpha and -acc["statistic"] > t.accuracy_margin
    worse_ece = ece["statistic"] > t.ece_margin
    figs = {"candidate_ece": _r(ec), "stable_ece": _r(es), "candidate_accuracy": _r(ac),
            "stable_accuracy": _r(as_), "accuracy_p": _r(acc["p"]), "candidate_n": acc["candidate_n"],
            "stable_n": acc["stable_n"]}
    return Check("calibration", FAIL if worse_acc or worse_ece else PASS,
                 f"ECE {ec:.3f} vs {es:.3f} (margin {t.ece_margin:g}), accuracy {ac:.3f} vs {as_:.3f} "
                 f"(p={acc['p']:.2g})", figs)


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
