"""Logging for every `vigil` command: text or JSON lines, a level per component.

Everything goes through the standard `logging` module; `configure` installs one handler
on the root logger (stderr) with either formatter:

- text (the default): `2026-01-01 12:00:00,123 INFO inference.requests: Generate ... key=value ...`
- json: one JSON object per line, `time` (RFC 3339, UTC), `level`, `logger`, `message`,
  `service` (which vigil command), then the record's own fields (what the code passed
  as `extra=`), and `exception` with the traceback where there is one.

A field is whatever a caller put in `extra`: the per-request line of the inference
server (logger `inference.requests`, see inference/api/serving.py) carries request id,
tenant, model, version, route, status, latencies, token counts and trace id that way,
so it is a flat JSON object in json mode and key=value pairs in text mode.

Levels: `--log-level` for everything, `--log-levels NAME=LEVEL,...` per component
(a logger name and everything under it: `inference`, `inference.requests`, `eventbus`,
`alerting`, `rollout`, `stream_processors` or its alias `process`, `aiokafka`, ...).
aiokafka is quiet (CRITICAL) unless asked for, or the global level is DEBUG: the
publisher reports a broker going and coming back itself.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

FORMATS = ("text", "json")
ALIASES = {"process": "stream_processors", "processors": "stream_processors", "requests": "inference.requests"}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# attributes every LogRecord has; anything else on a record came in through `extra`
STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def fields(record: logging.LogRecord) -> dict:
    """The fields a caller added to the record through `extra`, in the order given."""
    return {k: v for k, v in vars(record).items() if k not in STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self, service: str = ""):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.service:
            out["service"] = self.service
        for k, v in fields(record).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """The classic line, with the record's fields after it as key=value."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extra = fields(record)
        if extra:
            line += " " + " ".join(f"{k}={text_value(v)}" for k, v in extra.items())
        return line


def text_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, str):
        return v if v and not any(c.isspace() or c in '"=' for c in v) else json.dumps(v, ensure_ascii=False)
    if v is None:
        return '""'
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or '""'
    return json.dumps(v, default=str, ensure_ascii=False, separators=(",", ":")) if isinstance(v, dict) else str(v)


def parse_level(text: str, option: str) -> int:
    name = text.strip().upper()
    if name.isdigit():
        return int(name)
    if name == "WARN":
        name = "WARNING"
    if name not in LEVELS:
        raise ValueError(f"{option}: {text.strip()!r} is not a level ({', '.join(LEVELS)})")
    return logging.getLevelName(name)


def parse_levels(text: str, option: str = "--log-levels") -> dict[str, int]:
    """'inference=DEBUG,eventbus=WARNING' -> {logger name: level}."""
    out: dict[str, int] = {}
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, level = item.partition("=")
        name = name.strip()
        if not sep or not name or not level.strip():
            raise ValueError(f"{option}: {item!r} is not NAME=LEVEL (e.g. inference=DEBUG,eventbus=WARNING)")
        if any(c.isspace() for c in name):
            raise ValueError(f"{option}: {name!r} is not a logger name")
        out[ALIASES.get(name, name)] = parse_level(level, f"{option} {name}")
    return out


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes, not what it was when the
    handler was made (a test runner or a daemon may swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def configure(fmt: str = "text", level: str = "INFO", levels: str = "", service: str = "",
              stream=None) -> logging.Handler:
    """Set up the root logger; ValueError (naming the option) on a bad format or level.
    Returns the handler installed, in place of an earlier one of ours; handlers others
    installed (pytest's, say) stay."""
    if fmt not in FORMATS:
        raise ValueError(f"--log-format: {fmt!r} is not one of {', '.join(FORMATS)}")
    root_level = parse_level(level, "--log-level")
    per_logger = parse_levels(levels)
    handler = logging.StreamHandler(stream) if stream is not None else StderrHandler()
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter())
    handler.vigil = True
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "vigil", False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(root_level)
    if root_level > logging.DEBUG and "aiokafka" not in per_logger:
        per_logger["aiokafka"] = logging.CRITICAL
    for name, lvl in per_logger.items():
        logging.getLogger(name).setLevel(lvl)
    return handler
