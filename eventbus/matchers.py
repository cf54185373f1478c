"""Alertmanager's label matchers (name="value", name!=v, name=~"re", name!~"re"), the
label-name pattern, and Go's %q quoting that writes a matcher back as Alertmanager does.
Shared by the alerting rules and silences and the rollout controller's response policies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


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
