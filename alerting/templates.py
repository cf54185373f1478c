"""Annotation and label templates in the subset of Go's text/template that Prometheus
alerting rules use, so rules copied from Prometheus read the same:

    {{ $labels.feature }}  {{ $value }}  {{ $value | humanize }}
    {{ printf "%.3f" $value }}  {{ index $labels "model" }}  {{ .Labels.model }}  {{ .Value }}
    {{ $externalURL }}  {{- trimmed -}}  {{/* comment */}}

Functions: humanize, humanize1024, humanizePercentage, humanizeDuration, printf, index,
toUpper, toLower, title, trimSpace. Control actions (if, range, with, define) are not in the
subset; a template using them, an unknown function or variable, a wrong argument count or
an unclosed action fails at compile time with TemplateError (which `check-rules` reports
with the file, line and field). A template is compiled once and rendered per alert.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any, Callable, Mapping


class TemplateError(ValueError):
    pass


def go_float(v: float) -> str:
    """Go's %v for a float64 (strconv 'g', shortest)."""
    if v != v:
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == 0:
        return "-0" if math.copysign(1, v) < 0 else "0"
    sign, digits, exponent = Decimal(repr(float(v))).normalize().as_tuple()
    ds = "".join(map(str, digits))
    nd = len(ds)
    dp = nd + exponent
    exp10 = dp - 1
    s = "-" if sign else ""
    if exp10 < -4 or exp10 >= 6:  # strconv 'g' with the shortest precision
        mant = ds[0] + ("." + ds[1:] if nd > 1 else "")
        return f"{s}{mant}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if dp <= 0:
        return f"{s}0.{'0' * (-dp)}{ds}"
    if dp >= nd:
        return f"{s}{ds}{'0' * (dp - nd)}"
    return f"{s}{ds[:dp]}.{ds[dp:]}"


def _num(x: Any) -> float:
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            raise TemplateError(f"cannot convert {x!r} to a number") from None
    raise TemplateError(f"cannot convert {type(x).__name__} to a number")


def _g4(v: float) -> str:
    if v != v:
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return "%.4g" % v


def humanize(x: Any) -> str:
    v = _num(x)
    if v == 0 or v != v or math.isinf(v):
        return _g4(v)
    prefix = ""
    if abs(v) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(v) < 1000:
                break
            prefix, v = p, v / 1000
        return _g4(v) + prefix
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix, v = p, v * 1000
    return _g4(v) + prefix


def humanize1024(x: Any) -> str:
    v = _num(x)
    if abs(v) <= 1 or v != v or math.isinf(v):
        return _g4(v)
    prefix = ""
    for p in ("ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"):
        if abs(v) < 1024:
            break
        prefix, v = p, v / 1024
    return _g4(v) + prefix


def humanize_percentage(x: Any) -> str:
    return _g4(_num(x) * 100) + "%"


def humanize_duration(x: Any) -> str:
    v = _num(x)
    if v != v or math.isinf(v):
        return _g4(v)
    if v == 0:
        return _g4(v) + "s"
    if abs(v) >= 1:
        sign = "-" if v < 0 else ""
        v = abs(v)
        d = int(v)
        seconds, minutes, hours, days = d % 60, (d // 60) % 60, (d // 3600) % 24, d // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{_g4(v)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(v) >= 1:
            break
        prefix, v = p, v * 1000
    return _g4(v) + prefix + "s"


def go_string(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return go_float(x)
    if isinstance(x, dict):
        return "map[" + " ".join(f"{k}:{x[k]}" for k in sorted(x)) + "]"
    if x is None:
        return "<no value>"
    return str(x)


_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d+))?([a-zA-Z%])")


