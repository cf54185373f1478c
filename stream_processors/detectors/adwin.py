"""ADWIN: adaptive windowing over an exponential histogram (Bifet and Gavaldà, 2007).

The window is kept as rows of buckets: row ``i`` holds up to ``max_buckets`` buckets of
``2**i`` values each (their sum and their sum of squared deviations), oldest first. A new
value enters row 0; a row that reaches ``max_buckets + 1`` merges its two oldest buckets
into one bucket of the next row. A window of width W therefore needs at most
``max_buckets * (log2(W) + 1)`` buckets, and an update costs O(log W) amortised.

Every ``clock`` updates the detector tries each bucket boundary as a cut between an older
sub-window W0 and a newer W1, and declares a change when, for some cut,

    |mean(W0) - mean(W1)| > sqrt(2 m var(W) ln(2 ln(W) / delta)) + 2/3 m ln(2 ln(W) / delta)

with ``m = 1/(n0 - mwl + 1) + 1/(n1 - mwl + 1)`` (the variance-aware bound of the paper's
ADWIN2, with the false-alarm probability held under ``delta``). On a change it drops the
oldest bucket until no cut is significant.

The arithmetic, its order included, follows river's ``drift.ADWIN`` (``clock``,
``max_buckets``, ``min_window_length``, ``grace_period``; and, like river, the window is
cleared at the update after a detection), so both detect at the same indices on the same
data. ``update_many`` gives exactly the results of calling ``update`` on each value, with
the window arithmetic vectorised over a whole batch.
"""

from __future__ import annotations

import math

import numpy as np

from .base import FloatDetector, Reading, check

__all__ = ["ADWIN"]

_SCALAR_BELOW = 192   # a batch this short goes faster value by value than set up for numpy


