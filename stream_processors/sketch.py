"""A mergeable quantile sketch with a relative-error guarantee (DDSketch), for latencies.

Masson, Rim and Lee, "DDSketch: a fast and fully-mergeable quantile sketch with
relative-error guarantees" (VLDB 2019). A positive value v goes to bin
``ceil(log_gamma(v))`` with ``gamma = (1 + a) / (1 - a)``; a bin stands for
``2 gamma^k / (1 + gamma)``, which is within a relative ``a`` of every value in the bin.
So the value returned for quantile q is within ``a * |x_q|`` of the true one, x_q being the
sample's element of rank ``floor(q * (n - 1))``. Two sketches with the same ``a`` merge by
adding their bins: the result is the sketch of the union, bin for bin. Memory is bounded
by ``bin_limit`` bins per sign; past it the lowest bins are folded together (the low
quantiles lose their guarantee first, which latency p50/p95/p99 can afford).

The key mapping, bin values and rank rule are those of DataDog's ``ddsketch`` package
(``LogCollapsingLowestDenseDDSketch``), so both answer the same quantiles on the same
data; this one adds a vectorised ``add_many`` and a plain-dict checkpoint.
"""

from __future__ import annotations

import math
import sys

import numpy as np

__all__ = ["QuantileSketch"]

_LN2 = math.log(2)


class _Store:
    """Dense bin counts over keys [offset, offset + len(bins)); lowest keys collapse."""

    __slots__ = ("bins", "offset", "limit", "count")

    def __init__(self, limit: int):
        self.bins = np.zeros(0)
        self.offset = 0
        self.limit = limit
        self.count = 0.0

    def _reshape(self, lo: int, hi: int) -> None:
        """Cover keys [lo, hi] (hi - lo < limit), folding bins below lo into lo."""
        old, off = self.bins, self.offset
        new = np.zeros(hi - lo + 1)
        if len(old):
            keys_hi = off + len(old) - 1
            below = old[:max(0, min(lo, keys_hi + 1) - off)].sum()
            s, e = max(lo, off), min(hi, keys_hi)
            if e >= s:
                new[s - lo:e - lo + 1] = old[s - off:e - off + 1]
            new[0] += below
        self.bins, self.offset = new, lo

    def _span(self, kmin: int, kmax: int) -> int:
        """Make room for keys in [kmin, kmax]; returns the lowest key kept."""
        if len(self.bins):
            lo, hi = min(self.offset, kmin), max(self.offset + len(self.bins) - 1, kmax)
        else:
            lo, hi = kmin, kmax
        lo = max(lo, hi - self.limit + 1)
        if lo != self.offset or hi != self.offset + len(self.bins) - 1:
            self._reshape(lo, hi)
        return lo

    def add(self, key: int, weight: float = 1.0) -> None:
        i = key - self.offset
        if not (0 <= i < len(self.bins)):
            lo = self._span(key, key)
            i = max(key, lo) - self.offset
        self.bins[i] += weight
        self.count += weight

    def add_keys(self, keys: np.ndarray) -> None:
        if len(keys) == 0:
            return
        kmin, kmax = int(keys.min()), int(keys.max())
        lo = self._span(kmin, kmax)
        idx = np.maximum(keys, lo) - self.offset
        self.bins += np.bincount(idx, minlength=len(self.bins))
        self.count += float(len(keys))

    def merge(self, other: "_Store") -> None:
        if other.count == 0:
            return
        nz = np.flatnonzero(other.bins)
        kmin, kmax = other.offset + int(nz[0]), other.offset + int(nz[-1])
        lo = self._span(kmin, kmax)
        keys = np.arange(kmin, kmax + 1)
        np.add.at(self.bins, np.maximum(keys, lo) - self.offset, other.bins[kmin - other.offset:kmax - other.offset + 1])
        self.count += other.count

    def key_at_rank(self, rank: float, lower: bool = True) -> int:
        cum = np.cumsum(self.bins)
        i = np.searchsorted(cum, rank, side="right") if lower else np.searchsorted(cum, rank + 1, side="left")
        return self.offset + int(min(i, len(self.bins) - 1))

    def to_state(self) -> dict:
        nz = np.flatnonzero(self.bins)
        if len(nz) == 0:
            return {"offset": 0, "counts": []}
        return {"offset": self.offset + int(nz[0]), "counts": self.bins[nz[0]:nz[-1] + 1].tolist()}

    def load(self, st: dict) -> None:
        self.bins = np.asarray(st["counts"], dtype=np.float64)
        self.offset = int(st["offset"])
        self.count = float(self.bins.sum())


