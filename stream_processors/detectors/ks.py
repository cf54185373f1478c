"""Two-sample Kolmogorov-Smirnov test between a reference window and a sliding window.

The reference is either pinned (``reference=...``) or the first ``reference_size`` values
the detector sees (the first events of a model version). The current window is the last
``window_size`` values after it. Once the window is full, every update tests
``H0: same distribution``; the detector is *rejecting* while the p-value is below
``alpha``, and ``drift_detected`` is true on the update where it starts rejecting.

How it stays cheap. The reference's distinct values u_1 < ... < u_m cut the line into
2m + 1 slots (below u_1, at u_1, between u_1 and u_2, ...). The two-sided statistic is

    D = max over slots s of |R(s) - W(s)|,   R, W the two empirical CDFs at the slot's
                                             right end (ties handled as scipy does),

and ``n_ref * n_win * D`` is an integer, kept per slot in an int64 array A. A new value in
slot a and the evicted one in slot b change A by ``n_ref`` on the slots between a and b:
up when b < a, down when a < b. So max(A) moves up by at most ``n_ref`` per update of the
first kind and down only with the second, and max(-A) the other way round. The detector
computes max|A| exactly only when enough updates of the right kind have passed for it to
cross the critical value (found once, by the exact p-value): between those moments it
only counts. Results are exact, value by value.

p-values follow ``scipy.stats.ks_2samp(method="auto")``: exact when both samples have at
most 10,000 values (closed form for equal sizes, a lattice-path recursion otherwise),
Smirnov's asymptotic form (``kstwo`` at the effective size) above that.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from functools import lru_cache

import numpy as np

from .base import FloatDetector, Reading, as_float_array, check

__all__ = ["KSWindow", "ks_2samp", "ks_2samp_pvalue"]

MAX_EXACT_N = 10_000


def _prob_outside_square(n: int, h: int) -> float:
    """P(D_{n,n} >= h/n): paths from (0,0) to (n,n) touching x - y = +-h (reflection)."""
    # P = 2 * sum_k (-1)^(k+1) C(2n, n - kh) / C(2n, n), nested so nothing cancels:
    # P = 2 * A1 * (1 - A2/A1 * (1 - A3/A2 * (...)))
    p = 0.0
    k = n // h
    while k >= 0:
        ratio = 1.0
        for j in range(h):      # C(2n, n - kh - h) / C(2n, n - kh) ... down to k = 0
            ratio = (n - k * h - j) * ratio / (n + k * h + j + 1)
        p = ratio * (1.0 - p)
        k -= 1
    return 2.0 * p


def _prob_outside_band(n1: int, n2: int, h: int) -> float:
    """P(D >= h / lcm(n1, n2)) by the probability mass of lattice paths, diagonal by diagonal.

    A uniformly random path from (0, 0) to (n1, n2) is an urn draw: from (x, y) it steps in
    x with probability (n1 - x) / (n1 + n2 - x - y). Mass that reaches a point with
    |x * n2/g - y * n1/g| >= h is absorbed; the absorbed total is the p-value (no 1 - q).
    """
    g = math.gcd(n1, n2)
    cx, cy = n2 // g, n1 // g             # |F1 - F2| * lcm = |x * cx - y * cy|
    xs = np.arange(n1 + 1)
    cur = np.zeros(n1 + 2)                # cur[x + 1] = mass at (x, d - x)
    cur[1] = 1.0
    lo, hi = 0, 0                         # support of cur on the current diagonal
    p = 0.0
    total = n1 + n2
    for d in range(total):
        r = total - d
        a = max(lo, d + 1 - n2)
        b = min(hi + 1, n1, d + 1)
        x = xs[a:b + 1]
        new = (cur[a:b + 1] * (n1 - x + 1) + cur[a + 1:b + 2] * (n2 - d + x)) / r
        # on diagonal d + 1, x * cx - y * cy = x * (cx + cy) - (d + 1) * cy grows with x: the
        # points at or past -h are the first n_low, those at or past +h start at i_high
        n_low = max(0, min(b, ((d + 1) * cy - h) // (cx + cy)) - a + 1)
        i_high = min(len(new), max(0, -(-(h + (d + 1) * cy) // (cx + cy)) - a))
        if n_low or i_high < len(new):
            p += float(np.concatenate((new[:n_low], new[i_high:])).sum())
            new[:n_low] = 0.0
            new[i_high:] = 0.0
        cur = np.zeros(n1 + 2)
        cur[a + 1:b + 2] = new
        nz = np.flatnonzero(new)
        if len(nz) == 0:
            return p
        lo, hi = a + int(nz[0]), a + int(nz[-1])
    return p


@lru_cache(maxsize=1 << 16)
def ks_2samp_pvalue(n1: int, n2: int, h: int) -> float:
    """Two-sided p-value of D = h / lcm(n1, n2), as ``scipy.stats.ks_2samp(method='auto')``.

    Cached: detectors with the same window sizes ask for the same few values of h."""
    if h <= 0:
        return 1.0
    g = math.gcd(n1, n2)
    lcm = n1 // g * n2
    if max(n1, n2) <= MAX_EXACT_N:
        if n1 == n2:
            p = _prob_outside_square(n1, h)
        else:
            p = _prob_outside_band(n1, n2, h)
        if 0.0 <= p <= 1.0:
            return p
    from scipy.stats import kstwo

    m, n = sorted([float(n1), float(n2)], reverse=True)
    en = m * n / (m + n)
    return float(np.clip(kstwo.sf(h / lcm, np.round(en)), 0.0, 1.0))


def ks_2samp(a, b) -> tuple[float, float]:
    """(D, p-value) of two samples, as ``scipy.stats.ks_2samp(a, b)`` (two-sided, method "auto")."""
    a = np.sort(as_float_array(a))
    b = np.sort(as_float_array(b))
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        raise ValueError("both samples must be non-empty")
    both = np.concatenate((a, b))
    gap = np.searchsorted(a, both, side="right") * n2 - np.searchsorted(b, both, side="right") * n1
    g = math.gcd(n1, n2)
    h = int(np.abs(gap).max()) // g          # D in units of 1 / lcm(n1, n2)
    return h / (n1 // g * n2), ks_2samp_pvalue(n1, n2, h)


class KSWindow(FloatDetector):
    """Kolmogorov-Smirnov drift detector: reference window vs. sliding window.

    Parameters
    ----------
    window_size
        Values in the sliding (current) window.
    reference_size
        Values taken as the reference when none is pinned (default: ``window_size``).
    alpha
        Significance level: rejecting while the p-value is below it. The test runs at every
        update, so this is a per-update level: on a stationary stream with windows of 500,
        1e-3 gives about 3,400 rising edges per million values, 1e-5 about 100, 1e-6 about 4.
    reference
        A pinned baseline sample; when given, every value goes to the sliding window.

    Examples
    --------
    The first 200 values are the reference; the mean moves by one at value 1000:

    >>> import random
    >>> rng = random.Random(7)
    >>> stream = [rng.gauss(0, 1) for _ in range(1000)] + [rng.gauss(1, 1) for _ in range(1000)]
    >>> ks = KSWindow(window_size=200, alpha=1e-4)
    >>> for i, x in enumerate(stream):
    ...     ks.update(x)
    ...     if ks.drift_detected:
    ...         print(f"Change detected at index {i}")
    Change detected at index 1112
    >>> ks.rejecting
    True

    The same, a batch at a time:

    >>> KSWindow(window_size=200, alpha=1e-4).update_many(stream)
    array([1112])
    """

    name = "ks"

    def __init__(self, window_size: int = 500, reference_size: int | None = None,
                 alpha: float = 1e-5, reference=None):
        check("window_size", window_size, 1)
        check("alpha", alpha, 0, 1)
        super().__init__()
        self.window_size = int(window_size)
        self.reference_size = int(reference_size or window_size)
        self.alpha = float(alpha)
        self._rejecting = False
        self._collect: list[float] = []
        self._u: np.ndarray | None = None
        if reference is not None:
            self.set_reference(reference)

    # -- reference ----------------------------------------------------------------------
    def set_reference(self, values) -> None:
        """Pin a reference sample; the sliding window starts empty."""
        v = as_float_array(values)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            raise ValueError("reference is empty")
        u, counts = np.unique(v, return_counts=True)
        self._set_distinct(u, counts)

    def _set_distinct(self, u: np.ndarray, counts: np.ndarray) -> None:
        self._u = u
        self._u_list = u.tolist()
        self._ref_counts = counts.astype(np.int64)
        self.n_ref = int(counts.sum())
        c = np.concatenate(([0], np.cumsum(self._ref_counts)))
        slots = 2 * len(u) + 1
        self._cref = c[(np.arange(slots) + 1) // 2]          # reference count at each slot
        self._collect = []
        W = self.window_size
        self._g = math.gcd(self.n_ref, W)
        self._lcm = self.n_ref // self._g * W
        self._h_crit = self._critical_h()
        self._H = self._h_crit * self._g                      # in units of A
        self._ring = np.zeros(W, dtype=np.int64)              # slots, oldest at _head once full
        self._ring_vals = np.zeros(W)
        self._head = 0
        self._n_w = 0
        self._A: np.ndarray | None = None                      # set when the window fills
        self._need = (0, 0)                                    # up, down updates before a verdict may change
        self._seen = [0, 0]                                    # up, down updates since the last evaluation
        self._rejecting = False
        self._drift = False

    def _critical_h(self) -> int:
        """Smallest h (units of 1/lcm) whose p-value is below alpha; lcm + 1 if none."""
        n1, n2, lcm, alpha = self.n_ref, self.window_size, self._lcm, self.alpha
        p = lambda h: ks_2samp_pvalue(n1, n2, h)  # noqa: E731
        if p(lcm) >= alpha:
            return lcm + 1
        # Start from Smirnov's asymptotic critical value, bracket, then bisect.
        c = math.sqrt(-0.5 * math.log(alpha / 2.0))
        guess = min(max(1, int(c * math.sqrt((n1 + n2) / (n1 * n2)) * lcm)), lcm)
        lo, hi = guess, guess                 # p(lo) >= alpha > p(hi) once bracketed
        step = max(1, lcm // 200)
        if p(guess) < alpha:
            while lo > 1 and p(lo) < alpha:
                hi = lo
                lo = max(1, lo - step)
                step *= 2
            if p(lo) < alpha:
                return lo
        else:
            while p(hi) >= alpha:
                lo = hi
                hi = min(lcm, hi + step)
                step *= 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if p(mid) < alpha:
                hi = mid
            else:
                lo = mid
        return hi

    def _slot(self, x: float) -> int:
        u = self._u_list
        j = bisect_left(u, x)
        return 2 * j + (1 if j < len(u) and u[j] == x else 0)

    def _slots(self, v: np.ndarray) -> np.ndarray:
        u = self._u
        j = np.searchsorted(u, v, side="left")
        eq = u[np.minimum(j, len(u) - 1)] == v
        eq &= j < len(u)
        return 2 * j + eq

    # -- one value ----------------------------------------------------------------------
    def _update(self, x: float) -> None:
        self._drift = False
        if self._u is None:
            self._collect.append(x)
            if len(self._collect) >= self.reference_size:
                self.set_reference(self._collect)
            return
        s = self._slot(x)
        W, head = self.window_size, self._head
        if self._n_w < W:
            self._ring[head] = s
            self._ring_vals[head] = x
            self._head = (head + 1) % W
            self._n_w += 1
            if self._n_w == W:
                self._fill_done()
            return
        old = int(self._ring[head])
        self._ring[head] = s
        self._ring_vals[head] = x
        self._head = (head + 1) % W
        if s < old:
            self._A[s:old] -= self.n_ref
            self._seen[1] += 1
        elif old < s:
            self._A[old:s] += self.n_ref
            self._seen[0] += 1
        up, down = self._seen[0] >= self._need[0], self._seen[1] >= self._need[1]
        if (up and down) if self._rejecting else (up or down):
            self._evaluate()

    def _fill_done(self) -> None:
        cnt = np.bincount(self._ring, minlength=len(self._cref))
        self._A = self._cref * self.window_size - np.cumsum(cnt) * self.n_ref
        self._evaluate()

    def _evaluate(self) -> None:
        A, H, n_ref = self._A, self._H, self.n_ref
        top, bottom = int(A.max()), int(-A.min())
        rej = top >= H or bottom >= H
        self._flag(rej and not self._rejecting)
        self._rejecting = rej
        if rej:   # rejecting until each side at or past H has been brought back below it
            self._need = (-(-(bottom - H + 1) // n_ref) if bottom >= H else 0,
                          -(-(top - H + 1) // n_ref) if top >= H else 0)
        else:     # not until either side could reach H
            self._need = (-(-(H - top) // n_ref), -(-(H - bottom) // n_ref))
        self._seen = [0, 0]

    # -- a batch ------------------------------------------------------------------------
    def _update_many(self, a: np.ndarray) -> np.ndarray:
        hits: list[int] = []
        pos, n = 0, len(a)
        if n:
            self._drift = False
        if self._u is None and pos < n:
            take = min(self.reference_size - len(self._collect), n)
            self._collect.extend(a[:take].tolist())
            pos = take
            if len(self._collect) >= self.reference_size:
                self.set_reference(self._collect)
        W = self.window_size
        if self._u is not None and self._n_w < W - 1 and pos < n:
            take = min(W - 1 - self._n_w, n - pos)
            v = a[pos:pos + take]
            i0 = self._n_w
            self._ring[i0:i0 + take] = self._slots(v)
            self._ring_vals[i0:i0 + take] = v
            self._n_w += take
            self._head = self._n_w % W
            pos += take
        if self._u is not None and self._n_w == W - 1 and pos < n:
            self._update(float(a[pos]))
            if self._drift:
                hits.append(pos)
            pos += 1
        if pos < n:
            hits.extend(pos + h for h in self._steady(a[pos:]))
        return np.asarray(hits, dtype=np.int64)

    def _steady(self, v: np.ndarray) -> list[int]:
        """Full window: slide ``v`` through, evaluating only where the verdict may change."""
        W, R = self.window_size, len(v)
        ins = self._slots(v)
        head = self._head
        combined = np.concatenate((self._ring[head:], self._ring[:head], ins))   # removed[t] = combined[t]
        removed = combined[:R]
        at = (np.flatnonzero(removed < ins).tolist(),      # the up updates, the down updates
              np.flatnonzero(ins < removed).tolist())
        A = self._A
        hits: list[int] = []
        applied = 0                        # A reflects the window after update applied - 1
        self._drift = False
        while applied < R:
            # the first update from here on after which enough of each kind will have passed
            done = [bisect_left(at[k], applied) for k in (0, 1)]
            when = []
            for k in (0, 1):
                i = done[k] + self._need[k] - self._seen[k] - 1
                when.append(applied if i < done[k] else at[k][i] if i < len(at[k]) else R)
            te = max(when) if self._rejecting else min(when)
            if te >= R:
                for k in (0, 1):
                    self._seen[k] += len(at[k]) - done[k]
                self._apply(A, removed[applied:], ins[applied:])
                break
            self._apply(A, removed[applied:te + 1], ins[applied:te + 1])
            applied = te + 1
            self._evaluate()
            if self._drift:
                hits.append(te)
        if hits and hits[-1] != R - 1:
            self._drift = False
        last = combined[-W:]
        self._ring[:] = last
        vals = np.concatenate((self._ring_vals[head:], self._ring_vals[:head], v))[-W:]
        self._ring_vals[:] = vals
        self._head = 0
        return hits

    def _apply(self, A: np.ndarray, removed: np.ndarray, inserted: np.ndarray) -> None:
        """A after values leave from the slots ``removed`` and enter at ``inserted``."""
        S = len(A)
        delta = np.bincount(removed, minlength=S)
        delta -= np.bincount(inserted, minlength=S)
        np.cumsum(delta, out=delta)
        delta *= self.n_ref
        A += delta

    # -- readable state -----------------------------------------------------------------
    @property
    def rejecting(self) -> bool:
        """True while the window differs significantly from the reference."""
        return self._rejecting

    @property
    def reference_ready(self) -> bool:
        return self._u is not None

    @property
    def window_count(self) -> int:
        return self._n_w if self._u is not None else 0

    @property
    def window(self) -> np.ndarray:
        """The sliding window's values, oldest first."""
        if self._u is None:
            return np.zeros(0)
        if self._n_w < self.window_size:
            return self._ring_vals[:self._n_w].copy()
        return np.roll(self._ring_vals, -self._head)

    @property
    def reference(self) -> np.ndarray:
        if self._u is None:
            return np.asarray(self._collect, dtype=np.float64)
        return np.repeat(self._u, self._ref_counts)

    def _h_now(self) -> tuple[int, int]:
        """(h in units of 1/lcm(n_ref, n_w), n_w) for the current window, exactly."""
        if self._u is None:  # still collecting the reference
            return 0, 0
        n_w = self._n_w
        if n_w == 0:
            return 0, n_w
        if n_w == self.window_size and self._A is not None:
            A = self._A
        else:
            cnt = np.bincount(self._ring[:n_w], minlength=len(self._cref))
            A = self._cref * n_w - np.cumsum(cnt) * self.n_ref
        max_a = int(max(A.max(), -A.min()))
        return max_a // math.gcd(self.n_ref, n_w), n_w

    @property
    def statistic(self) -> float:
        """D, the largest gap between the two empirical CDFs (0.0 until both are non-empty)."""
        h, n_w = self._h_now()
        if n_w == 0:
            return 0.0
        return h * 1.0 / (self.n_ref // math.gcd(self.n_ref, n_w) * n_w)

    @property
    def p_value(self) -> float:
        h, n_w = self._h_now()
        if n_w == 0:
            return 1.0
        return ks_2samp_pvalue(self.n_ref, n_w, h)

    @property
    def critical_value(self) -> float:
        """Smallest D that rejects at ``alpha`` with a full window (inf if none can)."""
        if self._u is None:
            return math.inf
        return self._h_crit / self._lcm if self._h_crit <= self._lcm else math.inf

    def reading(self) -> Reading:
        n_ref = self.n_ref if self._u is not None else len(self._collect)
        return Reading(self.name, self.statistic, self.alpha, self.p_value, self._rejecting,
                       (n_ref, self.window_count), self.n_detections)

    # -- checkpoints --------------------------------------------------------------------
    def _params(self) -> dict:
        return {"window_size": self.window_size, "reference_size": self.reference_size, "alpha": self.alpha}

    def _state(self) -> dict:
        if self._u is None:
            return {"rejecting": self._rejecting, "collecting": list(self._collect)}
        return {"rejecting": self._rejecting,
                "reference": {"values": self._u.tolist(), "counts": self._ref_counts.tolist()},
                "window": self.window.tolist()}

    def _load(self, state: dict) -> None:
        if "reference" in state:
            self._set_distinct(np.asarray(state["reference"]["values"], dtype=np.float64),
                               np.asarray(state["reference"]["counts"], dtype=np.int64))
            w = np.asarray(state["window"], dtype=np.float64)
            n = len(w)
            self._ring[:n] = self._slots(w) if n else self._ring[:0]
            self._ring_vals[:n] = w
            self._n_w = n
            self._head = n % self.window_size
            if n == self.window_size:
                cnt = np.bincount(self._ring, minlength=len(self._cref))
                self._A = self._cref * self.window_size - np.cumsum(cnt) * self.n_ref
        else:
            self._collect = [float(v) for v in state["collecting"]]
        self._rejecting = bool(state["rejecting"])