def printf(fmt: Any, *args: Any) -> str:
    if not isinstance(fmt, str):
        raise TemplateError("printf: the format must be a string")
    out, i, ai = [], 0, 0
    for m in _VERB.finditer(fmt):
        out.append(fmt[i:m.start()])
        i = m.end()
        flags, width, prec, verb = m.groups()
        if verb == "%":
            out.append("%")
            continue
        if ai >= len(args):
            out.append(f"%!{verb}(MISSING)")
            continue
        a = args[ai]
        ai += 1
        spec = "%" + (flags or "") + (width or "") + (f".{prec}" if prec is not None else "")
        try:
            if verb in "dxXob":
                n = int(_num(a)) if not isinstance(a, int) else a
                out.append((spec + ("d" if verb == "b" else verb)) % n if verb != "b" else format(n, "b"))
            elif verb in "feEgG":
                out.append((spec + verb) % _num(a))
            elif verb == "s":
                out.append((spec + "s") % go_string(a))
            elif verb == "q":
                from .labels import go_quote
                out.append(go_quote(go_string(a)))
            elif verb == "v":
                out.append((spec + "s") % go_string(a))
            elif verb == "t":
                out.append("true" if a else "false")
            else:
                out.append(f"%!{verb}({go_string(a)})")
        except (TypeError, ValueError):
            out.append(f"%!{verb}({go_string(a)})")
    out.append(fmt[i:])
    if ai < len(args):
        out.append("%!(EXTRA " + ", ".join(go_string(a) for a in args[ai:]) + ")")
    return "".join(out)


def _index(m: Any, key: Any) -> Any:
    if not isinstance(m, Mapping):
        raise TemplateError("index: the first argument must be a map such as $labels")
    return m.get(str(key), "")


def _title(x: Any) -> str:
    return re.sub(r"(^|\s)(\S)", lambda mm: mm.group(1) + mm.group(2).upper(), go_string(x))


# name -> (function, minimum arguments, maximum arguments or None)
FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int | None]] = {
    "humanize": (humanize, 1, 1),
    "humanize1024": (humanize1024, 1, 1),
    "humanizePercentage": (humanize_percentage, 1, 1),
    "humanizeDuration": (humanize_duration, 1, 1),
    "printf": (printf, 1, None),
    "index": (_index, 2, 2),
    "toUpper": (lambda x: go_string(x).upper(), 1, 1),
    "toLower": (lambda x: go_string(x).lower(), 1, 1),
    "title": (_title, 1, 1),
    "trimSpace": (lambda x: go_string(x).strip(), 1, 1),
}

VARIABLES = {"$labels", "$value", "$externalLabels", "$externalURL", "$"}
UNSUPPORTED = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<pipe>\|)
  | (?P<bad>.)
