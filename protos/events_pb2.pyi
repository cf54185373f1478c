from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Route(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_UNSPECIFIED: _ClassVar[Route]
    ROUTE_STABLE: _ClassVar[Route]
    ROUTE_CANARY: _ClassVar[Route]
    ROUTE_SHADOW: _ClassVar[Route]
    ROUTE_PINNED: _ClassVar[Route]

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_OK: _ClassVar[Status]
    STATUS_INVALID_ARGUMENT: _ClassVar[Status]
    STATUS_NOT_FOUND: _ClassVar[Status]
    STATUS_RESOURCE_EXHAUSTED: _ClassVar[Status]
    STATUS_CANCELLED: _ClassVar[Status]
    STATUS_DEADLINE_EXCEEDED: _ClassVar[Status]
    STATUS_INTERNAL: _ClassVar[Status]

class SignalKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGNAL_KIND_UNSPECIFIED: _ClassVar[SignalKind]
    SIGNAL_KIND_DRIFT: _ClassVar[SignalKind]
    SIGNAL_KIND_CALIBRATION: _ClassVar[SignalKind]
    SIGNAL_KIND_QUALITY: _ClassVar[SignalKind]
    SIGNAL_KIND_LATENCY: _ClassVar[SignalKind]

class AlertState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_STATE_UNSPECIFIED: _ClassVar[AlertState]
    ALERT_STATE_INACTIVE: _ClassVar[AlertState]
    ALERT_STATE_PENDING: _ClassVar[AlertState]
    ALERT_STATE_FIRING: _ClassVar[AlertState]
    ALERT_STATE_RESOLVED: _ClassVar[AlertState]

class RolloutPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_PHASE_UNSPECIFIED: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_STABLE: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_CANARY: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_PAUSED: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_PROMOTED: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_ROLLED_BACK: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_BLUE_GREEN: _ClassVar[RolloutPhase]
    ROLLOUT_PHASE_FAILED: _ClassVar[RolloutPhase]
ROUTE_UNSPECIFIED: Route
ROUTE_STABLE: Route
ROUTE_CANARY: Route
ROUTE_SHADOW: Route
ROUTE_PINNED: Route
STATUS_UNSPECIFIED: Status
STATUS_OK: Status
STATUS_INVALID_ARGUMENT: Status
STATUS_NOT_FOUND: Status
STATUS_RESOURCE_EXHAUSTED: Status
STATUS_CANCELLED: Status
STATUS_DEADLINE_EXCEEDED: Status
STATUS_INTERNAL: Status
SIGNAL_KIND_UNSPECIFIED: SignalKind
SIGNAL_KIND_DRIFT: SignalKind
SIGNAL_KIND_CALIBRATION: SignalKind
SIGNAL_KIND_QUALITY: SignalKind
SIGNAL_KIND_LATENCY: SignalKind
ALERT_STATE_UNSPECIFIED: AlertState
ALERT_STATE_INACTIVE: AlertState
ALERT_STATE_PENDING: AlertState
ALERT_STATE_FIRING: AlertState
ALERT_STATE_RESOLVED: AlertState
ROLLOUT_PHASE_UNSPECIFIED: RolloutPhase
ROLLOUT_PHASE_STABLE: RolloutPhase
ROLLOUT_PHASE_CANARY: RolloutPhase
ROLLOUT_PHASE_PAUSED: RolloutPhase
ROLLOUT_PHASE_PROMOTED: RolloutPhase
ROLLOUT_PHASE_ROLLED_BACK: RolloutPhase
ROLLOUT_PHASE_BLUE_GREEN: RolloutPhase
ROLLOUT_PHASE_FAILED: RolloutPhase

class Confidence(_message.Message):
    __slots__ = ("mean_logprob", "mean_entropy", "min_top1_prob")
    MEAN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    MEAN_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    MIN_TOP1_PROB_FIELD_NUMBER: _ClassVar[int]
    mean_logprob: float
    mean_entropy: float
    min_top1_prob: float
    def __init__(self, mean_logprob: _Optional[float] = ..., mean_entropy: _Optional[float] = ..., min_top1_prob: _Optional[float] = ...) -> None: ...

class InferenceEvent(_message.Message):
    __slots__ = ("event_id", "time", "source", "request_id", "method", "model", "version", "route", "status", "error", "prompt_chars", "prompt_sha256", "prompt_tokens", "completion_chars", "completion_sha256", "completion_tokens", "finish_reason", "queue_seconds", "first_token_seconds", "total_seconds", "confidence", "label_probabilities", "prompt_text", "completion_text", "tenant", "trace_id", "flags", "shadow_of", "completion_token_hashes")
    class LabelProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_CHARS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_SHA256_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LABEL_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TEXT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_OF_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKEN_HASHES_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    source: str
    request_id: str
    method: str
    model: str
    version: str
    route: Route
    status: Status
    error: str
    prompt_chars: int
    prompt_sha256: str
    prompt_tokens: int
    completion_chars: int
    completion_sha256: str
    completion_tokens: int
    finish_reason: str
    queue_seconds: float
    first_token_seconds: float
    total_seconds: float
    confidence: Confidence
    label_probabilities: _containers.ScalarMap[str, float]
    prompt_text: str
    completion_text: str
    tenant: str
    trace_id: str
    flags: _containers.RepeatedScalarFieldContainer[str]
    shadow_of: str
    completion_token_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., request_id: _Optional[str] = ..., method: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., route: _Optional[_Union[Route, str]] = ..., status: _Optional[_Union[Status, str]] = ..., error: _Optional[str] = ..., prompt_chars: _Optional[int] = ..., prompt_sha256: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_chars: _Optional[int] = ..., completion_sha256: _Optional[str] = ..., completion_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., queue_seconds: _Optional[float] = ..., first_token_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., confidence: _Optional[_Union[Confidence, _Mapping]] = ..., label_probabilities: _Optional[_Mapping[str, float]] = ..., prompt_text: _Optional[str] = ..., completion_text: _Optional[str] = ..., tenant: _Optional[str] = ..., trace_id: _Optional[str] = ..., flags: _Optional[_Iterable[str]] = ..., shadow_of: _Optional[str] = ..., completion_token_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("event_id", "time", "source", "feedback_id", "request_id", "model", "version", "label", "score", "comment")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    source: str
    feedback_id: str
    request_id: str
    model: str
    version: str
    label: str
    score: float
    comment: str
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., feedback_id: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., comment: _Optional[str] = ...) -> None: ...

