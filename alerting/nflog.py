"""The notification log: per aggregation group and receiver integration, which alerts the
last successful notification said were firing and resolved, and when. Deduplication asks
it whether a new notification says anything new (Alertmanager's DedupStage); a restart
restores it and a second instance merges the first's entries, so neither re-sends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

RETENTION = 120 * 3600.0


@dataclass(frozen=True)
class Entry:
    group_key: str
    receiver: str  # "name/integration/index", as Alertmanager's nflog names a receiver integration
    firing: frozenset[int]
    resolved: frozenset[int]
    timestamp: float
    expires_at: float

    def to_dict(self) -> dict:
        return {"group_key": self.group_key, "receiver": self.receiver,
                "firing": [f"{x:016x}" for x in sorted(self.firing)],
                "resolved": [f"{x:016x}" for x in sorted(self.resolved)],
                "timestamp": self.timestamp, "expires_at": self.expires_at}

    @staticmethod
    def from_dict(d: dict) -> "Entry":
        return Entry(d["group_key"], d["receiver"], frozenset(int(x, 16) for x in d["firing"]),
                     frozenset(int(x, 16) for x in d["resolved"]), d["timestamp"], d["expires_at"])


def needs_update(entry: Entry | None, firing: frozenset[int] | set[int], resolved: frozenset[int] | set[int],
                 repeat_interval: float, send_resolved: bool, now: float) -> bool:
    """Alertmanager's DedupStage.needsUpdate."""
    if entry is None:
        return len(firing) > 0
    if not firing <= entry.firing:
        return True
    if not firing:
        # all resolved: tell the receiver (whatever send_resolved says) only if it was told they fired
        return len(entry.firing) > 0
    if send_resolved and not resolved <= entry.resolved:
        return True
    return entry.timestamp <= now - repeat_interval


class NotificationLog:
    def __init__(self, retention: float = RETENTION, on_log: Callable[[Entry], None] | None = None):
        self.entries: dict[tuple[str, str], Entry] = {}
        self.retention = retention
        self.on_log = on_log

    def get(self, group_key: str, receiver: str) -> Entry | None:
        return self.entries.get((group_key, receiver))

    def log(self, group_key: str, receiver: str, firing, resolved, now: float) -> Entry:
        e = Entry(group_key, receiver, frozenset(firing), frozenset(resolved), now, now + self.retention)
        self.entries[(group_key, receiver)] = e
        if self.on_log:
            self.on_log(e)
        return e

    def merge(self, e: Entry | dict) -> bool:
        """A peer's entry (from the shared log): kept if newer than ours."""
        if isinstance(e, dict):
            e = Entry.from_dict(e)
        cur = self.entries.get((e.group_key, e.receiver))
        if cur is not None and cur.timestamp >= e.timestamp:
            return False
        self.entries[(e.group_key, e.receiver)] = e
        return True

    def gc(self, now: float) -> int:
        dead = [k for k, e in self.entries.items() if e.expires_at <= now]
        for k in dead:
            del self.entries[k]
        return len(dead)

    def snapshot(self) -> list[dict]:
        return [e.to_dict() for e in self.entries.values()]

    def restore(self, items: list[dict]) -> None:
        for d in items:
            self.merge(d)
