"""Calibration of a classifier's probabilities, online, over a sliding window of feedback.

Each joined feedback is a pair (probabilities, true label). From the window of the last
``window_size`` pairs:

- accuracy: share of pairs whose top label (argmax, first on ties) is the true one;
- Brier score: mean of ``sum_k (p_k - y_k)^2`` for a probability vector, or of
  ``(p - y)^2`` for a single probability of the positive class (binary, y in {0, 1});
- expected calibration error over top-label confidence (the probability of the predicted
  label): ``sum_b (n_b / n) |accuracy_b - confidence_b|``, with ``n_bins``
  - equal-width bins: bin ``min(floor(conf * n_bins), n_bins - 1)``; kept incrementally,
    O(1) per pair;
  - equal-mass bins: the window sorted by confidence (stable) and cut into ``n_bins``
    runs of equal size (the first ``n % n_bins`` one longer, as ``numpy.array_split``);
    computed when asked (at most once per new pair), O(n log n);
- reliability-diagram data: per bin, its confidence range, count, mean confidence,
  accuracy and gap.

For a binary probability p the top label is 1 when p > 0.5 and its confidence max(p, 1-p).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Calibration", "ece_of", "top_label_ece"]


def ece_of(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error over equal-width bins of top-label confidences and
    whether each top label was right (1) or not (0)."""
    conf = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, weights=conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(conf))


