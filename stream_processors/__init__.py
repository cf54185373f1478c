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
- ``compare.py``: each candidate version of a model against its stable version, over the
  same period (KS per feature, chi-square on finish reasons).
- ``processor.py``: the per-partition state that feeds all of the above from decoded
  events and feedback, a batch at a time, and says which signals to publish.
- ``runner.py``: ``vigil process``, the consumer-group runner: decoding, checkpoints,
  publishing on ``vigil.signals``.

The modules up to ``processor.py`` use numpy and scipy and do no I/O: they know nothing
of Kafka, Prometheus or the clock (``processor.py`` reads the protobuf events it is
given). ``runner.py`` is the only part of this package that talks to the event bus.
Nothing here imports another service (``inference/``, ``alerting/``, ``rollout/``).
"""
