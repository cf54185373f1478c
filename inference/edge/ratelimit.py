"""Per-key limits: token buckets for requests per second and tokens per minute, and a cap
on the calls a key has in flight.

- Requests: a bucket of `burst` requests refilled at `requests_per_second`; each request
  takes one (a unary or server-streaming call when it opens, each message of a request
  stream, ModelStreamInfer, as it arrives).
- Tokens: a bucket of one minute's tokens refilled at `tokens_per_minute / 60` per second.
  A request is let in while the bucket is above zero and pays its prompt and completion
  tokens when it ends, so the bucket may go below zero; the key waits until it refills.
- Streams: calls in flight at once (each gRPC call is an HTTP/2 stream, unary or not).

A refused request gets RESOURCE_EXHAUSTED at once, with `retry-after-ms` in the trailing
metadata (in a ModelStreamInfer stream, in-band, with the time in the message). Other
keys are not touched: each key has its own buckets.

The interceptor (inference/edge/interceptor.py) puts the call's `Caller` in a context variable; the
serving layer reads it to record the tenant, to refuse a stream message, and to pay the
tokens of a request that ran.
"""

from __future__ import annotations

import contextvars
import math
import time
from dataclasses import dataclass, field

from eventbus.apikeys import ApiKey, KeyLimits

STREAM_RETRY_MS = 500  # the retry hint for a key at its stream cap: no time says when a call ends


class TokenBucket:
    def __init__(self, rate: float, capacity: float, now: float | None = None):
        if rate <= 0 or capacity <= 0:
            raise ValueError(f"a token bucket needs a rate and a capacity above 0, got {rate} and {capacity}")
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.stamp = time.monotonic() if now is None else now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.level

    def wait(self, need: float, now: float) -> float:
        """Seconds until the level reaches `need` (0 if it is there now)."""
        level = self.refill(now)
        return 0.0 if level >= need else (need - level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def reconfigure(self, rate: float, capacity: float, now: float) -> None:
        self.refill(now)
        self.rate, self.capacity = rate, capacity
        self.level = min(self.level, capacity)


@dataclass
class Refused(Exception):
    """Over a limit: `limit` names it (requests_per_second, tokens_per_minute,
    max_streams), `retry_after` is in seconds."""
    key: str
    limit: str
    retry_after: float
    detail: str

    def __str__(self) -> str:
        return (f"rate limit: API key {self.key!r} is over its {self.detail}; "
                f"retry after {self.retry_after_ms} ms")

    @property
    def retry_after_ms(self) -> int:
        return max(1, math.ceil(self.retry_after * 1000))


class KeyState:
    """The buckets and stream count of one key (kept across key file reloads, by name)."""

    def __init__(self, key: ApiKey, now: float):
        self.key = key
        self.requests: TokenBucket | None = None
        self.tokens: TokenBucket | None = None
        self.streams = 0
        self.configure(key, now)

    def configure(self, key: ApiKey, now: float) -> None:
        self.key = key
        lim: KeyLimits = key.limits
        self.requests = _bucket(self.requests, lim.requests_per_second, lim.request_burst, now)
        self.tokens = _bucket(self.tokens, lim.tokens_per_minute / 60.0 if lim.tokens_per_minute else None,
                              lim.tokens_per_minute, now)

    def check_request(self, now: float) -> None:
        """Take one request, or raise Refused without taking anything."""
        lim = self.key.limits
        refusals = []
        if self.requests is not None and (w := self.requests.wait(1.0, now)) > 0:
            refusals.append(Refused(self.key.name, "requests_per_second", w,
                                    f"{_num(lim.requests_per_second)} requests per second"))
        if self.tokens is not None and (w := self.tokens.wait(1e-9, now)) > 0:
            refusals.append(Refused(self.key.name, "tokens_per_minute", w,
                                    f"{_num(lim.tokens_per_minute)} tokens per minute"))
        if refusals:
            raise max(refusals, key=lambda r: r.retry_after)
        if self.requests is not None:
            self.requests.take(1.0, now)

    def check_stream(self) -> None:
        """Raise Refused if the key has all the calls in flight it may have."""
        cap = self.key.limits.max_streams
        if cap is not None and self.streams >= cap:
            raise Refused(self.key.name, "max_streams", STREAM_RETRY_MS / 1000, f"{cap} calls in flight")

    def open_stream(self) -> None:
        self.check_stream()
        self.streams += 1

    def close_stream(self) -> None:
        self.streams = max(0, self.streams - 1)

    def pay_tokens(self, tokens: int, now: float) -> None:
        if self.tokens is not None and tokens > 0:
            self.tokens.take(tokens, now)


def _bucket(old: TokenBucket | None, rate: float | None, capacity: float | None, now: float):
    if not rate or not capacity:
        return None
    if old is None:
        return TokenBucket(rate, capacity, now)
    old.reconfigure(rate, capacity, now)
    return old


def _num(x: float | None) -> str:
    return f"{x:g}" if x is not None else "?"


class Limiter:
    """Every key's state, by key name. Not thread-safe: used from the server's event loop."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.states: dict[str, KeyState] = {}

    def state(self, key: ApiKey) -> KeyState:
        s = self.states.get(key.name)
        if s is None:
            s = self.states[key.name] = KeyState(key, self.clock())
        elif s.key is not key:
            s.configure(key, self.clock())  # the key file was reloaded
        return s

    def update(self, keys) -> None:
        """New limits after a key file reload; the state of removed keys is dropped
        (their calls in flight finish with the state they hold)."""
        names = {k.name: k for k in keys}
        now = self.clock()
        for name in list(self.states):
            if name not in names:
                del self.states[name]
            else:
                self.states[name].configure(names[name], now)


@dataclass
class Caller:
    """The key behind the call being served (a context variable carries it)."""
    key: ApiKey
    state: KeyState
    limiter: Limiter
    metrics: object = None  # EdgeMetrics
    streams_open: bool = field(default=False)

    @property
    def tenant(self) -> str:
        return self.key.tenant

    def admit(self) -> None:
        """One more request of this call (a message of a request stream)."""
        try:
            self.state.check_request(self.limiter.clock())
        except Refused as r:
            if self.metrics is not None:
                self.metrics.refused(self.key, r.limit)
            raise
        if self.metrics is not None:
            self.metrics.admitted(self.key)

    def pay(self, tokens: int) -> None:
        self.state.pay_tokens(tokens, self.limiter.clock())
        if self.metrics is not None and tokens > 0:
            self.metrics.tokens(self.key, tokens)


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("vigil_caller", default=None)
# set for one message of a request stream that its key may not send now
REFUSAL: contextvars.ContextVar[Refused | None] = contextvars.ContextVar("vigil_refusal", default=None)


def current_caller() -> Caller | None:
    return CALLER.get()


def current_refusal() -> Refused | None:
    """The refusal of the stream message being served, if its key may not send it now."""
    return REFUSAL.get()


def tokens_used(out) -> int:
    """Prompt and completion tokens a request made the server work on (the serving
    layer's RequestRecord); nothing for a request refused before it ran."""
    if out.shadow_of or out.status in ("invalid_argument", "not_found", "resource_exhausted"):
        return 0
    f = out.finished
    return out.prompt_tokens + (f.completion_tokens if f is not None else 0)
