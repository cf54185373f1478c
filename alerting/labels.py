"""Label sets, their Alertmanager fingerprint, and label matchers.

The fingerprint is Alertmanager's (prometheus/common `model.LabelSet.Fingerprint`):
FNV-1a 64 over the label names in sorted order, each name followed by 0xff, its value,
0xff. Written as 16 lower-case hex digits it is the `fingerprint` field of Alertmanager's
API and webhook, so an alert has the same identity in Vigil and in Alertmanager.

A single matcher, its parser and the label-name pattern are eventbus.matchers (the rollout
controller's policies use them too); lists of matchers are here.
"""

from __future__ import annotations

from typing import Mapping

from eventbus.matchers import Matcher, go_quote, parse_matcher

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = 0xFFFFFFFFFFFFFFFF
SEP = 0xFF


def fingerprint(labels: Mapping[str, str]) -> int:
    h = FNV_OFFSET
    for name in sorted(labels):
        for b in name.encode():
            h = ((h ^ b) * FNV_PRIME) & MASK
        h = ((h ^ SEP) * FNV_PRIME) & MASK
        for b in labels[name].encode():
            h = ((h ^ b) * FNV_PRIME) & MASK
        h = ((h ^ SEP) * FNV_PRIME) & MASK
    return h


def fingerprint_hex(labels: Mapping[str, str]) -> str:
    return f"{fingerprint(labels):016x}"


def labelset_string(labels: Mapping[str, str]) -> str:
    """`model.LabelSet.String()`: {a="1", b="2"}, names sorted."""
    return "{" + ", ".join(f"{k}={go_quote(labels[k])}" for k in sorted(labels)) + "}"


def parse_matchers(text: str) -> list[Matcher]:
    """`{a="1", b=~"x"}` or `a="1",b=~"x"` (the form amtool takes on its command line)."""
    t = text.strip()
    if t.startswith("{") and t.endswith("}"):
        t = t[1:-1]
    parts, cur, quoted, esc = [], [], False, False
    for ch in t:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            cur.append(ch)
            esc = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [parse_matcher(p) for p in parts if p.strip()]


def matchers_string(ms: list[Matcher]) -> str:
    """`labels.Matchers.String()`: {a="1",b=~"x"}."""
    return "{" + ",".join(str(m) for m in ms) + "}"


def all_match(ms: list[Matcher] | tuple[Matcher, ...], labels: Mapping[str, str]) -> bool:
    for m in ms:
        if not m.matches(labels):
            return False
    return True