""", re.X | re.S)

Context = tuple  # (labels, value, external_labels, external_url)


def _unquote_go(s: str) -> str:
    body = s[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), body)


def _operand(kind: str, text: str) -> Callable[[Context], Any]:
    if kind in ("str", "raw"):
        v = _unquote_go(text) if kind == "str" else text[1:-1]
        return lambda c: v
    if kind == "num":
        n = float(text)
        return lambda c: n
    if kind == "field":
        parts = [p for p in text.split(".") if p]
        if not parts:
            return lambda c: {"Labels": c[0], "Value": c[1]}
        head, rest = parts[0], parts[1:]
        if head == "Labels" and len(rest) <= 1:
            if rest:
                key = rest[0]
                return lambda c: c[0].get(key, "<no value>")
            return lambda c: c[0]
        if head == "Value" and not rest:
            return lambda c: c[1]
        raise TemplateError(f"unknown field {text!r} (have .Labels.NAME and .Value)")
    # variable
    parts = text.split(".")
    head, rest = parts[0], parts[1:]
    if head not in VARIABLES:
        raise TemplateError(f"undefined variable {head!r} (have $labels, $value, $externalLabels, $externalURL)")
    if head == "$labels" or head == "$externalLabels":
        idx = 0 if head == "$labels" else 2
        if len(rest) > 1:
            raise TemplateError(f"{text!r}: label values have no fields")
        if rest:
            key = rest[0]
            return lambda c: c[idx].get(key, "<no value>")
        return lambda c: c[idx]
    if rest:
        raise TemplateError(f"{text!r}: {head} has no fields")
    if head == "$value":
        return lambda c: c[1]
    if head == "$externalURL":
        return lambda c: c[3]
    return lambda c: {"Labels": c[0], "Value": c[1]}


def _compile_action(src: str) -> Callable[[Context], str]:
    tokens = []
    for m in _TOKEN.finditer(src):
        kind = m.lastgroup
        text = m.group()
        if kind == "ws":
            continue
        if kind == "bad":
            raise TemplateError(f"unexpected {text!r} in action {{{{{src}}}}}")
        tokens.append((kind, text))
    if not tokens:
        raise TemplateError("empty action {{}}")
    if tokens[0][0] == "ident" and tokens[0][1] in UNSUPPORTED:
        raise TemplateError(f"control action {tokens[0][1]!r} is not supported in Vigil templates")
    commands: list[list[tuple[str, str]]] = [[]]
    for t in tokens:
        if t[0] == "pipe":
            if not commands[-1]:
                raise TemplateError(f"missing command before '|' in {{{{{src}}}}}")
            commands.append([])
        else:
            commands[-1].append(t)
    if not commands[-1]:
        raise TemplateError(f"missing command after '|' in {{{{{src}}}}}")

    stages: list[Callable[[Context, Any], Any]] = []
    for ci, cmd in enumerate(commands):
        piped = 1 if ci > 0 else 0
        kind, text = cmd[0]
        if kind == "ident":
            if text in ("true", "false", "nil"):
                if len(cmd) > 1 or piped:
                    raise TemplateError(f"{text!r} is not a function")
                v = {"true": True, "false": False, "nil": None}[text]
                stages.append(lambda c, prev, v=v: v)
                continue
            if text not in FUNCTIONS:
                raise TemplateError(f"function {text!r} not defined")
            fn, lo, hi = FUNCTIONS[text]
            args = []
            for k, t in cmd[1:]:
                if k == "ident":
                    raise TemplateError(f"{t!r}: a function call inside arguments needs parentheses, which the subset lacks")
                args.append(_operand(k, t))
            n = len(args) + piped
            if n < lo or (hi is not None and n > hi):
                want = str(lo) if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
                raise TemplateError(f"wrong number of arguments for {text}: want {want}, got {n}")

            def stage(c, prev, fn=fn, args=tuple(args), piped=piped, name=text):
                vals = [a(c) for a in args]
                if piped:
                    vals.append(prev)
                try:
                    return fn(*vals)
                except TemplateError as e:
                    raise TemplateError(f"{name}: {e}") from None
            stages.append(stage)
        else:
            if piped:
                raise TemplateError(f"non-function {text!r} after '|'")
            if len(cmd) > 1:
                raise TemplateError(f"can't give arguments to non-function {text!r}")
            op = _operand(kind, text)
            stages.append(lambda c, prev, op=op: op(c))

    if len(stages) == 1:
        only = stages[0]
        return lambda c: go_string(only(c, None))

    def run(c):
        v = None
        for s in stages:
            v = s(c, v)
        return go_string(v)
    return run


class Template:
    """A compiled template. `render(labels, value)` never raises for data reasons: a
    runtime error (say a printf of a label that is not a number) renders as the error's
    text, as Prometheus does, so one bad annotation never blocks a notification."""

    __slots__ = ("source", "_parts", "_static")

    def __init__(self, source: str):
        if not isinstance(source, str):
            raise TemplateError(f"a template must be a string, not {type(source).__name__}")
        self.source = source
        parts: list[str | Callable[[Context], str]] = []
        i, n = 0, len(source)
        while i < n:
            j = source.find("{{", i)
            if j < 0:
                parts.append(source[i:])
                break
            text = source[i:j]
            k = source.find("}}", j + 2)
            if k < 0:
                raise TemplateError(f"unclosed action starting at column {j + 1}")
            inner = source[j + 2:k]
            trim_left = inner.startswith("- ") or inner == "-" or inner.startswith("-\t") or inner.startswith("-\n")
            trim_right = inner.endswith(" -") or inner.endswith("\t-") or inner.endswith("\n-")
            if trim_left:
                inner = inner[1:]
                text = text.rstrip()
            if trim_right:
                inner = inner[:-1]
            if text:
                parts.append(text)
            stripped = inner.strip()
            if stripped.startswith("/*"):
                if not stripped.endswith("*/"):
                    raise TemplateError("unclosed comment")
            else:
                if "{{" in inner:
                    raise TemplateError(f"unclosed action starting at column {j + 1}")
                parts.append(_compile_action(inner))
            i = k + 2
            if trim_right:
                while i < n and source[i].isspace():
                    i += 1
        self._parts = parts
        self._static = "".join(parts) if all(isinstance(p, str) for p in parts) else None

    def render(self, labels: Mapping[str, str], value: float = float("nan"),
               external_labels: Mapping[str, str] | None = None, external_url: str = "") -> str:
        if self._static is not None:
            return self._static
        c = (labels, value, external_labels or {}, external_url)
        out = []
        for p in self._parts:
            if isinstance(p, str):
                out.append(p)
            else:
                try:
                    out.append(p(c))
                except TemplateError as e:
                    out.append(f"<error expanding template: {e}>")
        return "".join(out)