class ADWIN(FloatDetector):
    """Adaptive windowing drift detector.

    Parameters
    ----------
    delta
        Confidence: the probability of a false alarm is bounded by ``delta``.
    clock
        Check for a change every ``clock`` updates.
    max_buckets
        Buckets of one size kept before two are merged (M in the paper).
    min_window_length
        Smallest sub-window (W0 or W1) a cut may leave.
    grace_period
        No check until the window holds more than this many values.

    Examples
    --------
    A thousand values from {0, 1}, then a thousand from {4, ..., 7}:

    >>> import random
    >>> rng = random.Random(12345)
    >>> stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    >>> adwin = ADWIN()
    >>> for i, x in enumerate(stream):
    ...     adwin.update(x)
    ...     if adwin.drift_detected:
    ...         print(f"Change detected at index {i}, input value: {x}")
    Change detected at index 1023, input value: 4

    The same, a batch at a time:

    >>> ADWIN().update_many(stream)
    array([1023])
    """

    name = "adwin"

    def __init__(self, delta: float = 0.002, clock: int = 32, max_buckets: int = 5,
                 min_window_length: int = 5, grace_period: int = 10):
        check("delta", delta, 0, 1)
        check("clock", clock, 1)
        check("max_buckets", max_buckets, 1)
        check("min_window_length", min_window_length, 1)
        check("grace_period", grace_period, 0)
        super().__init__()
        self.delta = float(delta)
        self.clock = int(clock)
        self.max_buckets = int(max_buckets)
        self.min_window_length = int(min_window_length)
        self.grace_period = int(grace_period)
        self._statistic = 0.0
        self._last_cut: tuple[int, int, float, float] | None = None
        self._clear()

    def _clear(self) -> None:
        self._totals: list[list[float]] = [[]]      # row i: bucket sums, oldest first
        self._variances: list[list[float]] = [[]]   # row i: bucket sums of squared deviations
        self._width = 0
        self._total = 0.0
        self._variance = 0.0                        # sum of squared deviations in the window
        self._tick = 0
        self._reset_pending = False

    # -- one value ----------------------------------------------------------------------
    def _update(self, x: float) -> None:
        if self._reset_pending:
            self._clear()
        totals = self._totals
        totals[0].append(x)
        self._variances[0].append(0.0)
        w = self._width + 1
        self._width = w
        if w > 1:
            dv = x - self._total / (w - 1)
            self._variance += (w - 1) * dv * dv / w
        self._total += x
        if len(totals[0]) > self.max_buckets:
            self._compress()
        self._tick += 1
        if self._tick % self.clock == 0 and w > self.grace_period and w > 1:
            self._flag(self._detect())
        else:
            self._drift = False

    def _compress(self) -> None:
        totals, variances, mb = self._totals, self._variances, self.max_buckets
        i = 0
        while len(totals[i]) == mb + 1:
            row_t, row_v = totals[i], variances[i]
            n1 = float(1 << i)
            t0, t1 = row_t[0], row_t[1]
            mu1 = t0 / n1
            mu2 = t1 / n1
            temp = n1 * 0.5 * (mu1 - mu2) * (mu1 - mu2)
            v12 = row_v[0] + row_v[1] + temp
            if i + 1 == len(totals):
                totals.append([])
                variances.append([])
            totals[i + 1].append(t0 + t1)
            variances[i + 1].append(v12)
            del row_t[:2]
            del row_v[:2]
            if len(totals[i + 1]) <= mb:
                break
            i += 1

    def _delete_oldest(self) -> None:
        totals, variances = self._totals, self._variances
        last = len(totals) - 1
        n = float(1 << last)
        u = totals[last][0]
        v = variances[last][0]
        mu = u / n
        self._width -= 1 << last
        self._total -= u
        w = self._width
        mu_window = self._total / w
        self._variance -= v + n * w * (mu - mu_window) * (mu - mu_window) / (n + w)
        del totals[last][0]
        del variances[last][0]
        if not totals[last] and last > 0:
            totals.pop()
            variances.pop()

    def _detect(self) -> bool:
        """Try every cut; drop the oldest bucket while one is significant."""
        mwl, delta = self.min_window_length, self.delta
        detected = False
        best = 0.0
        while True:
            totals = self._totals
            w = self._width
            var_w = self._variance / w
            dprime = math.log(2.0 * math.log(w) / delta)
            n0, n1, u0, u1 = 0, w, 0.0, self._total
            cut = None
            for i in range(len(totals) - 1, -1, -1):
                size = 1 << i
                for t in totals[i]:
                    n0 += size
                    n1 -= size
                    u0 += t
                    u1 -= t
                    if n1 < mwl:
                        break     # the last cut(s): W1 too small, and only shrinks from here
                    if n0 < mwl:
                        continue
                    m = 1.0 / (n0 - mwl + 1) + 1.0 / (n1 - mwl + 1)
                    s = 2.0 * m * var_w * dprime
                    eps = (math.sqrt(s) if s >= 0.0 else math.nan) + 2.0 / 3.0 * dprime * m
                    dm = abs(u0 / n0 - u1 / n1)
                    if eps > 0.0 and dm / eps > best:
                        best = dm / eps
                    if dm > eps:
                        cut = (n0, n1, u0 / n0, u1 / n1)
                        break
                if cut is not None or n1 < mwl:
                    break
            if cut is None:
                break
            detected = True
            self._last_cut = cut
            if w > 0:
                self._delete_oldest()
        self._statistic = best
        if detected:
            self._reset_pending = True
        return detected

    # -- a batch ------------------------------------------------------------------------
    def _update_many(self, a: np.ndarray, on_drift=None) -> np.ndarray:
        hits: list[int] = []
        pos, n = 0, len(a)
        if n < _SCALAR_BELOW:
            for pos, x in enumerate(a.tolist()):
                self._update(x)
                if self._drift:
                    hits.append(pos)
                    if on_drift is not None:
                        on_drift(pos)
            return np.asarray(hits, dtype=np.int64)
        chunk = min(max(self.clock * 256, self.clock), 1 << 14)
        while pos < n:
            if self._reset_pending:
                self._clear()
            end = min(n, pos + chunk)
            hit = self._batch(a[pos:end])
            if hit < 0:
                pos = end
            else:
                hits.append(pos + hit)
                if on_drift is not None:
                    on_drift(pos + hit)
                pos += hit + 1
        return np.asarray(hits, dtype=np.int64)

    def _batch(self, x: np.ndarray) -> int:
        """Insert ``x`` (no reset pending); stop after the first value that detects a change.

        Returns that value's index in ``x``, or -1 when the whole of ``x`` went in quietly.
        """
        B = len(x)
        mb = self.max_buckets
        w0, tick0 = self._width, self._tick
        steps = np.arange(1, B + 1, dtype=np.int64)
        w = w0 + steps
        tot = np.cumsum(np.concatenate(([self._total], x)))          # sequential, as += does
        wm1 = (w - 1).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            dv = x - tot[:-1] / wm1
            inc = wm1 * dv * dv / w
        if w0 == 0:
            inc[0] = 0.0
        var = np.cumsum(np.concatenate(([self._variance], inc)))
        check = ((tick0 + steps) % self.clock == 0) & (w > self.grace_period) & (w > 1)
        K = steps[check]                    # values inserted before each check
        ts = np.append(K, B)                # ... and at the end of the batch

        # Rows that receive buckets during the batch, from row 0 up: the buckets that ever sit
        # in the row (old ones first) and, for each time in ts, the slice [2 * merges,
        # arrivals) of them present then. Rows above the last of these do not change.
        rows = []
        new_t = x
        new_v = np.zeros(B)
        arrivals = ts
        old_t, old_v = self._totals, self._variances
        i = 0
        while True:
            if i < len(old_t) and old_t[i]:
                seq_t = np.concatenate((old_t[i], new_t))
                seq_v = np.concatenate((old_v[i], new_v))
                n_in = len(old_t[i]) + arrivals
            else:
                seq_t, seq_v, n_in = new_t, new_v, arrivals
            merged = np.maximum((n_in - (mb - 1)) // 2, 0)    # merges once n_in have entered
            rows.append((seq_t, seq_v, 2 * merged, n_in))
            m_end = int(merged[-1])
            if m_end == 0:
                break
            n1 = float(1 << i)
            left_t, right_t = seq_t[0:2 * m_end:2], seq_t[1:2 * m_end:2]
            mu1 = left_t / n1
            mu2 = right_t / n1
            d = mu1 - mu2
            temp = n1 * 0.5 * d * d
            new_v = seq_v[0:2 * m_end:2] + seq_v[1:2 * m_end:2] + temp
            new_t = left_t + right_t
            arrivals = merged
            i += 1

        first = -1
        if len(K):
            first = self._check_all(rows, K, w[K - 1], tot[K], var[K])
        if first < 0:
            self._commit(rows, -1, w0 + B, tot[B], var[B], tick0 + B)
            self._drift = False
            return -1
        k = int(K[first])
        self._commit(rows, first, w0 + k, tot[k], var[k], tick0 + k)
        self._flag(self._detect())
        return k - 1 if self._drift else self._resume(x, k)

    def _resume(self, x: np.ndarray, k: int) -> int:
        # Only reachable if the vectorised check and the scalar one disagreed on a cut
        # (they do the same floating-point operations, so they should not).
        if k >= len(x):
            return -1
        hit = self._batch(x[k:])
        return hit if hit < 0 else k + hit

    def _check_all(self, rows, K, wK, totK, varK) -> int:
        """Evaluate every cut at every check time at once; index of the first check with a cut.

        Same floating-point operations, in the same order, as ``_detect``'s scan.
        """
        mb, mwl, delta = self.max_buckets, self.min_window_length, self.delta
        C, L = len(K), len(rows)
        static_t, static_n = [], []                      # unchanged rows, oldest first
        for r in range(len(self._totals) - 1, L - 1, -1):
            static_t += self._totals[r]
            static_n += [1 << r] * len(self._totals[r])
        S = len(static_t)
        offs, flat_t, flat_n = [], [], []
        o = 0
        for r, (seq_t, _, _, _) in enumerate(rows):
            offs.append(o)
            flat_t.append(seq_t)
            flat_n.append(np.full(len(seq_t), 1 << r, dtype=np.int64))
            o += len(seq_t)
        flat_t.append(np.zeros(1))                 # where padding points: adds nothing
        flat_n.append(np.zeros(1, dtype=np.int64))
        flat_t = np.concatenate(flat_t)
        flat_n = np.concatenate(flat_n)
        j = np.arange(mb)
        idx = np.empty((C, L, mb), dtype=np.int64)
        for p, r in enumerate(range(L - 1, -1, -1)):          # oldest row first
            _, _, start, stop = rows[r]
            s = start[:C]
            idx[:, p, :] = np.where(j < (stop[:C] - s)[:, None], offs[r] + s[:, None] + j, o)
        idx = idx.reshape(C, L * mb)
        t = np.empty((C, S + L * mb))
        t[:, :S] = static_t
        t[:, S:] = flat_t[idx]
        sizes = np.empty((C, S + L * mb), dtype=np.int64)
        sizes[:, :S] = static_n
        sizes[:, S:] = flat_n[idx]
        u0 = np.cumsum(t, axis=1)
        t[:, 0] = totK - t[:, 0]
        u1 = np.subtract.accumulate(t, axis=1)
        n0 = np.cumsum(sizes, axis=1)
        n1 = wK[:, None] - n0
        # A padding slot repeats the cut before it, which changes no verdict.
        cond = (n0 >= mwl) & (n1 >= mwl)
        n0f = n0.astype(np.float64)
        n1f = n1.astype(np.float64)
        dprime = np.array([math.log(2.0 * math.log(int(wc)) / delta) for wc in wK])[:, None]
        var_w = (varK / wK)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            dm = np.abs(u0 / n0f - u1 / n1f)
            m = 1.0 / (n0f - (mwl - 1)) + 1.0 / (n1f - (mwl - 1))
            eps = np.sqrt(2.0 * m * var_w * dprime)
            eps += 2.0 / 3.0 * dprime * m
            cut = (dm > eps) & cond
        hit = np.flatnonzero(cut.any(axis=1))
        if len(hit):
            return int(hit[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            last = np.where(cond[-1] & (eps[-1] > 0.0), dm[-1] / eps[-1], 0.0)
        self._statistic = float(np.nan_to_num(last).max())
        return -1

    def _commit(self, rows, col: int, width: int, total: float, variance: float, tick: int) -> None:
        totals, variances = [], []
        for seq_t, seq_v, start, stop in rows:
            a, b = int(start[col]), int(stop[col])
            totals.append(seq_t[a:b].tolist())
            variances.append(seq_v[a:b].tolist())
        totals += self._totals[len(rows):]
        variances += self._variances[len(rows):]
        while len(totals) > 1 and not totals[-1]:
            totals.pop()
            variances.pop()
        self._totals, self._variances = totals, variances
        self._width, self._total, self._variance, self._tick = int(width), float(total), float(variance), int(tick)

    # -- readable state -----------------------------------------------------------------
    @property
    def width(self) -> int:
        """Number of values in the window."""
        return self._width

    @property
    def total(self) -> float:
        return self._total

    @property
    def estimation(self) -> float:
        """Mean of the window."""
        return self._total / self._width if self._width else 0.0

    @property
    def variance(self) -> float:
        """Population variance of the window."""
        return self._variance / self._width if self._width else 0.0

    @property
    def n_buckets(self) -> int:
        return sum(len(r) for r in self._totals)

    @property
    def bucket_rows(self) -> list[int]:
        """Buckets held in each row (row i holds buckets of 2**i values)."""
        return [len(r) for r in self._totals]

    @property
    def statistic(self) -> float:
        """At the last check: the largest |mean(W0) - mean(W1)| / epsilon_cut over all cuts.

        A change is declared when it exceeds 1.
        """
        return self._statistic

    @property
    def last_cut(self) -> tuple[int, int, float, float] | None:
        """(n0, n1, mean0, mean1) of the cut behind the last detection."""
        return self._last_cut

    def reading(self) -> Reading:
        return Reading(self.name, self._statistic, 1.0, None, self._drift, (self._width,),
                       self.n_detections)

    # -- checkpoints --------------------------------------------------------------------
    def _params(self) -> dict:
        return {"delta": self.delta, "clock": self.clock, "max_buckets": self.max_buckets,
                "min_window_length": self.min_window_length, "grace_period": self.grace_period}

    def _state(self) -> dict:
        return {"totals": [list(r) for r in self._totals],
                "variances": [list(r) for r in self._variances],
                "width": self._width, "total": self._total, "variance": self._variance,
                "tick": self._tick, "reset_pending": self._reset_pending, "statistic": self._statistic,
                "last_cut": list(self._last_cut) if self._last_cut else None}

    def _load(self, state: dict) -> None:
        self._totals = [[float(v) for v in r] for r in state["totals"]]
        self._variances = [[float(v) for v in r] for r in state["variances"]]
        self._width, self._total, self._variance = int(state["width"]), float(state["total"]), float(state["variance"])
        self._tick, self._reset_pending = int(state["tick"]), bool(state["reset_pending"])
        self._statistic = float(state["statistic"])
        self._last_cut = tuple(state["last_cut"]) if state["last_cut"] else None
