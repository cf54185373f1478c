"""Population stability index over fixed bins: reference distribution vs. a sliding window.

    PSI = sum over bins of (c_i - r_i) * ln(c_i / r_i)

with r_i and c_i the reference's and the window's share of bin i, each floored at ``eps``
so that an empty bin costs a large but finite amount. The bins are fixed once: the given
``edges``, or the reference's quantiles (``n_bins`` of them, fewer when values repeat).
Bin i is (edges[i-1], edges[i]], the first open below and the last open above.

Rule of thumb: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a major one.
The detector is rejecting while PSI >= ``threshold`` (once the window is full), and
``drift_detected`` is true on the update where that starts.

Each bin's term depends only on the window's count in it, so the terms are tabulated once
per reference (bins x (window_size + 1) values); an update changes two counts and the sum
is added up in bin order, by ``update`` and ``update_many`` alike, so both give the same
floating-point result.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from functools import lru_cache

import numpy as np

from .base import FloatDetector, Reading, as_float_array, check

__all__ = ["PSI", "psi"]

_CHUNK = 1 << 15


def psi(reference_counts, current_counts, eps: float = 1e-4) -> float:
    """PSI of two count vectors over the same bins (the direct formula)."""
    r = np.asarray(reference_counts, dtype=np.float64)
    c = np.asarray(current_counts, dtype=np.float64)
    rp = np.maximum(r / r.sum(), eps)
    cp = np.maximum(c / c.sum(), eps)
    return float(np.sum((cp - rp) * np.log(cp / rp)))


@lru_cache(maxsize=256)
def _term_row(rp: float, window_size: int, eps: float) -> tuple[float, ...]:
    """A bin's PSI term for each window count 0 .. window_size, its reference share being
    ``rp``. Cached: quantile bins give most bins of most detectors the same share."""
    out = []
    for c in range(window_size + 1):
        cp = max(c / window_size, eps)
        out.append((cp - rp) * math.log(cp / rp))
    return tuple(out)


class PSI(FloatDetector):
    """PSI drift detector.

    Parameters
    ----------
    window_size
        Values in the sliding window.
    reference_size
        Values taken as the reference when none is pinned (default: ``window_size``).
    n_bins
        Quantile bins cut from the reference when ``edges`` is not given.
    threshold
        PSI at or above which the detector rejects.
    reference
        A pinned baseline sample.
    edges
        Fixed inner bin edges (sorted); the reference then only gives the bins' shares.
    eps
        Floor on a bin's share.

    Examples
    --------
    The first 500 values are the reference; their spread grows 2.5 times at value 2000:

    >>> import random
    >>> rng = random.Random(7)
    >>> stream = [rng.gauss(0, 1) for _ in range(2000)] + [rng.gauss(0, 2.5) for _ in range(1000)]
    >>> detector = PSI(window_size=500)
    >>> for i, x in enumerate(stream):
    ...     detector.update(x)
    ...     if detector.drift_detected:
    ...         print(f"Change detected at index {i}")
    Change detected at index 2280
    >>> detector.rejecting
    True

    The same, a batch at a time:

    >>> PSI(window_size=500).update_many(stream)
    array([2280])
    """

    name = "psi"

    def __init__(self, window_size: int = 1000, reference_size: int | None = None, n_bins: int = 10,
                 threshold: float = 0.25, reference=None, edges=None, eps: float = 1e-4):
        check("window_size", window_size, 1)
        check("n_bins", n_bins, 2)
        super().__init__()
        self.window_size = int(window_size)
        self.reference_size = int(reference_size or window_size)
        self.n_bins = int(n_bins)
        self.threshold = float(threshold)
        self.eps = float(eps)
        self._fixed_edges = None if edges is None else np.asarray(edges, dtype=np.float64)
        self._rejecting = False
        self._collect: list[float] = []
        self.edges: np.ndarray | None = None
        self._psi = 0.0
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, values) -> None:
        v = as_float_array(values)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            raise ValueError("reference is empty")
        if self._fixed_edges is not None:
            edges = self._fixed_edges
        else:
            q = np.quantile(v, np.linspace(0.0, 1.0, self.n_bins + 1)[1:-1])
            edges = np.unique(q)
        counts = np.bincount(np.searchsorted(edges, v, side="left"), minlength=len(edges) + 1)
        self._set_reference_counts(edges, counts)

    def _set_reference_counts(self, edges: np.ndarray, counts: np.ndarray) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self._edges_list = self.edges.tolist()
        self.reference_counts = np.asarray(counts, dtype=np.int64)
        self.n_ref = int(self.reference_counts.sum())
        k, W, eps = len(self.reference_counts), self.window_size, self.eps
        self._rows = [_term_row(max(float(r) / self.n_ref, eps), W, eps) for r in self.reference_counts]
        self._table = np.array(self._rows)
        self._collect = []
        self._ring = np.zeros(W, dtype=np.int64)
        self._head = 0
        self._n_w = 0
        self._counts = [0] * k
        self._terms = [r[0] for r in self._rows]
        self._rejecting = False
        self._drift = False
        self._psi = 0.0

    def _update(self, x: float) -> None:
        self._drift = False
        if self.edges is None:
            self._collect.append(x)
            if len(self._collect) >= self.reference_size:
                self.set_reference(self._collect)
            return
        b = self._bin(x)
        W, head, counts = self.window_size, self._head, self._counts
        if self._n_w == W:
            old = int(self._ring[head])
            counts[old] -= 1
            self._terms[old] = self._rows[old][counts[old]]
        else:
            self._n_w += 1
        self._ring[head] = b
        self._head = (head + 1) % W
        counts[b] += 1
        self._terms[b] = self._rows[b][counts[b]]
        if self._n_w == W:
            self._verdict(self._sum_terms())

    def _bin(self, x: float) -> int:
        return bisect_left(self._edges_list, x)

    def _sum_terms(self) -> float:
        s = 0.0
        for t in self._terms:
            s += t
        return s

    def _verdict(self, value: float) -> None:
        self._psi = value
        rej = value >= self.threshold
        self._flag(rej and not self._rejecting)
        self._rejecting = rej

    def _update_many(self, a: np.ndarray) -> np.ndarray:
        if len(a) > _CHUNK:
            parts = [self._update_many(a[i:i + _CHUNK]) + i for i in range(0, len(a), _CHUNK)]
            return np.concatenate(parts)
        pos, n = 0, len(a)
        if n:
            self._drift = False
        if self.edges is None and n:
            take = min(self.reference_size - len(self._collect), n)
            self._collect.extend(a[:take].tolist())
            pos = take
            if len(self._collect) >= self.reference_size:
                self.set_reference(self._collect)
        if self.edges is None or pos >= n:
            return np.zeros(0, dtype=np.int64)
        W, k = self.window_size, len(self._counts)
        bins = np.searchsorted(self.edges, a[pos:], side="left")
        R = len(bins)
        fill = min(W - self._n_w, R)        # these enter without evicting
        counts0 = np.asarray(self._counts, dtype=np.int64)
        order = np.roll(self._ring[:self._n_w], -self._head) if self._n_w == W else self._ring[:self._n_w]
        combined = np.concatenate((order, bins))
        steps = np.arange(R)
        change = np.zeros((k, R), dtype=np.int64)         # bin x update: +1 in, -1 out
        flat = change.reshape(-1)
        flat[bins * R + steps] += 1
        flat[combined[:R - fill] * R + steps[fill:]] -= 1
        counts = counts0[:, None] + np.cumsum(change, axis=1)
        n_w = np.minimum(self._n_w + steps + 1, W)
        hits: list[int] = []
        if n_w[-1] == W:
            first = int(np.argmax(n_w == W))
            values = self._table[0][counts[0, first:]]
            for b in range(1, k):                         # in bin order, as update adds them
                values = values + self._table[b][counts[b, first:]]
            rej = values >= self.threshold
            prev = np.concatenate(([self._rejecting], rej[:-1]))
            rises = np.flatnonzero(rej & ~prev) + first
            hits = (rises + pos).tolist()
            self.n_detections += len(rises)
            self._rejecting = bool(rej[-1])
            self._drift = bool(len(rises) and rises[-1] == R - 1)
            self._psi = float(values[-1])
        last = combined[-W:] if len(combined) >= W else combined
        self._n_w = int(n_w[-1])
        self._ring[:len(last)] = last
        self._head = self._n_w % W
        self._counts = counts[:, -1].tolist()
        self._terms = [self._rows[b][c] for b, c in enumerate(self._counts)]
        return np.asarray(hits, dtype=np.int64)

    @property
    def rejecting(self) -> bool:
        return self._rejecting

    @property
    def statistic(self) -> float:
        """PSI of the current window (over the values it holds, before it is full too)."""
        if self.edges is None or self._n_w == 0:
            return 0.0
        if self._n_w == self.window_size:
            return self._psi
        return psi(self.reference_counts, self._counts, self.eps)

    @property
    def window_counts(self) -> np.ndarray:
        return np.asarray(self._counts if self.edges is not None else [], dtype=np.int64)

    def reading(self) -> Reading:
        n_ref = self.n_ref if self.edges is not None else len(self._collect)
        n_w = self._n_w if self.edges is not None else 0
        return Reading(self.name, self.statistic, self.threshold, None, self._rejecting,
                       (n_ref, n_w), self.n_detections)

    def _params(self) -> dict:
        return {"window_size": self.window_size, "reference_size": self.reference_size, "n_bins": self.n_bins,
                "threshold": self.threshold, "eps": self.eps,
                "edges": None if self._fixed_edges is None else self._fixed_edges.tolist()}

    def _state(self) -> dict:
        if self.edges is None:
            return {"rejecting": self._rejecting, "collecting": list(self._collect)}
        order = np.roll(self._ring, -self._head) if self._n_w == self.window_size else self._ring[:self._n_w]
        return {"rejecting": self._rejecting, "bin_edges": self.edges.tolist(),
                "reference_counts": self.reference_counts.tolist(), "window_bins": order.tolist(), "psi": self._psi}

    def _load(self, state: dict) -> None:
        if "bin_edges" in state:
            self._set_reference_counts(np.asarray(state["bin_edges"], dtype=np.float64),
                                       np.asarray(state["reference_counts"], dtype=np.int64))
            wb = np.asarray(state["window_bins"], dtype=np.int64)
            self._n_w = len(wb)
            self._ring[:len(wb)] = wb
            self._head = self._n_w % self.window_size
            self._counts = np.bincount(wb, minlength=len(self._counts)).tolist()
            self._terms = [self._rows[b][c] for b, c in enumerate(self._counts)]
            self._psi = float(state["psi"])
        else:
            self._collect = [float(v) for v in state["collecting"]]
        self._rejecting = bool(state["rejecting"])
