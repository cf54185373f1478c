"""Label sets, their Alertmanager fingerprint, and label matchers.

The fingerprint is Alertmanager's (prometheus/common `model.LabelSet.Fingerprint`):
FNV-1a 64 over the label names in sorted order, each name followed by 0xff, its value,
0xff. Written as 16 lower-case hex digits it is the `fingerprint` field of Alertmanager's
API and webhook, so an alert has the same identity in Vigil and in Alertmanager.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = 0xFFFFFFFFFFFFFFFF
SEP = 0xFF

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


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


def go_quote(s: str) -> str:
    """Go's %q for the strings label values usually are (printable UTF-8)."""
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def labelset_string(labels: Mapping[str, str]) -> str:
    """`model.LabelSet.String()`: {a="1", b="2"}, names sorted."""
    return "{" + ", ".join(f"{k}={go_quote(labels[k])}" for k in sorted(labels)) + "}"


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str  # "=", "!=", "=~", "!~"
    value: str

    def __post_init__(self):
        if self.op not in ("=", "!=", "=~", "!~"):
            raise ValueError(f"unknown matcher operator {self.op!r}")
        if self.op in ("=~", "!~"):
            object.__setattr__(self, "_re", re.compile(f"(?:{self.value})\\Z", re.S))

    def matches_value(self, v: str) -> bool:
        op = self.op
        if op == "=":
            return v == self.value
        if op == "!=":
            return v != self.value
        m = self._re.match(v) is not None  # type: ignore[attr-defined]
        return m if op == "=~" else not m

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.matches_value(labels.get(self.name, ""))

    def __str__(self) -> str:
        return f"{self.name}{self.op}{go_quote(self.value)}"


_MATCHER = re.compile(r"""^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$""", re.S)


def parse_matcher(text: str) -> Matcher:
    """One matcher as Alertmanager writes them: name="value", name=~"re", name!=v."""
    m = _MATCHER.match(text)
    if not m:
        raise ValueError(f"bad matcher {text!r}: want name=\"value\" (or !=, =~, !~)")
    name, op, raw = m.groups()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        value = _unquote(raw[1:-1], text)
    elif raw.startswith('"') or raw.endswith('"'):
        raise ValueError(f"bad matcher {text!r}: unbalanced quotes")
    else:
        value = raw
    if op in ("=~", "!~"):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"bad regular expression in matcher {text!r}: {e}") from None
    return Matcher(name, op, value)


def _unquote(s: str, whole: str) -> str:
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\":
            if i + 1 >= len(s):
                raise ValueError(f"bad matcher {whole!r}: dangling backslash")
            nxt = s[i + 1]
            out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt))
            i += 2
        elif ch == '"':
            raise ValueError(f"bad matcher {whole!r}: unescaped quote")
        else:
            out.append(ch)
            i += 1
    return "".join(out)


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
