"""Silences (matchers, author, comment, start and end), Alertmanager's semantics: a silence
mutes every alert all of whose labels it matches while it is active; expiring one sets its
end to now. The store is a plain dict that snapshots to JSON and merges a peer's copy
(last update wins), which is how a restart or a second instance gets them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping

from .durations import parse_rfc3339, rfc3339
from .labels import all_match
from eventbus.matchers import Matcher

RETENTION = 120 * 3600.0  # expired silences are kept this long, as Alertmanager does


class SilenceError(ValueError):
    pass


@dataclass
class Silence:
    id: str
    matchers: list[Matcher]
    starts_at: float
    ends_at: float
    created_by: str
    comment: str
    updated_at: float = 0.0

    def state(self, now: float) -> str:
        if now < self.starts_at:
            return "pending"
        if now < self.ends_at:
            return "active"
        return "expired"

    def mutes(self, labels: Mapping[str, str], now: float) -> bool:
        return self.starts_at <= now < self.ends_at and all_match(self.matchers, labels)

    def to_api(self, now: float) -> dict:
        """Alertmanager's v2 `gettableSilence`."""
        return {
            "id": self.id,
            "matchers": [{"name": m.name, "value": m.value, "isRegex": m.op in ("=~", "!~"),
                          "isEqual": m.op in ("=", "=~")} for m in self.matchers],
            "startsAt": rfc3339(self.starts_at), "endsAt": rfc3339(self.ends_at),
            "updatedAt": rfc3339(self.updated_at), "createdBy": self.created_by, "comment": self.comment,
            "status": {"state": self.state(now)},
        }

    @staticmethod
    def matchers_from_api(items) -> list[Matcher]:
        out = []
        for m in items or []:
            try:
                is_re, is_eq = bool(m.get("isRegex", False)), bool(m.get("isEqual", True))
                op = {(False, True): "=", (False, False): "!=", (True, True): "=~", (True, False): "!~"}[(is_re, is_eq)]
                out.append(Matcher(str(m["name"]), op, str(m["value"])))
            except (KeyError, TypeError, AttributeError) as e:
                raise SilenceError(f"bad matcher {m!r}: {e}") from None
            except Exception as e:  # a bad regular expression
                raise SilenceError(f"bad matcher {m!r}: {e}") from None
        return out


@dataclass
class Silences:
    silences: dict[str, Silence] = field(default_factory=dict)
    on_change: Callable[[Silence], None] | None = None
    version: int = 0

    def add(self, matchers: list[Matcher], starts_at: float, ends_at: float, created_by: str, comment: str,
            now: float, id: str | None = None) -> Silence:
        if not matchers:
            raise SilenceError("a silence needs at least one matcher")
        if all(m.matches_value("") for m in matchers):
            raise SilenceError("at least one matcher must not match the empty string (it would silence everything)")
        if not created_by:
            raise SilenceError("a silence needs an author (createdBy)")
        if not comment:
            raise SilenceError("a silence needs a comment")
        if ends_at <= starts_at:
            raise SilenceError("the silence ends before it starts")
        if ends_at <= now:
            raise SilenceError("the silence ends in the past")
        if id is not None and id in self.silences:
            old = self.silences[id]
            if old.state(now) == "expired":
                raise SilenceError(f"silence {id} has expired and cannot be updated")
            # Alertmanager replaces a silence whose matchers change: expire the old one.
            old.ends_at = max(min(old.ends_at, now), old.starts_at)
            old.updated_at = now
            self._changed(old)
            id = None
        s = Silence(id or str(uuid.uuid4()), list(matchers), max(starts_at, now), ends_at, created_by, comment, now)
        self.silences[s.id] = s
        self._changed(s)
        return s

    def expire(self, id: str, now: float) -> Silence:
        s = self.silences.get(id)
        if s is None:
            raise SilenceError(f"no silence {id}")
        if s.state(now) == "expired":
            raise SilenceError(f"silence {id} already expired")
        s.ends_at = max(now, s.starts_at) if s.starts_at <= now else s.starts_at
        s.updated_at = now
        self._changed(s)
        return s

    def _changed(self, s: Silence) -> None:
        self.version += 1
        if self.on_change:
            self.on_change(s)

    def list(self, now: float, states: tuple[str, ...] = ("active", "pending", "expired")) -> list[Silence]:
        return sorted((s for s in self.silences.values() if s.state(now) in states),
                      key=lambda s: (s.ends_at, s.id))

    def silenced_by(self, labels: Mapping[str, str], now: float) -> list[str]:
        return [s.id for s in self.silences.values() if s.mutes(labels, now)]

    def muted(self, labels: Mapping[str, str], now: float) -> bool:
        for s in self.silences.values():
            if s.mutes(labels, now):
                return True
        return False

    def next_change(self, now: float) -> float | None:
        """The next time a silence starts or ends (when muting may change)."""
        ts = [t for s in self.silences.values() for t in (s.starts_at, s.ends_at) if t > now]
        return min(ts) if ts else None

    def gc(self, now: float) -> None:
        for id in [i for i, s in self.silences.items() if s.ends_at + RETENTION < now]:
            del self.silences[id]

    def merge(self, d: dict) -> bool:
        """Take a peer's (or a log's) copy of one silence if it is newer than ours."""
        s = self.from_dict(d)
        cur = self.silences.get(s.id)
        if cur is not None and cur.updated_at >= s.updated_at:
            return False
        self.silences[s.id] = s
        self.version += 1
        return True

    @staticmethod
    def to_dict(s: Silence) -> dict:
        return {"id": s.id, "matchers": [[m.name, m.op, m.value] for m in s.matchers], "starts_at": s.starts_at,
                "ends_at": s.ends_at, "created_by": s.created_by, "comment": s.comment, "updated_at": s.updated_at}

    @staticmethod
    def from_dict(d: dict) -> Silence:
        return Silence(d["id"], [Matcher(*m) for m in d["matchers"]], d["starts_at"], d["ends_at"],
                       d["created_by"], d["comment"], d.get("updated_at", 0.0))

    def snapshot(self) -> list[dict]:
        return [self.to_dict(s) for s in self.silences.values()]

    def restore(self, items: list[dict]) -> None:
        for d in items:
            self.merge(d)


def parse_api_silence(body: dict, now: float) -> dict:
    """Alertmanager's v2 `postableSilence` -> keyword arguments of Silences.add."""
    if not isinstance(body, dict):
        raise SilenceError("a silence is a JSON object")
    try:
        starts = parse_rfc3339(body.get("startsAt", "")) or now
        ends = parse_rfc3339(body["endsAt"])
    except (KeyError, ValueError) as e:
        raise SilenceError(f"bad startsAt/endsAt: {e}") from None
    if ends is None:
        raise SilenceError("endsAt is required")
    return {"matchers": Silence.matchers_from_api(body.get("matchers")), "starts_at": starts, "ends_at": ends,
            "created_by": str(body.get("createdBy", "")), "comment": str(body.get("comment", "")),
            "id": body.get("id") or None}
