"""Topic names, record keys, and creating the topics a service needs at start-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)

INFERENCE = "vigil.inference.events"
FEEDBACK = "vigil.feedback"
SIGNALS = "vigil.signals"
ALERTS = "vigil.alerts"
ROLLOUT = "vigil.rollout"
DEADLETTER = "vigil.deadletter"
# what the rollout controller did about alerts, by its response policy (Action, keyed by the
# action's id; compacted: the latest record of an action is its outcome, read back at start)
ACTIONS = "vigil.actions"
# vigil alerting's own state (JSON values, not events): "snapshot/<instance>" (alerts, timers,
# read offsets of vigil.signals), "nflog/<group key>/<receiver>" and "silence/<id>", which every
# instance of an HA pair reads and merges, so each notification goes out once.
ALERTING_STATE = "vigil.alerting.state"
# vigil process's checkpoints (zlib-compressed JSON, not events): "<group>/<partition>" -> the
# state of that partition number of vigil.inference.events and vigil.feedback, with the next
# offset of each, so a restart or rebalance resumes exactly where the state stands.
CHECKPOINTS = "vigil.checkpoints"

ALL = (INFERENCE, FEEDBACK, SIGNALS, ALERTS, ROLLOUT, DEADLETTER, ACTIONS)
COMPACTED = frozenset({ROLLOUT, ALERTING_STATE, CHECKPOINTS, ACTIONS})  # a consumer wants the latest state per key, not the history


def event_key(model: str) -> str:
    """Key of inference events and feedback: every version of a model in one partition, in
    order, so that a processor compares a candidate with its stable version over the same
    period, and feedback lands where the event it answers is."""
    return model


def model_key(model: str, version: str) -> str:
    """Key of signals: all of a model version, in order."""
    return f"{model}/{version}"


@dataclass(frozen=True)
class TopicOptions:
    partitions: int = 6
    replication_factor: int = 1
    retention_ms: int = 7 * 24 * 3600 * 1000  # -1: keep forever


def new_topic(name: str, o: TopicOptions) -> NewTopic:
    if name in COMPACTED:
        configs = {"cleanup.policy": "compact"}
    else:
        configs = {"cleanup.policy": "delete", "retention.ms": str(o.retention_ms)}
    return NewTopic(name, o.partitions, o.replication_factor, topic_configs=configs)


async def ensure_topics(admin: AIOKafkaAdminClient, names, options: TopicOptions) -> list[str]:
    """Create whichever of `names` the broker lacks; returns those created.
    Topics that exist are left as they are (partitions are never changed here)."""
    existing = set(await admin.list_topics())
    missing = [n for n in names if n not in existing]
    if not missing:
        return []
    response = await admin.create_topics([new_topic(n, options) for n in missing])
    created = []
    for name, code, *rest in response.topic_errors:
        if code == 0:
            created.append(name)
        elif code != TopicAlreadyExistsError.errno:  # another service won the race
            raise RuntimeError(f"creating topic {name}: error {code} {rest[0] if rest else ''}".strip())
    if created:
        log.info("created topics %s (%d partitions)", ", ".join(created), options.partitions)
    return created
