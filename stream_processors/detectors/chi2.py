"""Chi-square test of homogeneity for a categorical feature (for example the finish reason).

The reference's category counts (pinned, or the first ``reference_size`` values) and the
sliding window's counts form a 2 x K table over the categories seen in either; the
statistic is Pearson's chi-square of that table with K - 1 degrees of freedom, with Yates'
continuity correction when K = 2, as ``scipy.stats.chi2_contingency`` computes it. The
detector is rejecting while the p-value is below ``alpha`` (once the window is full), and
``drift_detected`` is true on the update where that starts. Categories are any hashable
values; one the reference never saw simply has a reference count of 0.

With both sample sizes fixed, a category's two cells depend only on its window count, so
each category's contribution is tabulated (window_size + 1 values) the first time it is
seen, and the statistic is summed in category order, by ``update`` and ``update_many``
alike.
"""

from __future__ import annotations

from collections import Counter
from itertools import repeat

import numpy as np
from scipy.special import chdtrc, chdtri

from .base import Detector, Reading, check

__all__ = ["ChiSquare", "chi2_homogeneity"]

_CHUNK = 1 << 15


def _cells(r: int, c: int, n_ref: int, n_w: int, yates: bool) -> float:
    """Both cells' (O - E)^2 / E for a category with counts r (reference) and c (window)."""
    n = n_ref + n_w
    col = r + c
    if col == 0:
        return 0.0
    out = 0.0
    for obs, row in ((r, n_ref), (c, n_w)):
        exp = row * col / n
        o = float(obs)
        if yates:
            diff = exp - o
            o += min(0.5, abs(diff)) * (1.0 if diff > 0 else -1.0 if diff < 0 else 0.0)
        out += (o - exp) ** 2 / exp
    return out


def chi2_homogeneity(a: dict, b: dict) -> tuple[float, float, int]:
    """(statistic, p-value, degrees of freedom) of two samples' category counts (category ->
    count), as ``scipy.stats.chi2_contingency`` on the 2 x K table of the categories either
    has (Yates' correction when K = 2); (0.0, 1.0, 0) when fewer than two categories occur."""
    n_a, n_b = sum(a.values()), sum(b.values())
    cats = [c for c in dict.fromkeys([*a, *b]) if a.get(c, 0) + b.get(c, 0) > 0]
    if len(cats) < 2:
        return 0.0, 1.0, 0
    stat = 0.0
    for c in cats:
        stat += _cells(a.get(c, 0), b.get(c, 0), n_a, n_b, len(cats) == 2)
    return stat, float(chdtrc(len(cats) - 1, stat)), len(cats) - 1


