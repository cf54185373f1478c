"""API keys: the key file, its secrets and bearer tokens, and the store that reloads it.
Every service that checks a key (the inference server's fronts, the page's actions)
reads the one file through this module.

A key file (YAML, or JSON, which YAML reads too) lists keys by the SHA-256 of their
secret, never the secret itself:

    - name: web-frontend        # a label in metrics and logs: letters, digits, . _ -
      tenant: acme              # recorded in every event of the key's requests
      sha256: 9f86d08...        # hex SHA-256 of the secret (`vigil keys add` makes both)
      admin: false              # may call the admin methods (load, unload, traffic; the page's actions)
      requests_per_second: 20   # token bucket, with `burst` (default: the rate, at least 1)
      tokens_per_minute: 60000  # prompt plus completion tokens, token bucket
      max_streams: 8            # calls in flight at once (each gRPC call is an HTTP/2 stream)
      expires: 2027-01-01T00:00:00Z

The top level is a list of entries, or a mapping with a `keys` list, so that
`vigil keys add ... >> keys.yml` appends a valid entry to either. A limit left out is
no limit. The secrets `vigil keys add` makes are 256 random bits, so a plain SHA-256
is as strong as a slow KDF here, and costs microseconds per call instead of the tens
of milliseconds a KDF would spend (which would itself be a way to flood the server).

Every problem is reported with the file, the line and the field, and a file with a
problem loads nothing: at start-up the server refuses to start; on a reload the server
keeps the keys it had.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

SECRET_PREFIX = "vgk_"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # all with fullmatch: `$` would let "\n" through
HEX64_RE = re.compile(r"[0-9a-f]{64}")
TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")  # visible ASCII, no spaces
FIELDS = {"name", "tenant", "sha256", "admin", "requests_per_second", "burst", "tokens_per_minute",
          "max_streams", "expires", "comment"}


@dataclass(frozen=True)
class KeyLimits:
    requests_per_second: float | None = None
    burst: float | None = None  # None: the rate, at least 1
    tokens_per_minute: float | None = None
    max_streams: int | None = None

    @property
    def request_burst(self) -> float:
        if self.burst is not None:
            return self.burst
        return max(1.0, self.requests_per_second or 1.0)


@dataclass(frozen=True)
class ApiKey:
    name: str
    tenant: str
    sha256: str
    admin: bool = False
    limits: KeyLimits = KeyLimits()
    expires: dt.datetime | None = None
    line: int = 0

    def __repr__(self) -> str:  # never print the hash either: it is what a stolen file would give away
        return f"ApiKey(name={self.name!r}, tenant={self.tenant!r}, admin={self.admin})"


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file, line and field."""


class AuthError(Exception):
    """A call refused: `code` is "unauthenticated" or "permission_denied"; `reason` is
    the metrics label; the message never contains the token."""

    def __init__(self, code: str, reason: str, message: str):
        super().__init__(message)
        self.code = code
        self.reason = reason


# -- secrets ---------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def entry_yaml(key: ApiKey) -> str:
    """The key file entry for `key`, as a YAML list item."""
    d: dict = {"name": key.name, "tenant": key.tenant, "sha256": key.sha256, "admin": key.admin}
    lim = key.limits
    for f in ("requests_per_second", "burst", "tokens_per_minute", "max_streams"):
        value = getattr(lim, f)
        if value is not None:
            d[f] = int(value) if float(value).is_integer() else value
    if key.expires is not None:
        d["expires"] = key.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    return yaml.safe_dump([d], sort_keys=False)


# -- the key file ----------------------------------------------------------------------