class QuantileSketch:
    """DDSketch with relative accuracy ``relative_accuracy`` and at most ``bin_limit`` bins per sign."""

    def __init__(self, relative_accuracy: float = 0.01, bin_limit: int = 2048):
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError("relative_accuracy must be in (0, 1)")
        self.relative_accuracy = float(relative_accuracy)
        self.bin_limit = int(bin_limit)
        gamma_mantissa = 2 * relative_accuracy / (1 - relative_accuracy)
        self.gamma = 1 + gamma_mantissa
        self._multiplier = 1 / math.log1p(gamma_mantissa) * _LN2
        self._min_possible = sys.float_info.min * self.gamma
        self._pos = _Store(self.bin_limit)
        self._neg = _Store(self.bin_limit)
        self.zero_count = 0.0
        self.count = 0.0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    # -- mapping ------------------------------------------------------------------------
    def _key(self, v: float) -> int:
        return int(math.ceil(math.log(v, 2) * self._multiplier))

    def _keys(self, v: np.ndarray) -> np.ndarray:
        return np.ceil(np.log(v) / _LN2 * self._multiplier).astype(np.int64)

    def _value(self, key: int) -> float:
        return math.pow(2.0, key / self._multiplier) * (2.0 / (1 + self.gamma))

    # -- adding -------------------------------------------------------------------------
    def add(self, v: float) -> None:
        v = float(v)
        if not math.isfinite(v):
            return
        if v > self._min_possible:
            self._pos.add(self._key(v))
        elif v < -self._min_possible:
            self._neg.add(self._key(-v))
        else:
            self.zero_count += 1
        self.count += 1
        self.sum += v
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v

    def add_many(self, values) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            return
        pos = v > self._min_possible
        neg = v < -self._min_possible
        self._pos.add_keys(self._keys(v[pos]))
        self._neg.add_keys(self._keys(-v[neg]))
        self.zero_count += float(len(v) - pos.sum() - neg.sum())
        self.count += float(len(v))
        self.sum += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    def merge(self, other: "QuantileSketch") -> None:
        """Fold ``other`` in: afterwards this sketch is the sketch of both samples."""
        if other.gamma != self.gamma:
            raise ValueError("cannot merge sketches with different relative accuracy")
        self._pos.merge(other._pos)
        self._neg.merge(other._neg)
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    # -- reading ------------------------------------------------------------------------
    def quantile(self, q: float) -> float:
        """Value at quantile q (nan when empty)."""
        if not 0.0 <= q <= 1.0:
            raise ValueError("q must be in [0, 1]")
        if self.count == 0:
            return math.nan
        rank = q * (self.count - 1)
        neg = self._neg.count
        if rank < neg:
            return -self._value(self._neg.key_at_rank(neg - rank - 1, lower=False))
        if rank < self.zero_count + neg:
            return 0.0
        return self._value(self._pos.key_at_rank(rank - self.zero_count - neg))

    def quantiles(self, qs=(0.5, 0.95, 0.99)) -> list[float]:
        return [self.quantile(q) for q in qs]

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else math.nan

    @property
    def n_bins(self) -> int:
        return len(self._pos.bins) + len(self._neg.bins)

    def summary(self) -> dict:
        p50, p95, p99 = self.quantiles((0.5, 0.95, 0.99))
        return {"count": self.count, "sum": self.sum, "min": self.min, "max": self.max,
                "p50": p50, "p95": p95, "p99": p99}

    # -- checkpoints --------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"relative_accuracy": self.relative_accuracy, "bin_limit": self.bin_limit,
                "positive": self._pos.to_state(), "negative": self._neg.to_state(),
                "zero_count": self.zero_count, "count": self.count, "sum": self.sum,
                "min": self.min if self.count else None, "max": self.max if self.count else None}

    @classmethod
    def from_state(cls, st: dict) -> "QuantileSketch":
        s = cls(st["relative_accuracy"], st["bin_limit"])
        s._pos.load(st["positive"])
        s._neg.load(st["negative"])
        s.zero_count, s.count, s.sum = float(st["zero_count"]), float(st["count"]), float(st["sum"])
        s.min = math.inf if st["min"] is None else float(st["min"])
        s.max = -math.inf if st["max"] is None else float(st["max"])
        return s
