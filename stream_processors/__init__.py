"""Stream processors: turn the event stream into drift, calibration, quality and latency signals.

What lives here:

- ``detectors/``: drift detectors (ADWIN, Kolmogorov-Smirnov window, PSI, Page-Hinkley,
  chi-square for categories). Pure computation: each is a small class with ``update(x)``,
  a vectorised ``update_many(xs)`` with the same results, a ``drift_detected`` property,
  a ``reading()`` for building a signal, and ``to_state()``/``from_state()`` for checkpoints.
- ``calibration.py``: accuracy, Brier score, expected calibration error (equal-width and
  equal-mass bins) and reliability-diagram data over a sliding window of joined feedback.
- ``sketch.py``: a mergeable DDSketch-style quantile sketch for latency p50/p95/p99.
- ``quality.py``: generation quality per window (distinct-1/2, token entropy, completion
  length) as z-scores against a version's baseline.
- ``trend.py``: Mann-Kendall trend test with Sen's slope and a severity.

What the code here may touch: numpy and scipy, nothing else. The modules above do no I/O,
know nothing of Kafka, protobuf, Prometheus or the clock. The consumer runner that will
feed them events and publish their readings on ``vigil.signals`` (not built yet) is to be
the only part of this package that talks to the event bus. Nothing here imports another
service (``inference/``, ``alerting/``, ``rollout/``).
"""