def _compose(text: str, file: str):
    loader = yaml.SafeLoader(text)
    try:
        return loader.get_single_node(), loader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise KeyFileError(f"{file}:{mark.line + 1 if mark else 0}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise KeyFileError(f"{file}: not valid YAML: {e}") from None


def _scalar(loader, node):
    try:
        value = loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:  # e.g. `expires: 2027-13-01`
        raise KeyFileError(f"line {node.start_mark.line + 1}: {e}") from None
    try:
        hash(value)
    except TypeError:  # a complex key (`? [a, b]`), which no field name is
        raise KeyFileError(f"line {node.start_mark.line + 1}: {value!r} is not a field name") from None
    return value


def _number(where: str, field: str, value, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KeyFileError(f"{where}: {field}: {value!r} is not a number")
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise KeyFileError(f"{where}: {field}: {value!r} is not a whole number")
    if isinstance(value, int) and abs(value) > 2**53:
        raise KeyFileError(f"{where}: {field}: {value!r} is too large")
    if value != value or value in (float("inf"), float("-inf")):
        raise KeyFileError(f"{where}: {field}: {value!r} is not finite")
    if value <= 0:
        raise KeyFileError(f"{where}: {field}: {value!r} must be above 0 (leave the field out for no limit)")
    return int(value) if integer else float(value)


def _expiry(where: str, value) -> dt.datetime:
    if isinstance(value, dt.datetime):
        t = value
    elif isinstance(value, dt.date):
        t = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise KeyFileError(f"{where}: expires: {value!r} is not an ISO 8601 date or time") from None
    else:
        raise KeyFileError(f"{where}: expires: {value!r} is not a date or time")
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def parse_keys(text: str, file: str = "<keys>") -> dict[str, ApiKey]:
    """The keys of a key file's text, by their SHA-256."""
    node, loader = _compose(text, file)
    try:
        if node is None:
            return {}  # an empty file: no key is valid
        items_node = node
        if isinstance(node, yaml.MappingNode):
            top = {_scalar(loader, k): v for k, v in node.value}
            unknown = set(top) - {"keys"}
            if unknown or "keys" not in top:
                raise KeyFileError(f"{file}:{node.start_mark.line + 1}: the top level is a list of keys or a "
                                   f"mapping with only a `keys` list (found {', '.join(map(str, top)) or 'nothing'})")
            items_node = top["keys"]
            if isinstance(items_node, yaml.ScalarNode) and _scalar(loader, items_node) is None:
                return {}
        if not isinstance(items_node, yaml.SequenceNode):
            raise KeyFileError(f"{file}:{items_node.start_mark.line + 1}: keys: expected a list of entries")
        keys: dict[str, ApiKey] = {}
        names: dict[str, int] = {}
        for i, item in enumerate(items_node.value):
            line = item.start_mark.line + 1
            key = _parse_entry(loader, item, f"{file}:{line}: entry {i + 1}", line)
            if key.name in names:
                raise KeyFileError(f"{file}:{line}: entry {i + 1}: name: {key.name!r} is already the name of the "
                                   f"entry on line {names[key.name]}")
            if key.sha256 in keys:
                raise KeyFileError(f"{file}:{line}: entry {i + 1} ({key.name!r}): sha256: the same secret as "
                                   f"{keys[key.sha256].name!r} on line {keys[key.sha256].line}")
            names[key.name] = line
            keys[key.sha256] = key
        return keys
    except KeyFileError as e:
        msg = str(e)
        raise KeyFileError(msg if msg.startswith(file) else f"{file}: {msg}") from None
    finally:
        loader.dispose()


def _parse_entry(loader, node, where: str, line: int) -> ApiKey:
    if not isinstance(node, yaml.MappingNode):
        raise KeyFileError(f"{where}: expected a mapping with name, tenant and sha256")
    d: dict = {}
    for knode, vnode in node.value:
        k = _scalar(loader, knode)
        if k in d:
            raise KeyFileError(f"{where}: {k}: given twice (line {knode.start_mark.line + 1})")
        if k not in FIELDS:
            raise KeyFileError(f"{where}: {k}: unknown field (expected {', '.join(sorted(FIELDS))})")
        if not isinstance(vnode, yaml.ScalarNode):
            raise KeyFileError(f"{where}: {k}: expected a single value")
        d[k] = _scalar(loader, vnode)
    for f in ("name", "tenant", "sha256"):
        if f not in d or d[f] in (None, ""):
            raise KeyFileError(f"{where}: {f}: missing")
    name, tenant, digest = d["name"], d["tenant"], d["sha256"]
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise KeyFileError(f"{where}: name: {name!r} must be 1 to 64 letters, digits, '.', '_' or '-'")
    where = f"{where} ({name!r})"
    if not isinstance(tenant, str) or len(tenant) > 128 or not tenant.isprintable():
        raise KeyFileError(f"{where}: tenant: must be a string of at most 128 printable characters")
    if not isinstance(digest, str) or not HEX64_RE.fullmatch(digest.lower()):
        raise KeyFileError(f"{where}: sha256: must be 64 hex digits (the SHA-256 of the secret, "
                           "never the secret itself)")
    admin = d.get("admin", False)
    if not isinstance(admin, bool):
        raise KeyFileError(f"{where}: admin: {admin!r} is not true or false")
    limits = KeyLimits(
        requests_per_second=_number(where, "requests_per_second", d["requests_per_second"])
        if d.get("requests_per_second") is not None else None,
        burst=_number(where, "burst", d["burst"]) if d.get("burst") is not None else None,
        tokens_per_minute=_number(where, "tokens_per_minute", d["tokens_per_minute"])
        if d.get("tokens_per_minute") is not None else None,
        max_streams=_number(where, "max_streams", d["max_streams"], integer=True)
        if d.get("max_streams") is not None else None)
    if limits.burst is not None and limits.requests_per_second is None:
        raise KeyFileError(f"{where}: burst: needs requests_per_second")
    if limits.burst is not None and limits.burst < 1:
        raise KeyFileError(f"{where}: burst: {limits.burst!r} must be at least 1 (one request)")
    expires = _expiry(where, d["expires"]) if d.get("expires") is not None else None
    return ApiKey(name=name, tenant=tenant, sha256=digest.lower(), admin=admin, limits=limits,
                  expires=expires, line=line)


def load_keys(path: str | os.PathLike) -> dict[str, ApiKey]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise KeyFileError(f"{p}: cannot read the key file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise KeyFileError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_keys(text, str(p))


# -- the check -------------------------------------------------------------------------


@dataclass
class AuthOptions:
    keys_file: str = ""     # empty: no key is checked, every call is served (tenant empty)
    reload_s: float = 5.0   # how often the file is checked for changes; 0: never reloaded


def bearer_token(metadata) -> str:
    """The bearer token of a call's metadata (pairs of key and value)."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        raise AuthError("unauthenticated", "missing",
                        "authorization: missing; send the metadata 'authorization: Bearer <API key>'")
    if len(values) > 1:
        raise AuthError("unauthenticated", "malformed", "authorization: given more than once")
    value = values[0]
    if isinstance(value, bytes):
        raise AuthError("unauthenticated", "malformed", "authorization: must be text, not binary metadata")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("unauthenticated", "malformed",
                        "authorization: expected the Bearer scheme, 'Bearer <API key>'")
    token = token.strip()
    if not token:
        raise AuthError("unauthenticated", "malformed", "authorization: the bearer token is empty")
    if not TOKEN_RE.fullmatch(token):
        raise AuthError("unauthenticated", "malformed",
                        "authorization: malformed bearer token (1 to 4096 visible ASCII characters, no spaces)")
    return token


class KeyStore:
    """The keys of the key file, reloaded when the file changes (checked at most every
    `reload_s` seconds, on the call path: one stat). A file that fails to load on a
    reload is logged and the keys in force stay."""

    def __init__(self, options: AuthOptions, on_reload=None):
        self.options = options
        self.path = Path(options.keys_file)
        self.on_reload = on_reload  # called with the new keys, and with "ok" or "error"
        self.keys = load_keys(self.path)
        self.stamp = self._stamp()
        self.checked = time.monotonic()

    def _stamp(self):
        try:
            st = self.path.stat()
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return None

    def maybe_reload(self, now: float | None = None) -> None:
        if self.options.reload_s <= 0:
            return
        now = time.monotonic() if now is None else now
        if now - self.checked < self.options.reload_s:
            return
        self.checked = now
        self.reload()

    def reload(self) -> bool:
        stamp = self._stamp()
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            keys = load_keys(self.path)
        except Exception as e:  # KeyFileError, or anything else a bad file brings: the keys in force stay
            log.error("key file not reloaded, the %d keys in force stay: %s", len(self.keys), e)
            if self.on_reload:
                self.on_reload(None, "error")
            return False
        self.keys = keys
        log.info("key file %s reloaded: %d keys", self.path, len(keys))
        if self.on_reload:
            self.on_reload(keys, "ok")
        return True

    def authenticate(self, metadata, now: dt.datetime | None = None) -> ApiKey:
        token = bearer_token(metadata)
        key = self.keys.get(hash_secret(token))
        if key is None:
            raise AuthError("unauthenticated", "unknown", "authorization: unknown API key")
        if key.expires is not None and (now or dt.datetime.now(dt.timezone.utc)) >= key.expires:
            raise AuthError("unauthenticated", "expired",
                            f"authorization: API key {key.name!r} expired at {key.expires:%Y-%m-%dT%H:%M:%SZ}")
        return key
