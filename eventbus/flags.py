"""Feature flags: a name, a percentage, and rules on request attributes. The rollout
controller sets them (they travel in vigil.rollout's `flags_json`) and the inference
router calls `evaluate` per request; both import them from here, since services share
contracts, not code of one another. Pure, no I/O.

A request is in a flag's "on" arm when the flag is enabled, every rule matches its
attributes, and the routing key's bucket is below the percentage. The bucket is a
blake2b hash of the flag's namespace and the key onto [0, 1), the function the inference
router also places routing keys with (as `bucket(model, key)`); a flag's namespace has
the flag's name in it, so flag arms are independent of the canary arm and of each other. Because
"on" is `bucket < percentage`, raising the percentage only adds users: whoever was on
stays on. A request without a routing key is on only at 100 percent.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


class FlagError(ValueError):
    """A bad flag; `field` names what was wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field

NUMERIC_OPS = ("gt", "gte", "lt", "lte")
OPS = ("eq", "ne", "in", "not_in", "prefix", "matches", "exists", *NUMERIC_OPS)


def bucket(namespace: str, key: str) -> float:
    """A stable point in [0, 1) for a key; router.routing_point(model, key) is bucket(model, key)."""
    digest = hashlib.blake2b(f"{namespace}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class Rule:
    attribute: str
    op: str
    value: Any = None

    def compile(self, where: str) -> Callable[[Mapping[str, Any]], bool]:
        a, v = self.attribute, self.value
        if not isinstance(a, str) or not a:
            raise FlagError(f"{where}.attribute", "must be a non-empty string")
        if self.op not in OPS:
            raise FlagError(f"{where}.op", f"{self.op!r} is not one of {', '.join(OPS)}")
        if self.op in ("in", "not_in"):
            if not isinstance(v, (list, tuple, set, frozenset)):
                raise FlagError(f"{where}.value", f"{self.op} needs a list")
            vs = frozenset(str(x) for x in v)
            return (lambda at: a in at and str(at[a]) in vs) if self.op == "in" else \
                (lambda at: str(at.get(a)) not in vs)
        if self.op == "matches":
            try:
                rx = re.compile(str(v))
            except (re.error, RecursionError, OverflowError) as e:  # the last two: nesting, repeat counts
                raise FlagError(f"{where}.value", f"bad regular expression: {e}") from None
            return lambda at: a in at and rx.fullmatch(str(at[a])) is not None
        if self.op == "exists":
            return lambda at: a in at
        if self.op == "prefix":
            return lambda at: a in at and str(at[a]).startswith(str(v))
        if self.op in ("eq", "ne"):
            return (lambda at: a in at and str(at[a]) == str(v)) if self.op == "eq" else \
                (lambda at: str(at.get(a)) != str(v))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise FlagError(f"{where}.value", f"{self.op} needs a number")
        cmp = {"gt": float.__gt__, "gte": float.__ge__, "lt": float.__lt__, "lte": float.__le__}[self.op]

        def numeric(at):
            try:
                return cmp(float(at[a]), float(v))
            except (KeyError, TypeError, ValueError):
                return False
        return numeric


@dataclass
class Flag:
    name: str
    percentage: float
    rules: list[Rule] = field(default_factory=list)
    enabled: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise FlagError("flag.name", f"{self.name!r} is not a name of letters, digits, _ . -")
        p = self.percentage
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
            raise FlagError(f"flags.{self.name}.percentage", f"{p!r} is not between 0 and 100")
        self.rules = [r if isinstance(r, Rule) else Rule(**r) for r in self.rules]
        self._match = [r.compile(f"flags.{self.name}.rules[{i}]") for i, r in enumerate(self.rules)]
        self._cut = float(p) / 100.0

    def to_dict(self) -> dict:
        return {"name": self.name, "percentage": self.percentage, "enabled": self.enabled,
                "rules": [{"attribute": r.attribute, "op": r.op, "value": r.value} for r in self.rules]}

    @classmethod
    def from_dict(cls, d: dict) -> "Flag":
        unknown = set(d) - {"name", "percentage", "rules", "enabled"}
        if unknown:
            raise FlagError(f"flags.{sorted(unknown)[0]}", "is not a flag setting")
        enabled = d.get("enabled", True)
        if not isinstance(enabled, bool):
            raise FlagError(f"flags.{d.get('name')}.enabled", f"{enabled!r} is not true or false")
        return cls(d.get("name"), d.get("percentage"), list(d.get("rules") or []), enabled)


def evaluate(flag: Flag, key: str, attributes: Mapping[str, Any] | None = None, namespace: str = "") -> bool:
    """Is this request in the flag's "on" arm? `namespace` is the model the flag belongs to."""
    if not flag.enabled:
        return False
    at = attributes or {}
    for match in flag._match:
        if not match(at):
            return False
    if flag._cut >= 1.0:
        return True
    if not key:
        return False
    return bucket(f"{namespace}/{flag.name}", key) < flag._cut


def evaluate_all(flags: Mapping[str, Flag], key: str, attributes: Mapping[str, Any] | None = None,
                 namespace: str = "") -> dict[str, bool]:
    return {name: evaluate(f, key, attributes, namespace) for name, f in flags.items()}
