"""The operations of the rollout controller, as its admin API and the `vigil rollout`
commands call them: `LocalApi(controller).call(op, **arguments) -> dict | list`, which
checks the call's arguments whole (each by the one function of its kind) before anything
changes, and raises RolloutError naming the first bad field. The `vigil rollout` service
serves these calls over HTTP (service.py); cli.py sends them there, or runs them on a
controller kept in a file."""

from __future__ import annotations

import math
from dataclasses import fields

from .config import Thresholds
from .controller import Controller
from .records import STRATEGIES, Decision, RolloutError

# ---- the calls' arguments, each checked by the one function of its kind, all of them
# ---- before a call changes anything

NAME_LIMIT, TEXT_LIMIT, LIST_LIMIT = 200, 2000, 100


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true or false",
            type(None): "null"}.get(type(v), "a number")


def text(field: str, v, limit: int = TEXT_LIMIT) -> str:
    if not isinstance(v, str):
        raise RolloutError(field, f"must be a string, not {_kind(v)}")
    if len(v) > limit:
        raise RolloutError(field, f"is longer than {limit} characters")
    if not v.isprintable():
        raise RolloutError(field, "holds a control character or a lone surrogate")
    return v


def name(field: str, v) -> str:
    """A model, version, flag or attribute name."""
    if not text(field, v, NAME_LIMIT):
        raise RolloutError(field, "is empty")
    return v


def number(field: str, v) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RolloutError(field, f"must be a number, not {_kind(v)}")
    try:
        finite = math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise RolloutError(field, "is not a finite number")
    return v


def whole(field: str, v) -> int:
    if not isinstance(number(field, v), int):
        raise RolloutError(field, f"must be a whole number, not {v:g}")
    return v


def boolean(field: str, v) -> bool:
    if not isinstance(v, bool):
        raise RolloutError(field, f"must be true or false, not {_kind(v)}")
    return v


def scalar(field: str, v):
    if v is None or isinstance(v, bool):
        return v
    return text(field, v) if isinstance(v, str) else number(field, v)


def choice(*options: str):
    def check(field: str, v) -> str:
        if text(field, v, NAME_LIMIT) not in options:
            raise RolloutError(field, f"{v!r} is not one of {', '.join(options)}")
        return v
    return check


def listof(item):
    def check(field: str, v) -> list:
        if not isinstance(v, list):
            raise RolloutError(field, f"must be a list, not {_kind(v)}")
        if len(v) > LIST_LIMIT:
            raise RolloutError(field, f"has more than {LIST_LIMIT} items")
        return [item(f"{field}[{i}]", x) for i, x in enumerate(v)]
    return check


def either(*kinds):
    """The first of `kinds` that takes the value; the last one's error otherwise."""
    def check(field: str, v):
        for k in kinds[:-1]:
            try:
                return k(field, v)
            except RolloutError:
                pass
        return kinds[-1](field, v)
    return check


def mapping(value):
    """An object of names to values."""
    def check(field: str, v) -> dict:
        if not isinstance(v, dict):
            raise RolloutError(field, f"must be an object, not {_kind(v)}")
        if len(v) > LIST_LIMIT:
            raise RolloutError(field, f"has more than {LIST_LIMIT} entries")
        return {name(f"{field}.<name>", k): value(f"{field}.{k}", x) for k, x in v.items()}
    return check


def obj(required: dict | None = None, optional: dict | None = None):
    """An object with these members (null is the same as leaving a member out); `field`
    is the object's own name, empty for the arguments of a call."""
    required, optional = required or {}, optional or {}

    def check(field: str, v) -> dict:
        if not isinstance(v, dict):
            raise RolloutError(field or "body", f"must be an object, not {_kind(v)}")
        out = {}
        for k, x in v.items():
            member = f"{field}.{k}" if field else k
            kind = required.get(k) or optional.get(k)
            if kind is None:
                raise RolloutError(member, f"is not one of {', '.join([*required, *optional]) or 'nothing'}")
            if x is not None:
                out[k] = kind(member, x)
        for k in required:
            if k not in out:
                raise RolloutError(f"{field}.{k}" if field else k, "is required")
        return out
    return check


THRESHOLDS = obj(optional={f.name: whole if f.type == "int" else mapping(number) if f.name == "weights" else number
                           for f in fields(Thresholds)})
RULE = obj(required={"attribute": name, "op": name}, optional={"value": either(scalar, listof(scalar))})
FLAG = obj(required={"name": name, "percentage": number}, optional={"enabled": boolean, "rules": listof(RULE)})
MODEL = {"model": name}
ARGUMENTS = {
    "register": obj({**MODEL, "versions": listof(name)}, {"stable": name}),
    "start": obj({**MODEL, "candidate": name}, {
        "stable": name, "strategy": choice(*STRATEGIES), "steps": listof(number), "min_requests": whole,
        "interval": number, "inconclusive_limit": whole, "failure_limit": whole, "keep_old_for": number, "watch": number,
        "thresholds": THRESHOLDS}),
    "status": obj(MODEL),
    "list_models": obj(),
    "pause": obj(MODEL, {"reason": text}),
    **{op: obj(MODEL) for op in ("resume", "promote", "abort", "undo", "history", "actions")},
    "set_flag": obj({**MODEL, "flag": FLAG}),
    "remove_flag": obj({**MODEL, "name": name}),
}
OPS = tuple(ARGUMENTS)


def arguments(op: str, kw: dict) -> dict:
    """The call's arguments, checked whole; RolloutError naming the first bad one."""
    if op not in ARGUMENTS:
        raise RolloutError("op", f"{op!r} is not one of {', '.join(OPS)}")
    return ARGUMENTS[op]("", kw)


def plain(r):
    """A call's result as JSON can carry it (a decision without the controller's state)."""
    if isinstance(r, Decision):
        r = r.to_dict()
        r.pop("state")
    return r


class LocalApi:
    """`register_candidates`: `start` makes its candidate known (the service does this: a
    candidate at weight 0 sends no event before its rollout starts). Without it, an
    unknown candidate is an error naming the field."""

    def __init__(self, controller: Controller | None = None, register_candidates: bool = False):
        self.controller = controller or Controller()
        self.register_candidates = register_candidates

    def call(self, op: str, **kw):
        kw = arguments(op, kw)
        if op == "start":
            return plain(self.controller.start(register=self.register_candidates, **kw))
        if op == "register":  # versions travel as a list
            return plain(self.controller.register(kw["model"], *kw["versions"], stable=kw.get("stable", "")))
        return plain(getattr(self.controller, op)(**kw))
