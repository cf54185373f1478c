"""Vigil rollout: moves traffic between model versions on what the monitors see.

What this folder does: per model, a stable version, a candidate, a strategy (canary steps,
blue/green with analysis on shadow traffic, shadow only) and a history of promotions and
rollbacks (controller.py); the analysis of a step, which reads the processors' comparisons
of the candidate with stable over the same traffic (error rate, time per output token,
confidence, calibration; the `*_vs_stable` series of eventbus/signals.py) and the drift
signals of both, and applies the rollout's thresholds to them (analysis.py); validated
configuration (config.py); the model's feature flags (defined and evaluated in
eventbus/flags.py, shared with the inference router); conversions from and to the protobuf
messages of protos/events.proto (wire.py); the operations of the admin API, each call's
arguments checked whole (api.py); the `vigil rollout` commands (cli.py). records.py holds
the observation and decision records and the clocks.

What it may touch: nothing of the other services, and no raw events: the controller
decides from vigil.signals and vigil.alerts alone, so each statistic has one owner (the
processors). The controller core imports only protos/ (in wire.py, lazily) and
eventbus/ (flags, the signal contract), and does no I/O. service.py (the `vigil rollout`
service, with eventbus/ and aiohttp) feeds `Controller.observe` from vigil.signals and
vigil.alerts, calls `Controller.tick` on a timer, publishes each returned Decision on
vigil.rollout, and on start-up resumes with `Controller.from_records` from the latest
record per model (each Decision carries the model's whole state in `state`).
"""

from .analysis import Analysis, Check, Window, analyse
from .config import DEFAULT_STEPS, RolloutConfig, Thresholds
from .controller import Controller, ModelState
from eventbus.flags import Flag, FlagError, Rule, bucket, evaluate, evaluate_all
from .records import (BLUEGREEN, CANARY, FAILED, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK, SHADOW, STABLE,
                      AlertObs, Decision, ManualClock, RolloutError, SignalObs, SystemClock)