class ReliabilityBin(_message.Message):
    __slots__ = ("lower", "upper", "count", "confidence", "accuracy")
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    lower: float
    upper: float
    count: int
    confidence: float
    accuracy: float
    def __init__(self, lower: _Optional[float] = ..., upper: _Optional[float] = ..., count: _Optional[int] = ..., confidence: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class Trend(_message.Message):
    __slots__ = ("direction", "severity", "slope")
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    SLOPE_FIELD_NUMBER: _ClassVar[int]
    direction: str
    severity: str
    slope: float
    def __init__(self, direction: _Optional[str] = ..., severity: _Optional[str] = ..., slope: _Optional[float] = ...) -> None: ...

class Recalibration(_message.Message):
    __slots__ = ("temperature", "ece_before", "ece_after", "accuracy", "fitted", "held_out")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    ECE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ECE_AFTER_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FITTED_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    ece_before: float
    ece_after: float
    accuracy: float
    fitted: int
    held_out: int
    def __init__(self, temperature: _Optional[float] = ..., ece_before: _Optional[float] = ..., ece_after: _Optional[float] = ..., accuracy: _Optional[float] = ..., fitted: _Optional[int] = ..., held_out: _Optional[int] = ...) -> None: ...

class Signal(_message.Message):
    __slots__ = ("event_id", "time", "source", "model", "version", "kind", "detector", "feature", "statistic", "threshold", "p_value", "drifted", "reference_size", "window_size", "window_start", "window_end", "labels", "detections", "events", "value", "window_index", "reliability", "trend", "recalibration")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    DRIFTED_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SIZE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_INDEX_FIELD_NUMBER: _ClassVar[int]
    RELIABILITY_FIELD_NUMBER: _ClassVar[int]
    TREND_FIELD_NUMBER: _ClassVar[int]
    RECALIBRATION_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    source: str
    model: str
    version: str
    kind: SignalKind
    detector: str
    feature: str
    statistic: float
    threshold: float
    p_value: float
    drifted: bool
    reference_size: int
    window_size: int
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    labels: _containers.ScalarMap[str, str]
    detections: int
    events: int
    value: float
    window_index: int
    reliability: _containers.RepeatedCompositeFieldContainer[ReliabilityBin]
    trend: Trend
    recalibration: Recalibration
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[_Union[SignalKind, str]] = ..., detector: _Optional[str] = ..., feature: _Optional[str] = ..., statistic: _Optional[float] = ..., threshold: _Optional[float] = ..., p_value: _Optional[float] = ..., drifted: bool = ..., reference_size: _Optional[int] = ..., window_size: _Optional[int] = ..., window_start: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., detections: _Optional[int] = ..., events: _Optional[int] = ..., value: _Optional[float] = ..., window_index: _Optional[int] = ..., reliability: _Optional[_Iterable[_Union[ReliabilityBin, _Mapping]]] = ..., trend: _Optional[_Union[Trend, _Mapping]] = ..., recalibration: _Optional[_Union[Recalibration, _Mapping]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("event_id", "time", "source", "fingerprint", "rule", "state", "previous_state", "severity", "labels", "annotations", "starts_at", "ends_at", "value", "generator_url")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STATE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    STARTS_AT_FIELD_NUMBER: _ClassVar[int]
    ENDS_AT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_URL_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    source: str
    fingerprint: str
    rule: str
    state: AlertState
    previous_state: AlertState
    severity: str
    labels: _containers.ScalarMap[str, str]
    annotations: _containers.ScalarMap[str, str]
    starts_at: _timestamp_pb2.Timestamp
    ends_at: _timestamp_pb2.Timestamp
    value: float
    generator_url: str
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., fingerprint: _Optional[str] = ..., rule: _Optional[str] = ..., state: _Optional[_Union[AlertState, str]] = ..., previous_state: _Optional[_Union[AlertState, str]] = ..., severity: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., annotations: _Optional[_Mapping[str, str]] = ..., starts_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., ends_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., value: _Optional[float] = ..., generator_url: _Optional[str] = ...) -> None: ...

class VersionWeight(_message.Message):
    __slots__ = ("version", "weight")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    version: str
    weight: float
    def __init__(self, version: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class RolloutState(_message.Message):
    __slots__ = ("event_id", "time", "source", "model", "stable_version", "candidate_version", "weights", "shadow_versions", "phase", "strategy", "step", "reason", "generation", "controller_state", "figures_json", "attention", "flags_json", "temperatures", "keep_loaded")
    class TemperaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_STATE_FIELD_NUMBER: _ClassVar[int]
    FIGURES_JSON_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    FLAGS_JSON_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURES_FIELD_NUMBER: _ClassVar[int]
    KEEP_LOADED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    source: str
    model: str
    stable_version: str
    candidate_version: str
    weights: _containers.RepeatedCompositeFieldContainer[VersionWeight]
    shadow_versions: _containers.RepeatedScalarFieldContainer[str]
    phase: RolloutPhase
    strategy: str
    step: int
    reason: str
    generation: int
    controller_state: str
    figures_json: str
    attention: bool
    flags_json: str
    temperatures: _containers.ScalarMap[str, float]
    keep_loaded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., model: _Optional[str] = ..., stable_version: _Optional[str] = ..., candidate_version: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[VersionWeight, _Mapping]]] = ..., shadow_versions: _Optional[_Iterable[str]] = ..., phase: _Optional[_Union[RolloutPhase, str]] = ..., strategy: _Optional[str] = ..., step: _Optional[int] = ..., reason: _Optional[str] = ..., generation: _Optional[int] = ..., controller_state: _Optional[str] = ..., figures_json: _Optional[str] = ..., attention: bool = ..., flags_json: _Optional[str] = ..., temperatures: _Optional[_Mapping[str, float]] = ..., keep_loaded: _Optional[_Iterable[str]] = ...) -> None: ...

