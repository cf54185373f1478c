"""What a processor is started with: the computation's settings (detector windows and
thresholds, how often it publishes, what it keeps) and the runner's (Kafka, group,
checkpoints, metrics). `vigil process` makes its options from these defaults without
importing the computation and its numerical libraries."""

from __future__ import annotations

from dataclasses import dataclass, field

from eventbus.security import KafkaSecurity


@dataclass
class Settings:
    ks_window: int = 500
    ks_alpha: float = 1e-6
    psi_window: int = 1000
    psi_bins: int = 10
    psi_threshold: float = 0.25
    adwin_delta: float = 0.002
    ph_delta: float = 0.005           # Page-Hinkley on the error stream (increases only)
    ph_threshold: float = 50.0
    chi2_window: int = 1000
    chi2_alpha: float = 1e-6
    signal_every: int = 1000          # readings per model version every this many events
    calibration_every: int = 100      # calibration signals every this many joined feedbacks
    calibration_bins: int = 10
    calibration_window: int = 10_000
    score_every: int = 100            # feedback-score signals every this many scores
    score_window: int = 500           # the latest scores their mean is taken over
    ece_threshold: float = 0.1
    recalibration_min: int = 300      # joined feedbacks before a temperature is fitted
    recalibration_every: int = 1000   # joined feedbacks between fits (while ECE is at its threshold)
    feedback_ttl_s: float = 3600.0    # event time: an unmatched event or feedback is dropped after this
    max_pending: int = 200_000        # per partition, each way
    quality_window: int = 100
    quality_baseline: int = 20        # a version's first windows, the z-scores' mean and sd (fewer make
                                      # the sd too uncertain: one normal window in a few scores past 3)
    trend_window: int = 30
    compare_window: int = 500         # events of a candidate (and stable partners) compared
    compare_every: int = 100          # a candidate's events between comparisons with stable
    compare_alpha: float = 1e-5       # per test
    compare_min: int = 50             # fewest values a side may have for a test
    compare_error_margin: float = 0.01     # a candidate's error rate counts as worse beyond this rise
    compare_accuracy_margin: float = 0.05  # its accuracy (joined feedback), beyond this fall

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class RunnerOptions:
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "vigil-processors"
    metrics_port: int = 8003          # 0: a free port, -1: none
    metrics_host: str = "127.0.0.1"
    checkpoint_interval: float = 5.0  # seconds
    max_records: int = 5000           # per fetch
    session_timeout_ms: int = 10_000
    settings: Settings = field(default_factory=Settings)
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # SASL and TLS (repr hides passwords)
