"""Drift detectors against river (and scipy), side by side in one run, on one core.

    .venv/bin/python bench/bench_detectors.py            # everything (a few minutes)
    .venv/bin/python bench/bench_detectors.py --quick    # smaller sizes
    .venv/bin/python bench/bench_detectors.py --only throughput|detection|memory

1. Throughput, events per second, one value at a time as river does it, and ours also as
   batches of 1,000 (what a Kafka poll hands the processor).
2. Detection on synthetic streams with known change points: abrupt and gradual mean
   shifts of 0.25, 0.5 and 1 sd, a variance change, and a stationary stream of 1,000,000
   values. Ours against river's ADWIN with the same parameters: mean delay, misses, false
   alarms per million values. Targets: no more false alarms than river, mean delay at most
   1.1 x river's.
3. Memory: 1,000,000 events through every detector, the sketch and calibration; RSS
   every 100,000 events and the peak.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import one_core  # noqa: E402
from stream_processors.calibration import Calibration  # noqa: E402
from stream_processors.detectors import ADWIN, PSI, ChiSquare, KSWindow, PageHinkley, psi  # noqa: E402
from stream_processors.sketch import QuantileSketch  # noqa: E402

BATCH = 1000


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def per_event(update, xs) -> None:
    for v in xs:
        update(v)


def in_batches(update_many, xs) -> None:
    for i in range(0, len(xs), BATCH):
        update_many(xs[i:i + BATCH])


def row(name: str, ours: float, theirs: float, theirs_name: str) -> None:
    print(f"  {name:<44} {ours:>13,.0f}/s   {theirs_name:<30} {theirs:>11,.0f}/s   x{ours / theirs:8.2f}")


# -- 1. throughput ----------------------------------------------------------------------------

def throughput(quick: bool) -> None:
    from river import drift
    from scipy import stats
    from ddsketch import LogCollapsingLowestDenseDDSketch

    n = 100_000 if quick else 400_000
    rng = np.random.default_rng(0)
    xs = rng.normal(size=n)
    xl = xs.tolist()
    print(f"\n1. Throughput ({n:,} N(0,1) values; slow baselines on a prefix)")
    print(f"  {'ours':<44} {'':>15}   {'baseline':<30}")

    r_adwin = rate(n, timed(lambda: per_event(drift.ADWIN().update, xl)))
    row("ADWIN.update_many (batches of 1000)", rate(n, timed(lambda: in_batches(ADWIN().update_many, xs))),
        r_adwin, "river ADWIN.update")
    m = n // 4
    row("ADWIN.update (one by one)", rate(m, timed(lambda: per_event(ADWIN().update, xl[:m]))), r_adwin,
        "river ADWIN.update")

    r_ph = rate(n, timed(lambda: per_event(drift.PageHinkley().update, xl)))
    row("PageHinkley.update_many", rate(n, timed(lambda: in_batches(PageHinkley().update_many, xs))), r_ph,
        "river PageHinkley.update")
    row("PageHinkley.update", rate(n, timed(lambda: per_event(PageHinkley().update, xl))), r_ph,
        "river PageHinkley.update")

    k = 3000 if quick else 6000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r_kswin = rate(k, timed(lambda: per_event(drift.KSWIN(seed=1).update, xl[:k])))
    ref, W = xs[:500], 500

    def scipy_ks():
        for i in range(500, 500 + k):
            stats.ks_2samp(ref, xs[max(500, i + 1 - W):i + 1])
    r_scipy_ks = rate(k, timed(scipy_ks))
    ks_batch = rate(n, timed(lambda: in_batches(KSWindow(500).update_many, xs)))
    ks_one = rate(m, timed(lambda: per_event(KSWindow(500).update, xl[:m])))
    row("KSWindow(500).update_many", ks_batch, r_kswin, "river KSWIN(100).update")
    row("KSWindow(500).update_many", ks_batch, r_scipy_ks, "scipy ks_2samp(500, 500)/event")
    row("KSWindow(500).update", ks_one, r_scipy_ks, "scipy ks_2samp(500, 500)/event")

    def numpy_psi():
        edges = np.quantile(ref, np.linspace(0, 1, 11)[1:-1])
        rc = np.bincount(np.searchsorted(edges, ref), minlength=10)
        for i in range(500, 500 + k):
            psi(rc, np.bincount(np.searchsorted(edges, xs[max(500, i - 999):i + 1]), minlength=10))
    row("PSI(1000).update_many", rate(n, timed(lambda: in_batches(PSI(1000, 500).update_many, xs))),
        rate(k, timed(numpy_psi)), "numpy PSI over window/event")
    row("PSI(1000).update", rate(m, timed(lambda: per_event(PSI(1000, 500).update, xl[:m]))),
        rate(k, timed(numpy_psi)), "numpy PSI over window/event")

    cats = rng.choice(np.array(["stop", "length", "error", "cancelled"]), size=n, p=[0.7, 0.2, 0.05, 0.05]).tolist()

    def scipy_chi2():
        from collections import Counter
        rc = Counter(cats[:1000])
        keys = sorted(rc)
        for i in range(1000, 1000 + k):
            wc = Counter(cats[max(1000, i - 999):i + 1])
            stats.chi2_contingency([[rc[c] for c in keys], [wc[c] for c in keys]])
    r_chi = rate(k, timed(scipy_chi2))
    row("ChiSquare(1000).update_many", rate(n, timed(lambda: in_batches(ChiSquare(1000).update_many, cats))),
        r_chi, "scipy chi2_contingency/event")
    row("ChiSquare(1000).update", rate(m, timed(lambda: per_event(ChiSquare(1000).update, cats[:m]))),
        r_chi, "scipy chi2_contingency/event")

    lat = rng.lognormal(3.0, 1.0, n)
    latl = lat.tolist()

    def dd():
        s = LogCollapsingLowestDenseDDSketch(0.01, 2048)
        for v in latl:
            s.add(v)
    r_dd = rate(n, timed(dd))
    row("QuantileSketch.add_many", rate(n, timed(lambda: in_batches(QuantileSketch().add_many, lat))), r_dd,
        "ddsketch .add")
    row("QuantileSketch.add", rate(m, timed(lambda: per_event(QuantileSketch().add, latl[:m]))), r_dd,
        "ddsketch .add")

    # The baseline: river ADWIN + KSWIN (+ scipy inside it), event by event, on one
    # feature; ours: ADWIN + KS + PSI + Page-Hinkley on that feature, in batches.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, kw = drift.ADWIN(), drift.KSWIN(seed=1)

        def river_loop():
            for v in xl[:k]:
                a.update(v)
                kw.update(v)
        r_loop = rate(k, timed(river_loop))
    dets = [ADWIN(), KSWindow(500), PSI(1000, 500), PageHinkley()]

    def ours_all():
        for i in range(0, n, BATCH):
            for d in dets:
                d.update_many(xs[i:i + BATCH])
    row("ADWIN+KS+PSI+PH, batches (one feature)", rate(n, timed(ours_all)), r_loop, "river ADWIN+KSWIN per event")


# -- 2. detection -----------------------------------------------------------------------------

def run_detector(det, xs: np.ndarray, batch: bool) -> np.ndarray:
    if batch:
        return np.concatenate([det.update_many(xs[i:i + 10_000]) + i for i in range(0, len(xs), 10_000)])
    hits = []
    for i, v in enumerate(xs.tolist()):
        det.update(v)
        if det.drift_detected:
            hits.append(i)
    return np.asarray(hits, dtype=np.int64)


def scenario(kind: str, size: float, seed: int, pre: int, post: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=pre + post)
    if kind == "abrupt":
        x[pre:] += size
    elif kind == "gradual":                       # linear ramp over 1,000 values, then held
        ramp = np.minimum(np.arange(post) / 1000.0, 1.0)
        x[pre:] += size * ramp
    elif kind == "variance":
        x[pre:] *= size
    return x


def detection(quick: bool) -> None:
    from river import drift

    runs = 10 if quick else 30
    pre, post = 5000, 5000
    delta = 0.002
    print(f"\n2. Detection, ADWIN(delta={delta}) ours vs river, {runs} streams each: {pre:,} values, "
          f"then the change, then {post:,}")
    print(f"  {'stream':<22} {'delay ours':>11} {'delay river':>12} {'ratio':>7} {'missed o/r':>11} "
          f"{'FA/M ours':>10} {'FA/M river':>11}   same detections")
    cases = [("abrupt", s) for s in (0.25, 0.5, 1.0)] + [("gradual", s) for s in (0.25, 0.5, 1.0)] + [("variance", 2.0)]
    for kind, size in cases:
        res = {"ours": ([], 0, 0), "river": ([], 0, 0)}
        same = True
        for r in range(runs):
            xs = scenario(kind, size, 1000 + r, pre, post)
            hits = {"ours": run_detector(ADWIN(delta=delta), xs, batch=True),
                    "river": run_detector(drift.ADWIN(delta=delta), xs, batch=False)}
            same &= np.array_equal(hits["ours"], hits["river"])
            for who, h in hits.items():
                delays, missed, fa = res[who]
                fa += int((h < pre).sum())
                after = h[h >= pre]
                if len(after):
                    delays.append(int(after[0]) - pre)
                else:
                    missed += 1
                res[who] = (delays, missed, fa)
        d_o, m_o, fa_o = res["ours"]
        d_r, m_r, fa_r = res["river"]
        mo, mr = (np.mean(d_o) if d_o else float("nan")), (np.mean(d_r) if d_r else float("nan"))
        label = f"{kind} {size:g} sd" if kind != "variance" else "variance x2"
        print(f"  {label:<22} {mo:>11.1f} {mr:>12.1f} {mo / mr:>7.3f} {m_o:>5}/{m_r:<5} "
              f"{fa_o / (runs * pre) * 1e6:>10.1f} {fa_r / (runs * pre) * 1e6:>11.1f}   {same}")
    n = 200_000 if quick else 1_000_000
    xs = np.random.default_rng(7).normal(size=n)
    h_o = run_detector(ADWIN(delta=delta), xs, batch=True)
    h_r = run_detector(drift.ADWIN(delta=delta), xs, batch=False)
    print(f"  stationary, {n:,} values: false alarms ours {len(h_o)} ({len(h_o) / n * 1e6:.1f}/M), "
          f"river {len(h_r)} ({len(h_r) / n * 1e6:.1f}/M); same detections: {np.array_equal(h_o, h_r)}")
    others = {"KSWindow(500, alpha=1e-5)": lambda: KSWindow(500, alpha=1e-5),
              "PSI(1000, threshold=0.25)": lambda: PSI(1000),
              "PageHinkley()": PageHinkley}
    for name, make in others.items():
        fa = len(run_detector(make(), xs[:200_000], batch=True))
        print(f"  {name:<28} stationary 200,000: {fa} rising edges ({fa / 0.2:.0f}/M)")


# -- 3. memory --------------------------------------------------------------------------------

def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(quick: bool) -> None:
    n = 200_000 if quick else 1_000_000
    print(f"\n3. Memory: {n:,} events (drifting every 100,000) through ADWIN x2 (one on a stationary stream), KS, PSI, "
          f"Page-Hinkley, chi-square, a sketch, calibration")
    rng = np.random.default_rng(3)
    dets = [ADWIN(), KSWindow(500), PSI(1000), PageHinkley()]
    still = ADWIN(delta=1e-9)          # fed a stationary stream: its window only grows
    chi, sk, cal = ChiSquare(1000), QuantileSketch(), Calibration(15, 10_000)
    cats = np.array(["stop", "length", "error", "cancelled"])
    samples = []
    for i in range(0, n, BATCH):
        x = rng.normal(loc=(i // 100_000) % 3, size=BATCH)
        for d in dets:
            d.update_many(x)
        still.update_many(rng.normal(size=BATCH))
        chi.update_many(rng.choice(cats, size=BATCH).tolist())
        sk.add_many(np.exp(x))
        p = rng.uniform(size=BATCH)
        cal.update_many(p, (rng.uniform(size=BATCH) < p).astype(int))
        if (i + BATCH) % 100_000 == 0:
            samples.append(rss_mib())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("  RSS MiB every 100,000 events: " + " ".join(f"{s:.1f}" for s in samples))
    print(f"  growth after the first 100,000: {samples[-1] - samples[0]:+.1f} MiB; peak RSS {peak:.1f} MiB; "
          f"stationary ADWIN(delta=1e-9): width {still.width:,} in {still.n_buckets} buckets")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["throughput", "detection", "memory"])
    args = ap.parse_args()
    print(f"bench_detectors: python {sys.version.split()[0]}, numpy {np.__version__}, {one_core()}")
    if args.only in (None, "memory"):
        memory(args.quick)                 # first, so the peak is ours, not the baselines'
    if args.only in (None, "throughput"):
        throughput(args.quick)
    if args.only in (None, "detection"):
        detection(args.quick)


if __name__ == "__main__":
    main()