class ChiSquare(Detector):
    """Chi-square drift detector for categories.

    Parameters
    ----------
    window_size
        Values in the sliding window.
    reference_size
        Values taken as the reference when none is pinned (default: ``window_size``).
    alpha
        Significance level, per update (the test runs at every update once the window is full).
    reference
        Pinned baseline: a mapping category -> count, or a sequence of categories.

    Examples
    --------
    The first 1000 finish reasons are the reference; "length" becomes more common at 3000:

    >>> import random
    >>> rng = random.Random(7)
    >>> reasons = ["stop", "length", "error"]
    >>> stream = (rng.choices(reasons, weights=[85, 10, 5], k=3000)
    ...           + rng.choices(reasons, weights=[65, 30, 5], k=2000))
    >>> chi2 = ChiSquare(window_size=500)
    >>> for i, x in enumerate(stream):
    ...     chi2.update(x)
    ...     if chi2.drift_detected:
    ...         print(f"Change detected at index {i}")
    Change detected at index 3205
    >>> chi2.rejecting
    True

    The same, a batch at a time:

    >>> ChiSquare(window_size=500).update_many(stream)
    array([3205])
    """

    name = "chi2"

    def __init__(self, window_size: int = 1000, reference_size: int | None = None,
                 alpha: float = 1e-5, reference=None):
        check("window_size", window_size, 1)
        check("alpha", alpha, 0, 1)
        super().__init__()
        self.window_size = int(window_size)
        self.reference_size = int(reference_size or window_size)
        self.alpha = float(alpha)
        self._rejecting = False
        self._collect: list = []
        self._ready = False
        self._stat, self._p, self._dof = 0.0, 1.0, 0
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, reference) -> None:
        counts = Counter(reference) if not hasattr(reference, "items") else Counter(dict(reference))
        counts = {k: int(v) for k, v in counts.items() if v > 0}
        if not counts:
            raise ValueError("reference is empty")
        self._categories: list = []
        self._index: dict = {}
        self._ref: list[int] = []
        self.n_ref = sum(counts.values())
        self._plain: list[list[float]] = []
        self._yates: list[list[float]] = []
        self._tables = None
        for cat, cnt in counts.items():
            self._add_category(cat, cnt)
        self._collect = []
        self._ready = True
        self._ring = np.zeros(self.window_size, dtype=np.int64)
        self._head = 0
        self._n_w = 0
        self._counts = [0] * len(self._categories)
        self._rejecting = False
        self._drift = False
        self._stat, self._p, self._dof = 0.0, 1.0, 0

    def _add_category(self, cat, ref_count: int = 0) -> int:
        i = len(self._categories)
        self._categories.append(cat)
        self._index[cat] = i
        self._ref.append(ref_count)
        W = self.window_size
        self._plain.append([_cells(ref_count, c, self.n_ref, W, False) for c in range(W + 1)])
        self._yates.append([_cells(ref_count, c, self.n_ref, W, True) for c in range(W + 1)])
        self._tables = None                 # the two tables as arrays, made when a batch needs them
        if hasattr(self, "_counts"):
            self._counts.append(0)
        return i

    def update(self, x) -> None:
        """Add one category; ``None`` is skipped (and clears ``drift_detected``)."""
        self._drift = False
        if x is None:
            return
        if not self._ready:
            self._collect.append(x)
            if len(self._collect) >= self.reference_size:
                self.set_reference(self._collect)
            return
        i = self._index.get(x)
        if i is None:
            i = self._add_category(x)
        W, head = self.window_size, self._head
        if self._n_w == W:
            self._counts[self._ring[head]] -= 1
        else:
            self._n_w += 1
        self._ring[head] = i
        self._head = (head + 1) % W
        self._counts[i] += 1
        if self._n_w == W:
            self._score()

    def _score(self) -> None:
        counts, ref = self._counts, self._ref
        k = 0
        for i in range(len(counts)):
            if ref[i] + counts[i]:
                k += 1
        rows = self._yates if k == 2 else self._plain
        s = 0.0
        for i in range(len(counts)):
            s += rows[i][counts[i]]
        self._dof = k - 1
        self._stat = s if k > 1 else 0.0
        self._p = float(chdtrc(k - 1, s)) if k > 1 else 1.0
        rej = self._p < self.alpha
        self._flag(rej and not self._rejecting)
        self._rejecting = rej

    def update_many(self, xs) -> np.ndarray:
        """As ``update`` on each value; returns the positions where drift was detected."""
        xs = list(xs)
        if len(xs) > _CHUNK:
            parts = [self.update_many(xs[i:i + _CHUNK]) + i for i in range(0, len(xs), _CHUNK)]
            return np.concatenate(parts)
        if None in xs:
            keep = [j for j, v in enumerate(xs) if v is not None]
            hits = self.update_many([xs[j] for j in keep])
            if xs and xs[-1] is None:
                self._drift = False
            return np.asarray(keep, dtype=np.int64)[hits] if len(hits) else np.zeros(0, dtype=np.int64)
        pos, n = 0, len(xs)
        if n:
            self._drift = False
        if not self._ready and n:
            take = min(self.reference_size - len(self._collect), n)
            self._collect.extend(xs[:take])
            pos = take
            if len(self._collect) >= self.reference_size:
                self.set_reference(self._collect)
        if not self._ready or pos >= n:
            return np.zeros(0, dtype=np.int64)
        codes = list(map(self._index.get, xs[pos:], repeat(-1)))
        idx = np.asarray(codes, dtype=np.int64)
        if (idx < 0).any():  # categories seen for the first time
            idx = np.asarray([self._index[v] if v in self._index else self._add_category(v) for v in xs[pos:]])
        W, K, R = self.window_size, len(self._categories), len(idx)
        ring, head = self._ring, self._head
        combined = np.concatenate((ring[head:], ring[:head], idx) if self._n_w == W else (ring[:self._n_w], idx))
        fill = min(W - self._n_w, R)
        steps = np.arange(R)
        change = np.zeros((K, R), dtype=np.int64)         # category x update: +1 in, -1 out
        flat = change.reshape(-1)
        flat[idx * R + steps] += 1
        flat[combined[:R - fill] * R + steps[fill:]] -= 1
        counts = np.asarray(self._counts, dtype=np.int64)[:, None] + np.cumsum(change, axis=1)
        n_w = np.minimum(self._n_w + steps + 1, W)
        hits: list[int] = []
        if n_w[-1] == W:
            first = int(np.argmax(n_w == W))
            c = counts[:, first:]
            k = ((c + np.asarray(self._ref, dtype=np.int64)[:, None]) > 0).sum(axis=0)
            if self._tables is None:
                self._tables = np.asarray(self._plain), np.asarray(self._yates)
            plain, yates = self._tables
            two = k == 2
            stat = np.where(two, yates[0][c[0]], plain[0][c[0]])
            for j in range(1, K):                         # in category order, as update adds them
                stat = stat + np.where(two, yates[j][c[j]], plain[j][c[j]])
            stat = np.where(k > 1, stat, 0.0)
            rej = self._rejects(k - 1, stat)
            prev = np.concatenate(([self._rejecting], rej[:-1]))
            rises = np.flatnonzero(rej & ~prev) + first
            hits = (rises + pos).tolist()
            self.n_detections += len(rises)
            self._rejecting = bool(rej[-1])
            self._drift = bool(len(rises) and rises[-1] == R - 1)
            self._dof = int(k[-1] - 1)
            self._stat = float(stat[-1])
            self._p = float(chdtrc(self._dof, self._stat)) if self._dof > 0 else 1.0
        last = combined[-W:]
        self._n_w = int(n_w[-1])
        self._ring[:len(last)] = last
        self._head = self._n_w % W
        self._counts = counts[:, -1].tolist()
        return np.asarray(hits, dtype=np.int64)

    def _rejects(self, dof: np.ndarray, stat: np.ndarray) -> np.ndarray:
        """p < alpha for each (dof, statistic). The p-value (slow to compute) is only
        computed for statistics near the critical value; elsewhere the comparison with the
        critical value decides."""
        rej = np.zeros(len(stat), dtype=bool)
        for d in np.unique(dof[dof > 0]).tolist():
            at = np.flatnonzero(dof == d)
            s = stat[at]
            crit = float(chdtri(d, self.alpha))
            r = s > crit * (1 + 1e-6)
            near = np.flatnonzero(~r & (s >= crit * (1 - 1e-6)))
            r[near] = chdtrc(d, s[near]) < self.alpha
            rej[at] = r
        return rej

    @property
    def categories(self) -> list:
        return list(self._categories) if self._ready else []

    @property
    def rejecting(self) -> bool:
        return self._rejecting

    @property
    def statistic(self) -> float:
        return self._stat

    @property
    def p_value(self) -> float:
        return self._p

    @property
    def dof(self) -> int:
        return self._dof

    def table(self) -> tuple[list, np.ndarray]:
        """(categories, 2 x K counts) over the categories with a non-zero count."""
        if not self._ready:
            return [], np.zeros((2, 0), dtype=np.int64)
        keep = [i for i in range(len(self._categories)) if self._ref[i] + self._counts[i] > 0]
        t = np.array([[self._ref[i] for i in keep], [self._counts[i] for i in keep]], dtype=np.int64)
        return [self._categories[i] for i in keep], t

    def reading(self) -> Reading:
        n_ref = self.n_ref if self._ready else len(self._collect)
        return Reading(self.name, self._stat, self.alpha, self._p, self._rejecting,
                       (n_ref, self._n_w if self._ready else 0), self.n_detections)

    def _params(self) -> dict:
        return {"window_size": self.window_size, "reference_size": self.reference_size, "alpha": self.alpha}

    def _state(self) -> dict:
        st = {"rejecting": self._rejecting, "stat": self._stat, "p": self._p, "dof": self._dof}
        if not self._ready:
            st["collecting"] = list(self._collect)
        else:
            order = np.concatenate((self._ring[self._head:], self._ring[:self._head])) \
                if self._n_w == self.window_size else self._ring[:self._n_w]
            st["categories"] = list(self._categories)
            st["reference_counts"] = list(self._ref)
            st["window"] = [self._categories[i] for i in order.tolist()]
        return st

    def _load(self, state: dict) -> None:
        if "categories" in state:
            self.set_reference({c: r for c, r in zip(state["categories"], state["reference_counts"]) if r > 0})
            for c in state["categories"]:
                if c not in self._index:
                    self._add_category(c)
            idx = [self._index[c] for c in state["window"]]
            self._n_w = len(idx)
            self._ring[:len(idx)] = idx
            self._head = self._n_w % self.window_size
            self._counts = [0] * len(self._categories)
            for i in idx:
                self._counts[i] += 1
        else:
            self._collect = list(state["collecting"])
        self._rejecting = bool(state["rejecting"])
        self._stat, self._p, self._dof = float(state["stat"]), float(state["p"]), int(state["dof"])
