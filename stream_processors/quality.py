"""Generation quality per window of completions, as z-scores against a version's baseline.

For each window of ``window_size`` completions:

- distinct-1, distinct-2 (Li et al., 2016): distinct unigrams (bigrams) over all unigrams
  (bigrams) in the window; bigrams do not cross completions;
- token entropy: Shannon entropy, in bits, of the window's unigram distribution;
- mean completion length, in tokens.

The first ``baseline_windows`` windows of a version are its baseline: each metric's mean
and sample standard deviation over them. Every later window is reported with its z-scores
``(value - mean) / sd`` (sd floored at ``1e-9 * max(1, |mean|)`` so a constant baseline
gives large but finite scores). A collapse into repetition shows as distinct-n and entropy
falling many standard deviations; runaway or truncated generations as length moving.

Tokens are whatever the caller has: token ids, or words (a string is split on white
space). A completion known only by its length (the event has counts but no text) adds to
the length metric only.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["QualityMonitor", "QualityWindow", "window_metrics", "METRICS"]

METRICS = ("distinct_1", "distinct_2", "token_entropy", "mean_length")


@dataclass
class QualityWindow:
    index: int
    n_completions: int
    distinct_1: float
    distinct_2: float
    token_entropy: float
    mean_length: float
    baseline: bool
    z: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _entropy_bits(counts: Counter, total: int) -> float:
    if total == 0:
        return math.nan
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def window_metrics(completions) -> dict:
    """The four metrics of a list of token sequences, computed directly."""
    uni, bi = Counter(), Counter()
    n_uni = n_bi = 0
    for toks in completions:
        toks = list(toks)
        uni.update(toks)
        n_uni += len(toks)
        bi.update(zip(toks, toks[1:]))
        n_bi += max(0, len(toks) - 1)
    return {"distinct_1": len(uni) / n_uni if n_uni else math.nan,
            "distinct_2": len(bi) / n_bi if n_bi else math.nan,
            "token_entropy": _entropy_bits(uni, n_uni),
            "mean_length": n_uni / len(completions) if completions else math.nan}


class QualityMonitor:
    """Windowed generation-quality metrics with z-scores against a baseline."""

    def __init__(self, window_size: int = 100, baseline_windows: int = 5):
        if window_size < 1 or baseline_windows < 1:
            raise ValueError("window_size and baseline_windows must be >= 1")
        self.window_size = int(window_size)
        self.baseline_windows = int(baseline_windows)
        self._baseline_values: dict[str, list[float]] = {m: [] for m in METRICS}
        self._baseline: dict[str, tuple[float, float]] | None = None
        self.n_windows = 0
        self.last: QualityWindow | None = None
        self._open()

    def _open(self) -> None:
        self._uni: Counter = Counter()
        self._bi: Counter = Counter()
        self._n_uni = 0
        self._n_bi = 0
        self._len_sum = 0
        self._n = 0

    @property
    def baseline(self) -> dict[str, tuple[float, float]] | None:
        """Metric -> (mean, sd) once the baseline is complete."""
        return self._baseline

    def update(self, tokens=None, length: int | None = None) -> QualityWindow | None:
        """Add one completion; returns the window's result when this completion closes it."""
        if isinstance(tokens, str):
            tokens = tokens.split()
        if tokens is not None:
            toks = list(tokens)
            self._uni.update(toks)
            self._n_uni += len(toks)
            self._bi.update(zip(toks, toks[1:]))
            self._n_bi += max(0, len(toks) - 1)
            self._len_sum += len(toks) if length is None else int(length)
        elif length is not None:
            self._len_sum += int(length)
        else:
            return None
        self._n += 1
        if self._n < self.window_size:
            return None
        return self._close()

    def update_many(self, lengths, tokens=None) -> list[QualityWindow]:
        """As ``update(tokens[i], lengths[i])`` on each completion in turn; returns the
        windows closed. ``tokens`` None: no completion has its text, and the lengths are
        added a window at a time."""
        lengths = np.asarray(lengths, dtype=np.int64)
        closed = []
        if tokens is not None:
            for toks, length in zip(tokens, lengths.tolist()):
                w = self.update(toks, length)
                if w is not None:
                    closed.append(w)
            return closed
        i = 0
        while i < len(lengths):
            take = min(len(lengths) - i, self.window_size - self._n)
            self._len_sum += int(lengths[i:i + take].sum())
            self._n += take
            i += take
            if self._n == self.window_size:
                closed.append(self._close())
        return closed

    def _close(self) -> QualityWindow:
        values = {"distinct_1": len(self._uni) / self._n_uni if self._n_uni else math.nan,
                  "distinct_2": len(self._bi) / self._n_bi if self._n_bi else math.nan,
                  "token_entropy": _entropy_bits(self._uni, self._n_uni),
                  "mean_length": self._len_sum / self._n}
        in_baseline = self._baseline is None
        z = {}
        if in_baseline:
            for m in METRICS:
                self._baseline_values[m].append(values[m])
            if len(self._baseline_values["mean_length"]) >= self.baseline_windows:
                self._baseline = {m: _mean_sd(self._baseline_values[m]) for m in METRICS}
        else:
            for m in METRICS:
                mean, sd = self._baseline[m]
                if math.isnan(values[m]) or math.isnan(mean):
                    continue
                z[m] = (values[m] - mean) / max(sd, 1e-9 * max(1.0, abs(mean)))
        w = QualityWindow(self.n_windows, self._n, values["distinct_1"], values["distinct_2"],
                          values["token_entropy"], values["mean_length"], in_baseline, z)
        self.n_windows += 1
        self.last = w
        self._open()
        return w

    def to_state(self) -> dict:
        return {"window_size": self.window_size, "baseline_windows": self.baseline_windows,
                "baseline_values": self._baseline_values, "n_windows": self.n_windows,
                "open": {"unigrams": [[k, v] for k, v in self._uni.items()],
                         "bigrams": [[list(k), v] for k, v in self._bi.items()],
                         "n_uni": self._n_uni, "n_bi": self._n_bi, "len_sum": self._len_sum, "n": self._n}}

    @classmethod
    def from_state(cls, st: dict) -> "QualityMonitor":
        q = cls(st["window_size"], st["baseline_windows"])
        q._baseline_values = {m: list(v) for m, v in st["baseline_values"].items()}
        if len(q._baseline_values["mean_length"]) >= q.baseline_windows:
            q._baseline = {m: _mean_sd(q._baseline_values[m]) for m in METRICS}
        q.n_windows = int(st["n_windows"])
        o = st["open"]
        q._uni = Counter({k: v for k, v in o["unigrams"]})
        q._bi = Counter({tuple(k): v for k, v in o["bigrams"]})
        q._n_uni, q._n_bi, q._len_sum, q._n = o["n_uni"], o["n_bi"], o["len_sum"], o["n"]
        return q


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    mean = sum(v) / len(v)
    if len(v) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
