"""The signal contract: what a ``vigil.signals`` message may name, defined once.

The stream processors publish only the series listed in ``PUBLISHED``; alerting checks
every rule against it (a rule naming anything else would match nothing, silently); the
rollout controller and the page read the same names. A series is what an alert instance
is keyed on:

    model, version, detector, feature, and the SERIES_LABELS a signal carries

so one ongoing drift is one alert. Everything that changes from one reading to the next
(counts, detections, bins, the window's index, the raw value) travels in fields of the
``Signal`` message (protos/events.proto), never in its labels.

The comparisons of a candidate version with the stable one over the same traffic (the
``*_vs_stable`` detectors, label ``reference_version``) are what the rollout controller
decides a step on; it computes nothing of its own. Each carries the two sides' sample sizes
(``reference_size`` stable, ``window_size`` candidate) and, in ``events``, the candidate's
events (joined feedbacks, for accuracy and ECE) compared so far.

>>> PUBLISHED[Detector.KS, Feature.MEAN_ENTROPY].kind == SignalKind.DRIFT
True
>>> kind_of("error_rate", "error") == SignalKind.QUALITY
True
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

from protos import events_pb2


class SignalKind(IntEnum):
    DRIFT = events_pb2.SIGNAL_KIND_DRIFT
    CALIBRATION = events_pb2.SIGNAL_KIND_CALIBRATION
    QUALITY = events_pb2.SIGNAL_KIND_QUALITY
    LATENCY = events_pb2.SIGNAL_KIND_LATENCY


class Detector(StrEnum):
    # against a reference window (readings: drifted while the window differs)
    KS = "ks"                            # two-sample Kolmogorov-Smirnov; statistic D
    PSI = "psi"                          # population stability index
    CHI2 = "chi2"                        # chi-square homogeneity of categories
    # change detectors (drifted on the reading of a detection only)
    ADWIN = "adwin"                      # statistic: the window's mean
    PAGE_HINKLEY = "page_hinkley"        # statistic: the cumulative deviation
    # a slow trend over the readings' window means
    MANN_KENDALL = "mann_kendall"        # statistic: Z; p_value; fields trend
    # a candidate version against the stable one over the same traffic (label reference_version)
    KS_VS_STABLE = "ks_vs_stable"
    CHI2_VS_STABLE = "chi2_vs_stable"
    MANN_WHITNEY_VS_STABLE = "mann_whitney_vs_stable"  # statistic: rank-biserial correlation (positive:
                                                       # the candidate's values run higher); p two-sided
    MEDIAN_VS_STABLE = "median_vs_stable"  # statistic: candidate median - stable median; value: candidate's
    ERROR_RATE_VS_STABLE = "error_rate_vs_stable"  # statistic: candidate rate - stable rate; value:
                                                   # candidate's; p one-sided, candidate worse by a margin
    ACCURACY_VS_STABLE = "accuracy_vs_stable"  # of joined feedback, as error_rate_vs_stable (p: candidate
                                               # less accurate by a margin)
    ECE_VS_STABLE = "ece_vs_stable"  # of joined feedback: candidate ECE - stable ECE; value: candidate's
    # measurements (statistic = the measured value)
    ERROR_RATE = "error_rate"            # errors over the events since the last reading
    MEAN = "mean"                        # the mean of the feature's latest values
    P50 = "p50"                          # latency quantiles, seconds
    P95 = "p95"
    P99 = "p99"
    ZSCORE = "zscore"                    # a quality window against the version's baseline; field value
    ACCURACY = "accuracy"                # of joined Classify feedback
    BRIER = "brier"
    ECE = "ece"                          # expected calibration error, equal-width bins
    ECE_EQUAL_MASS = "ece_equal_mass"    # the same over equal-mass bins
    TEMPERATURE = "temperature"          # a fitted temperature; field recalibration


class Feature(StrEnum):
    # read from each InferenceEvent (the field of the same name)
    PROMPT_TOKENS = "prompt_tokens"
    COMPLETION_TOKENS = "completion_tokens"
    MEAN_LOGPROB = "mean_logprob"
    MEAN_ENTROPY = "mean_entropy"
    MIN_TOP1_PROB = "min_top1_prob"
    TOTAL_SECONDS = "total_seconds"
    FIRST_TOKEN_SECONDS = "first_token_seconds"
    TOKEN_SECONDS = "token_seconds"      # per output token after the first (total for one token): a
                                         # version's speed, whatever the length of what it says
    TOP_LABEL_PROB = "top_label_prob"    # Classify: the largest label probability
    FINISH_REASON = "finish_reason"
    ERROR = "error"                      # 1 where the status is not OK
    # of a window of completions (from their token hashes, or words where the text is sent)
    DISTINCT_1 = "distinct_1"
    DISTINCT_2 = "distinct_2"
    TOKEN_ENTROPY = "token_entropy"
    # of Classify events joined with the true label from Feedback
    LABEL = "label"
    PREDICTION_ERROR = "prediction_error"  # 1 where the top label was not the true one
    # of Feedback scores (generative models: a rating of the answer, e.g. 0 to 1)
    SCORE = "score"


# Labels that, with model, version, detector and feature, name a series. Nothing else may
# be a label of a signal.
SERIES_LABELS = ("route", "reference_version")

CONTINUOUS = (Feature.PROMPT_TOKENS, Feature.COMPLETION_TOKENS, Feature.MEAN_LOGPROB, Feature.MEAN_ENTROPY,
              Feature.MIN_TOP1_PROB, Feature.TOTAL_SECONDS, Feature.FIRST_TOKEN_SECONDS, Feature.TOP_LABEL_PROB)
LATENCY = (Feature.TOTAL_SECONDS, Feature.FIRST_TOKEN_SECONDS)
# What a candidate is compared with stable on: what it answers and how fast, not what it was asked.
COMPARED = tuple(f for f in CONTINUOUS if f != Feature.PROMPT_TOKENS)
# What the candidate-against-stable location tests take (Mann-Whitney, medians): the compared
# features and the time per output token.
TESTED = (*COMPARED, Feature.TOKEN_SECONDS)
QUALITY = (Feature.DISTINCT_1, Feature.DISTINCT_2, Feature.TOKEN_ENTROPY, Feature.COMPLETION_TOKENS)


@dataclass(frozen=True)
class Series:
    detector: Detector
    feature: Feature
    kind: SignalKind


def _published() -> dict[tuple[str, str], Series]:
    series = []

    def add(kind, detector, *features):
        series.extend(Series(detector, f, kind) for f in features)

    for f in CONTINUOUS:
        kind = SignalKind.LATENCY if f in LATENCY else SignalKind.DRIFT
        add(kind, Detector.KS, f)
        add(kind, Detector.PSI, f)
        add(kind, Detector.MANN_KENDALL, f)
    add(SignalKind.DRIFT, Detector.ADWIN, Feature.MEAN_LOGPROB)
    add(SignalKind.DRIFT, Detector.CHI2, Feature.FINISH_REASON)
    for f in COMPARED:
        add(SignalKind.LATENCY if f in LATENCY else SignalKind.DRIFT, Detector.KS_VS_STABLE, f)
    add(SignalKind.DRIFT, Detector.CHI2_VS_STABLE, Feature.FINISH_REASON)
    for f in TESTED:
        kind = SignalKind.LATENCY if f in (*LATENCY, Feature.TOKEN_SECONDS) else SignalKind.DRIFT
        add(kind, Detector.MANN_WHITNEY_VS_STABLE, f)
        add(kind, Detector.MEDIAN_VS_STABLE, f)
    add(SignalKind.QUALITY, Detector.ERROR_RATE_VS_STABLE, Feature.ERROR)
    add(SignalKind.QUALITY, Detector.ACCURACY_VS_STABLE, Feature.LABEL)
    add(SignalKind.CALIBRATION, Detector.ECE_VS_STABLE, Feature.LABEL)
    add(SignalKind.QUALITY, Detector.ERROR_RATE, Feature.ERROR)
    add(SignalKind.QUALITY, Detector.PAGE_HINKLEY, Feature.ERROR)
    for q in (Detector.P50, Detector.P95, Detector.P99):
        add(SignalKind.LATENCY, q, *LATENCY)
    add(SignalKind.QUALITY, Detector.ZSCORE, *QUALITY)
    add(SignalKind.QUALITY, Detector.ACCURACY, Feature.LABEL)
    add(SignalKind.CALIBRATION, Detector.BRIER, Feature.LABEL)
    add(SignalKind.CALIBRATION, Detector.ECE, Feature.LABEL)
    add(SignalKind.CALIBRATION, Detector.ECE_EQUAL_MASS, Feature.LABEL)
    add(SignalKind.CALIBRATION, Detector.TEMPERATURE, Feature.LABEL)
    add(SignalKind.QUALITY, Detector.ADWIN, Feature.PREDICTION_ERROR)
    add(SignalKind.QUALITY, Detector.MEAN, Feature.SCORE)
    add(SignalKind.QUALITY, Detector.ADWIN, Feature.SCORE)
    return {(s.detector.value, s.feature.value): s for s in series}


PUBLISHED: dict[tuple[str, str], Series] = _published()
"""Every (detector, feature) series the stream processors publish."""


def kind_of(detector: str, feature: str) -> SignalKind:
    """The kind of a published series; KeyError names a series the contract does not have."""
    try:
        return PUBLISHED[detector, feature].kind
    except KeyError:
        raise KeyError(f"no published series {detector}/{feature} (see eventbus/signals.py)") from None


def series_labels(labels) -> dict[str, str]:
    """The labels of a signal that name its series (the others are dropped)."""
    return {k: labels[k] for k in SERIES_LABELS if labels.get(k)}