def top_label_ece(P: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> tuple[float, float]:
    """(ECE over equal-width bins, accuracy) of probability rows taken together, as a
    window of ``Calibration`` holding them would give them; rows may be padded with NaN."""
    P = np.nan_to_num(np.asarray(P, dtype=np.float64), nan=-1.0)
    y = np.asarray(labels, dtype=np.int64)
    pred = np.argmax(P, axis=1)
    conf = P[np.arange(len(y)), pred]
    correct = (pred == y).astype(np.float64)
    return ece_of(conf, correct, n_bins), float(correct.mean())


class Calibration:
    """Accuracy, Brier score, ECE and reliability data over the last ``window_size`` pairs."""

    def __init__(self, n_bins: int = 10, window_size: int = 10_000):
        if n_bins < 1 or window_size < 1:
            raise ValueError("n_bins and window_size must be >= 1")
        self.n_bins = int(n_bins)
        self.window_size = int(window_size)
        W = self.window_size
        self._conf = np.zeros(W)
        self._correct = np.zeros(W, dtype=np.int8)
        self._brier = np.zeros(W)
        self._head = 0
        self._n = 0
        self.n_seen = 0
        self._bin_n = [0] * self.n_bins            # per equal-width bin: pairs, sum of confidence,
        self._bin_conf = [0.0] * self.n_bins       # correct ones (plain lists: a pair updates them
        self._bin_correct = [0] * self.n_bins      # one value at a time)
        self._brier_sum = 0.0
        self._since_refresh = 0
        self._mass: tuple[int, list[dict]] | None = None   # (n_seen, equal-mass bins) last computed

    # -- input --------------------------------------------------------------------------
    @staticmethod
    def _score(probs, label) -> tuple[float, int, float]:
        """(top-label confidence, correct 0/1, Brier term) of one pair."""
        if np.ndim(probs) == 0:
            p, y = float(probs), int(label)
            pred = 1 if p > 0.5 else 0
            return max(p, 1.0 - p), int(pred == y), (p - y) * (p - y)
        p = np.asarray(probs, dtype=np.float64)
        y = int(label)
        pred = int(np.argmax(p))
        onehot = np.zeros(len(p))
        onehot[y] = 1.0
        return float(p[pred]), int(pred == y), float(np.sum((p - onehot) ** 2))

    def _bin(self, conf):
        return np.minimum((np.asarray(conf) * self.n_bins).astype(np.int64), self.n_bins - 1)

    def update(self, probs, label) -> None:
        """Add one (probabilities, label) pair."""
        self._add(*self._score(probs, label))

    def update_many(self, probs, labels) -> None:
        """Add pairs: ``probs`` of shape (n,) (binary) or (n, k), ``labels`` of shape (n,).

        Exactly as ``update`` on each pair in turn: the scores are computed for the whole
        batch, the running sums still take one pair at a time (their rounding then does not
        depend on how the pairs were batched)."""
        p = np.asarray(probs, dtype=np.float64)
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(y) == 0:
            return
        if p.ndim == 1:
            pred = (p > 0.5).astype(np.int64)
            conf = np.maximum(p, 1.0 - p)
            brier = (p - y) * (p - y)
        else:
            pred = np.argmax(p, axis=1)
            rows = np.arange(len(y))
            conf = p[rows, pred]
            onehot = np.zeros_like(p)
            onehot[rows, y] = 1.0
            brier = np.sum((p - onehot) ** 2, axis=1)
        for score in zip(conf.tolist(), (pred == y).astype(np.int64).tolist(), brier.tolist()):
            self._add(*score)

    def _add(self, conf: float, correct: int, brier: float) -> None:
        W, h = self.window_size, self._head
        if self._n == W:                            # evict the oldest pair, in place
            oc, ok, ob = float(self._conf[h]), int(self._correct[h]), float(self._brier[h])
            b = min(int(oc * self.n_bins), self.n_bins - 1)
            self._bin_n[b] -= 1
            self._bin_conf[b] -= oc
            self._bin_correct[b] -= ok
            self._brier_sum -= ob
        else:
            self._n += 1
        self._conf[h], self._correct[h], self._brier[h] = conf, correct, brier
        b = min(int(conf * self.n_bins), self.n_bins - 1)
        self._bin_n[b] += 1
        self._bin_conf[b] += conf
        self._bin_correct[b] += correct
        self._brier_sum += brier
        self._head = (h + 1) % W
        self.n_seen += 1
        self._since_refresh += 1
        if self._since_refresh >= W:
            self._refresh()

    def _refresh(self) -> None:
        """Recompute the running float sums from the window (bounds rounding drift)."""
        conf, correct, brier = self._window()
        b = self._bin(conf)
        self._bin_conf = np.bincount(b, weights=conf, minlength=self.n_bins).tolist()
        self._brier_sum = math.fsum(brier)
        self._since_refresh = 0

    def _window(self):
        n = self._n
        if n < self.window_size:
            return self._conf[:n], self._correct[:n], self._brier[:n]
        return self._conf, self._correct, self._brier

    # -- output -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Pairs in the window."""
        return self._n

    @property
    def accuracy(self) -> float:
        return sum(self._bin_correct) / self._n if self._n else math.nan

    @property
    def brier(self) -> float:
        return self._brier_sum / self._n if self._n else math.nan

    def ece(self, strategy: str = "width") -> float:
        """Expected calibration error with equal-width ("width") or equal-mass ("mass") bins."""
        if self._n == 0:
            return math.nan
        if strategy == "width":
            return float(np.sum(np.abs(np.asarray(self._bin_correct) - np.asarray(self._bin_conf)))) / self._n
        if strategy == "mass":
            return sum(abs(b["n"] * (b["accuracy"] - b["confidence"])) for b in self.reliability("mass")) / self._n
        raise ValueError("strategy must be 'width' or 'mass'")

    def reliability(self, strategy: str = "width") -> list[dict]:
        """Reliability-diagram data, one dict per non-empty bin.

        Keys: lower, upper (the bin's edges for equal width, its confidence range for
        equal mass), n, confidence (mean), accuracy, gap (accuracy - confidence).
        """
        out = []
        if strategy == "width":
            for b in range(self.n_bins):
                n = int(self._bin_n[b])
                if n == 0:
                    continue
                conf = float(self._bin_conf[b]) / n
                acc = float(self._bin_correct[b]) / n
                out.append({"lower": b / self.n_bins, "upper": (b + 1) / self.n_bins, "n": n,
                            "confidence": conf, "accuracy": acc, "gap": acc - conf})
            return out
        if strategy != "mass":
            raise ValueError("strategy must be 'width' or 'mass'")
        if self._mass is None or self._mass[0] != self.n_seen:
            self._mass = (self.n_seen, self._equal_mass())
        return [dict(b) for b in self._mass[1]]

    def _equal_mass(self) -> list[dict]:
        conf, correct, _ = self._window()
        n = len(conf)
        if n == 0:
            return []
        k = min(self.n_bins, n)
        sizes = [n // k + 1] * (n % k) + [n // k] * (k - n % k)      # as numpy.array_split cuts
        ends = np.cumsum(sizes)
        starts = ends - sizes
        ranked = np.sort(conf)
        if np.any(ranked[1:] == ranked[:-1]) or np.isnan(ranked[-1]):
            # ties: which of them are correct depends on their order in the window
            right = np.concatenate(([0], np.cumsum(correct[np.argsort(conf, kind="stable")])))
            n_right = right[ends] - right[starts]
        else:  # distinct values: a bin holds exactly the values between its first and last
            right = np.sort(conf[correct == 1])
            n_right = (np.searchsorted(right, ranked[ends - 1], side="right")
                       - np.searchsorted(right, ranked[starts], side="left"))
        out = []
        for lo, hi, m in zip(starts.tolist(), ends.tolist(), n_right.tolist()):
            c = ranked[lo:hi]
            mc, acc = float(c.mean()), m / (hi - lo)
            out.append({"lower": float(c[0]), "upper": float(c[-1]), "n": hi - lo,
                        "confidence": mc, "accuracy": acc, "gap": acc - mc})
        return out

    def summary(self) -> dict:
        return {"n": self._n, "accuracy": self.accuracy, "brier": self.brier,
                "ece_width": self.ece("width"), "ece_mass": self.ece("mass")}

    # -- checkpoints --------------------------------------------------------------------
    def to_state(self) -> dict:
        """The window oldest first, where it sits in the ring, and the running sums as they
        are (recomputing them would round differently: a restart must change nothing)."""
        W, n = self.window_size, self._n
        order = (self._head - n + np.arange(n)) % W
        return {"n_bins": self.n_bins, "window_size": W, "n_seen": self.n_seen, "head": self._head,
                "confidence": self._conf[order].tolist(), "correct": self._correct[order].tolist(),
                "brier": self._brier[order].tolist(),
                "sums": {"confidence": list(self._bin_conf), "brier": self._brier_sum,
                         "since_refresh": self._since_refresh}}

    @classmethod
    def from_state(cls, st: dict) -> "Calibration":
        c = cls(st["n_bins"], st["window_size"])
        conf = np.asarray(st["confidence"], dtype=np.float64)
        correct = np.asarray(st["correct"], dtype=np.int8)
        brier = np.asarray(st["brier"], dtype=np.float64)
        n, W = len(conf), c.window_size
        c._head = int(st.get("head", n % W))
        slots = (c._head - n + np.arange(n)) % W
        c._conf[slots], c._correct[slots], c._brier[slots] = conf, correct, brier
        c._n = n
        b = c._bin(conf)
        c._bin_n = np.bincount(b, minlength=c.n_bins).tolist()
        c._bin_correct = np.bincount(b, weights=correct, minlength=c.n_bins).astype(np.int64).tolist()
        if "sums" in st:
            c._bin_conf = [float(x) for x in st["sums"]["confidence"]]
            c._brier_sum = float(st["sums"]["brier"])
            c._since_refresh = int(st["sums"]["since_refresh"])
        else:  # a checkpoint from before the sums were kept
            c._refresh()
        c.n_seen = int(st["n_seen"])
        return c