class Action(_message.Message):
    __slots__ = ("event_id", "time", "source", "action_id", "action", "model", "version", "target_version", "policy", "reason", "outcome", "alert_fingerprint", "alert_name", "alert_starts_at", "alert_labels", "generation", "details_json")
    class AlertLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ALERT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ALERT_NAME_FIELD_NUMBER: _ClassVar[int]
    ALERT_STARTS_AT_FIELD_NUMBER: _ClassVar[int]
    ALERT_LABELS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    source: str
    action_id: str
    action: str
    model: str
    version: str
    target_version: str
    policy: str
    reason: str
    outcome: str
    alert_fingerprint: str
    alert_name: str
    alert_starts_at: _timestamp_pb2.Timestamp
    alert_labels: _containers.ScalarMap[str, str]
    generation: int
    details_json: str
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., action_id: _Optional[str] = ..., action: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., target_version: _Optional[str] = ..., policy: _Optional[str] = ..., reason: _Optional[str] = ..., outcome: _Optional[str] = ..., alert_fingerprint: _Optional[str] = ..., alert_name: _Optional[str] = ..., alert_starts_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., alert_labels: _Optional[_Mapping[str, str]] = ..., generation: _Optional[int] = ..., details_json: _Optional[str] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("event_id", "time", "source", "topic", "partition", "offset", "key", "value", "headers", "reason")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    time: _timestamp_pb2.Timestamp
    source: str
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    reason: str
    def __init__(self, event_id: _Optional[str] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[str] = ..., topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...
