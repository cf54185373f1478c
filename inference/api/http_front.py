"""The HTTP front: OpenAI's API over aiohttp, one more translation onto the serving layer.

    POST /v1/chat/completions   a chat, answered whole or streamed as server-sent events
    POST /v1/completions        a prompt, the same
    GET  /v1/models             the models loaded here (and /v1/models/{model})
    GET  /health                open, for probes

Each completion request becomes `n` GenerateRequests on `Serving` (the same routing,
versions, shadow copies, flags, events, log lines, spans and metrics as the gRPC
services'), its outcome the response. Keys and limits are the gRPC port's own
(`EdgeInterceptor.admit`: the same key file, the same buckets per key). Errors take
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the matching
status: 400 bad input (the field in `param` and first in the message), 401 no or bad
key, 404 an unknown model, 429 over a key's limit (with Retry-After), 503 a full queue.

A field this server cannot honour is refused, naming it, wherever ignoring it would
change the answer (top_logprobs above 0, tools, penalties, logit_bias, a response
format other than text, ...); a field that does not change the answer (metadata,
store, service_tier, ...) is accepted and ignored. Vigil's own fields, which OpenAI
clients send through `extra_body`: `version` (pin a version), `top_k`, `ignore_eos`,
`attributes` (for feature-flag rules). `user` is the routing key: the same user stays
on the same version while the weights stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from eventbus.ports import cannot_listen
from inference.api.errors import InvalidArgument, NotFound, Overloaded, ServingError, shown
from inference.api.requests import Call, Chunk, GenerateRequest, Generated, Served
from inference.api.serving import Serving
from eventbus.apikeys import AuthError
from inference.edge.ratelimit import CALLER, Refused
from inference.runtime.sampling import SamplingParams

log = logging.getLogger(__name__)

CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
METHODS = {CHAT: "openai.chat.completions", COMPLETIONS: "openai.completions"}  # the events' method
MAX_N = 8                     # choices per request
MAX_BODY_BYTES = 1 << 20      # a request's JSON; larger is 413
WRITE_STALL_S = 60.0          # a streamed reader that takes no bytes for this long is cut off
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# accepted and ignored: they change nothing in the answer
IGNORED = frozenset({"metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                     "safety_identifier"})
# accepted only at the value that asks for nothing (null always is): anything else would change the answer
NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},),
           "response_format": ({"type": "text"},), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
           "function_call": ("none",), "modalities": (["text"],), "best_of": (1,), "echo": (False,),
           "suffix": ("",)}
COMMON = {"model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "seed", "stop", "user",
          "version", "top_k", "ignore_eos", "attributes"}
FIELDS = {CHAT: COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"},
          COMPLETIONS: COMMON | {"prompt", "logprobs"}}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
FINISH = {"stop": "stop", "length": "length", "cancelled": "abort"}


class HttpError(Exception):
    """A refusal in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def response(self) -> web.Response:
        return error_response(self.status, str(self), self.kind, self.param, self.code, self.headers)


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status, headers=headers)


# the serving layer names fields as the gRPC messages do; the HTTP names of the same fields
RENAMES = (("sampling.", ""), ("chat.messages", "messages"), ("chat", "messages"), ("routing_key", "user"),
           ("request_id", "x-request-id"))


def http_error(exc: Exception, renames: dict[str, str] | None = None) -> HttpError:
    """A serving error as the HTTP refusal it maps to."""
    if isinstance(exc, InvalidArgument):
        name, sep, rest = str(exc).partition(": ")
        if not sep:
            return HttpError(400, str(exc), "invalid_request_error")
        for old, new in RENAMES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        name = (renames or {}).get(name, name)
        return HttpError(400, f"{name}: {rest}", "invalid_request_error", param=name)
    if isinstance(exc, NotFound):  # "model: ..." or "version: ..."
        name = str(exc).partition(":")[0]
        return HttpError(404, str(exc), "invalid_request_error", param=name if name in ("model", "version") else None,
                         code="model_not_found")
    if isinstance(exc, Overloaded):  # the version's queue is full
        return HttpError(503, f"server overloaded: {exc}", "server_error", code="overloaded",
                         headers={"Retry-After": "1"})
    return HttpError(500, f"internal error: {exc}", "server_error")


# -- reading a request's fields ---------------------------------------------------------------


def typed(body: dict, name: str, kinds: tuple, what: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InvalidArgument(f"{name}: expected {what}, got {shown(value)}")
    return value


def integer(body: dict, name: str, default=None):
    return typed(body, name, (int,), "an integer", default)


def number(body: dict, name: str, default=None):
    value = typed(body, name, (int, float), "a number", default)
    if value is not None and not math.isfinite(value):
        raise InvalidArgument(f"{name}: {value} is not finite")
    return value


def text(value, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name}: expected a string, got {shown(value)}")
    return value


def check_fields(body: dict, known: set[str]) -> None:
    for name, value in body.items():
        if name in known or name in IGNORED or value is None:
            continue
        if name in NEUTRAL:
            if any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in NEUTRAL[name]):
                continue
            raise InvalidArgument(f"{name}: {shown(value)} is not supported by this server (only "
                                  f"{' or '.join(json.dumps(v) for v in NEUTRAL[name])}, or leave it out)")
        raise InvalidArgument(f"{name}: unknown or unsupported field")


def messages_of(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidArgument("messages: missing")
    if not isinstance(messages, list):
        raise InvalidArgument(f"messages: expected a list of messages, got {shown(messages)}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidArgument(f"{where}: expected an object with role and content, got {shown(m)}")
        for key, value in m.items():
            if key not in ("role", "content", "name") and value is not None:
                raise InvalidArgument(f"{where}.{key}: not supported by this server")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidArgument(f"{where}.role: {shown(role)} is not one of {', '.join(ROLES)}")
        out.append({"role": ROLES[role], "content": content_of(m.get("content"), f"{where}.content")})
    return out


def content_of(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidArgument(f"{where}: expected a string or a list of text parts, got {shown(content)}")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else part
            raise InvalidArgument(f"{where}[{j}].type: {shown(kind)} is not supported (text parts only)")
        parts.append(text(part.get("text"), f"{where}[{j}].text"))
    return "".join(parts)


def prompt_of(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise InvalidArgument("prompt: missing")
    if isinstance(prompt, list):
        raise InvalidArgument("prompt: one prompt, as text, per request (lists of prompts and token ids "
                              "are not supported)")
    return text(prompt, "prompt")


@dataclass
class Ask:
    """What a completion request asks for, read from its body."""
    requests: list[GenerateRequest]
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    renames: dict[str, str] = field(default_factory=dict)  # serving's field names -> this request's


def sampling_of(body: dict, path: str, default_max_tokens: int, ask: Ask) -> SamplingParams:
    max_tokens = integer(body, "max_tokens")
    if path == CHAT:
        newer = integer(body, "max_completion_tokens")
        if newer is not None and max_tokens is not None and newer != max_tokens:
            raise InvalidArgument(f"max_completion_tokens: {newer} differs from max_tokens {max_tokens}; send one")
        if newer is not None:
            max_tokens = newer
            ask.renames["max_tokens"] = "max_completion_tokens"
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidArgument(f"stop: expected a string or a list of strings, got {shown(stop)}")
    return SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=float(number(body, "temperature", 1.0)),  # OpenAI's default: sampled, not greedy
        top_p=float(number(body, "top_p", 1.0)), top_k=integer(body, "top_k", 0), seed=integer(body, "seed"),
        stop=tuple(stop or ()), ignore_eos=typed(body, "ignore_eos", (bool,), "true or false", False))


def read_ask(body, path: str, call: Call, default_max_tokens: int) -> Ask:
    """The body as `n` GenerateRequests (InvalidArgument names the field at fault)."""
    if not isinstance(body, dict):
        raise InvalidArgument(f"body: expected a JSON object, got {shown(body)}")
    check_fields(body, FIELDS[path])
    ask = Ask([])
    ask.stream = typed(body, "stream", (bool,), "true or false", False)
    options = typed(body, "stream_options", (dict,), "an object", None)
    if options is not None:
        if not ask.stream:
            raise InvalidArgument("stream_options: only allowed when stream is true")
        unknown = set(options) - {"include_usage"}
        if unknown:
            raise InvalidArgument(f"stream_options.{sorted(unknown)[0]}: unknown or unsupported field")
        ask.include_usage = typed(options, "include_usage", (bool,), "true or false", False)
    n = integer(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise InvalidArgument(f"n: {n} is outside [1, {MAX_N}]")
    if path == CHAT:
        ask.logprobs = typed(body, "logprobs", (bool,), "true or false", False)
        top = integer(body, "top_logprobs", 0)
        if top:
            raise InvalidArgument(f"top_logprobs: {top} alternatives asked for; this server gives the log-probability "
                                  "of each chosen token only (logprobs: true, top_logprobs 0 or left out)")
        fields = {"messages": messages_of(body), "input_field": "chat"}
    else:
        logprobs = integer(body, "logprobs")
        if logprobs:
            raise InvalidArgument(f"logprobs: {logprobs} alternatives asked for; this server gives the "
                                  "log-probability of each chosen token only (logprobs: 0)")
        ask.logprobs = logprobs == 0
        fields = {"prompt": prompt_of(body), "input_field": "prompt"}
    model = text(body.get("model"), "model") if body.get("model") is not None else ""
    attributes = typed(body, "attributes", (dict,), "an object of strings", {})
    for name, value in attributes.items():
        text(value, f"attributes.{name}")
    params = sampling_of(body, path, default_max_tokens, ask)
    version = text(body.get("version") or "", "version")
    user = text(body.get("user") or "", "user")
    for i in range(n):
        sampling = params
        if n > 1 and params.seed is not None:  # n draws from one seed: the same seed n times is one answer n times
            sampling = SamplingParams(**{**params.__dict__, "seed": (params.seed + i) % 2**63})
        request_id = f"{call.request_id}-{i}" if n > 1 else call.request_id
        ask.requests.append(GenerateRequest(
            Call(call.method, request_id, call.id_field, call.metadata, protocol="http"), model=model,
            version=version, routing_key=user, attributes=dict(attributes), sampling=sampling,
            attribute_field="attributes.{}", **fields))
    return ask


# -- the front ------------------------------------------------------------------------------


class HttpFront:
    def __init__(self, serving: Serving, edge=None, write_stall_s: float = WRITE_STALL_S, shutdown_s: float = 5.0):
        """edge: the server's EdgeInterceptor where keys are checked (None: every call is served).
        shutdown_s: how long `stop` lets the requests in flight finish."""
        self.serving = serving
        self.edge = edge
        self.write_stall_s = write_stall_s
        self.shutdown_s = shutdown_s
        self.runner: web.AppRunner | None = None
        self.sock: socket.socket | None = None
        self.port = 0
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self.errors])
        self.app.router.add_post(CHAT, self.complete)
        self.app.router.add_post(COMPLETIONS, self.complete)
        self.app.router.add_get(MODELS, self.models)
        self.app.router.add_get(MODELS + "/{model}", self.models)
        self.app.router.add_get("/health", self.health)

    def bind(self, host: str, port: int) -> int:
        """Take host:port (0: any free port) before anything is served, so that a busy port
        stops start-up at once (PortError); returns the port. Connections wait in the
        backlog until `serve`."""
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            self.sock = socket.create_server((host, port), family=family, backlog=256)
        except OSError as e:
            raise cannot_listen("HTTP", host, port, e) from e
        self.port = self.sock.getsockname()[1]
        return self.port

    async def serve(self, tls=None) -> None:
        """Answer on the bound port. tls: the gRPC port's TlsOptions, served here too when enabled."""
        # handler_cancellation: a client that goes away cancels its handler, hence its generation
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                    shutdown_timeout=self.shutdown_s)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock,
                           ssl_context=ssl_context(tls) if tls is not None and tls.enabled else None).start()

    async def start(self, host: str, port: int, tls=None) -> int:
        self.bind(host, port)
        await self.serve(tls)
        return self.port

    async def stop(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()
        elif self.sock is not None:  # bound, never served
            self.sock.close()
        self.sock = None

    # -- the edge ---------------------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except HttpError as e:
            return e.response()
        except web.HTTPException as e:  # no such path, method not allowed, body too large
            if e.status < 400:
                raise
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            return error_response(e.status, f"{request.method} {request.path}: {e.reason}", kind,
                                  headers={k: v for k, v in e.headers.items() if k.lower() == "allow"})

    def admit(self, request: web.Request):
        """The request's key, admitted by its limits (None without keys); or the refusal."""
        if self.edge is None:
            return None
        metadata = [(k.lower(), v) for k, v in request.headers.items()]
        try:
            caller = self.edge.admit(metadata, MODELS if request.path.startswith(MODELS + "/") else request.path)
        except AuthError as e:
            if e.code == "permission_denied":
                raise HttpError(403, str(e), "permission_denied") from None
            raise HttpError(401, str(e), "invalid_request_error", code="invalid_api_key",
                            headers={"WWW-Authenticate": 'Bearer realm="vigil"'}) from None
        except Refused as r:
            raise HttpError(429, str(r), "tokens" if r.limit == "tokens_per_minute" else "requests",
                            code="rate_limit_exceeded",
                            headers={"Retry-After": str(max(1, math.ceil(r.retry_after))),
                                     "retry-after-ms": str(r.retry_after_ms)}) from None
        CALLER.set(caller)  # the serving layer records the tenant and charges the tokens to it
        return caller

    def release(self, caller) -> None:
        if caller is not None:
            self.edge.release(caller)

    # -- the endpoints ------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        caller = self.admit(request)
        try:
            router = self.serving.router
            wanted = request.match_info.get("model")
            found = {}
            for mv in router.all():
                if wanted is None or mv.model == wanted:
                    found[mv.model] = min(found.get(mv.model, mv.loaded_at), mv.loaded_at)
            if wanted is not None and not found:
                raise http_error(NotFound(f"model: {shown(wanted)} is not loaded"))
            data = [{"id": m, "object": "model", "created": int(t), "owned_by": "vigil"} for m, t in found.items()]
            return web.json_response(data[0] if wanted is not None else {"object": "list", "data": data})
        finally:
            self.release(caller)

    async def complete(self, request: web.Request) -> web.StreamResponse:
        caller = self.admit(request)
        try:
            return await self.completion(request)
        finally:
            self.release(caller)

    async def completion(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        metadata = {k.lower(): v for k, v in request.headers.items()}
        call = Call(METHODS[path], metadata.get("x-request-id", "") or uuid.uuid4().hex, "x-request-id", metadata,
                    protocol="http")
        body = None
        try:
            try:
                body = await request.json(loads=json.loads)
            except (ValueError, UnicodeDecodeError) as e:
                raise InvalidArgument(f"body: not valid JSON ({e})") from None
            ask = read_ask(body, path, call, self.serving.limits.default_max_tokens)
        except InvalidArgument as invalid:  # recorded as one event like any other bad request, then refused
            model = body.get("model") if isinstance(body, dict) else None
            try:
                await self.serving.generate(GenerateRequest(call, model=model if isinstance(model, str) else "",
                                                            invalid=invalid))
            except ServingError as exc:
                raise http_error(exc) from None
            raise http_error(invalid) from None  # not reached: the serving layer raises it
        try:
            if ask.stream:
                return await self.streamed(request, path, call, ask)
            return await self.whole(path, call, ask)
        except (ServingError, RuntimeError, ValueError) as exc:
            raise http_error(exc, ask.renames) from None

    async def whole(self, path: str, call: Call, ask: Ask) -> web.Response:
        tasks = [asyncio.ensure_future(self.serving.generate(r)) for r in ask.requests]
        try:
            results: list[Generated] = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()  # the others, once one failed (or the client left)
            await asyncio.gather(*tasks, return_exceptions=True)
        served = results[0].served
        choices = [self.choice(path, i, g, ask.logprobs) for i, g in enumerate(results)]
        body = {"id": response_id(path, call.request_id), "object": "chat.completion" if path == CHAT else
                "text_completion", "created": int(time.time()), "model": served.model,
                "system_fingerprint": f"{served.model}-{served.version}", "choices": choices,
                "usage": usage(results)}
        return web.json_response(body, headers=served_headers(call, served), dumps=compact)

    def choice(self, path: str, index: int, g: Generated, logprobs: bool) -> dict:
        f = g.finished
        lp = self.logprobs(path, g.served, f.token_ids, f.logprobs) if logprobs else None
        if path == CHAT:
            return {"index": index, "message": {"role": "assistant", "content": f.text}, "logprobs": lp,
                    "finish_reason": FINISH.get(f.finish_reason, f.finish_reason)}
        return {"index": index, "text": f.text, "logprobs": lp, "finish_reason": FINISH.get(f.finish_reason,
                                                                                          f.finish_reason)}

    def logprobs(self, path: str, served: Served, ids: list[int], logprobs: list[float], offset: int = 0) -> dict:
        """OpenAI's logprobs object for the chosen tokens (no alternatives)."""
        try:
            tokenizer = self.serving.router.get(served.model, served.version).tokenizer
            tokens = [tokenizer.decode([i], skip_special=False) for i in ids]
        except NotFound:  # the version was unloaded since
            tokens = [str(i) for i in ids]
        if path == CHAT:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                                for t, lp in zip(tokens, logprobs)], "refusal": None}
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    async def streamed(self, request: web.Request, path: str, call: Call, ask: Ask) -> web.StreamResponse:
        """Server-sent events: one per chunk of text, one per choice that ends, the usage
        when asked, then `data: [DONE]`. Nothing is sent before the first chunk, so a
        request refused by the serving layer still gets its status. Each event is
        written, and drained into the socket's buffer, before the next is read."""
        streams = [self.serving.stream(r) for r in ask.requests]
        out = EventStream(request, path, call, ask, self.write_stall_s)
        results: list[Generated | None] = [None] * len(streams)
        offsets = [0] * len(streams)
        try:
            async with contextlib.aclosing(merged(streams)) as updates:
                async for i, update in updates:
                    await out.open(update.served, len(streams))
                    if isinstance(update, Generated):
                        results[i] = update
                        reason = FINISH.get(update.finished.finish_reason, update.finished.finish_reason)
                        await out.send(i, "", None, reason)
                    elif update.text or (ask.logprobs and update.token_ids):
                        lp = (self.logprobs(path, update.served, update.token_ids, update.logprobs, offsets[i])
                              if ask.logprobs else None)
                        offsets[i] += len(update.text)
                        await out.send(i, update.text, lp)
            if ask.include_usage:
                await out.write({**out.head(), "choices": [], "usage": usage(results)})
            await out.write(None)
            await out.response.write_eof()
        except ReaderGone:
            pass
        except (ServingError, RuntimeError, ValueError) as exc:
            if out.response is None:  # nothing sent yet: the refusal's own status
                raise
            e = http_error(exc, ask.renames)  # a failure mid-stream: said in-band, and no [DONE]
            with contextlib.suppress(ReaderGone):
                await out.write({"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}})
        return out.response


class ReaderGone(Exception):
    """The reader of a stream left, or took nothing for too long."""


class EventStream:
    """A streamed response's events, in OpenAI's chunk shape."""

    def __init__(self, request: web.Request, path: str, call: Call, ask: Ask, stall_s: float):
        self.request, self.path, self.call, self.ask, self.stall_s = request, path, call, ask, stall_s
        self.response: web.StreamResponse | None = None
        self.served: Served | None = None
        self.id, self.created = response_id(path, call.request_id), int(time.time())
        self.kind = "chat.completion.chunk" if path == CHAT else "text_completion"

    async def open(self, served: Served, n: int) -> None:
        """The headers, at the first update; a chat's first events give each choice its role."""
        if self.response is not None:
            return
        self.served = served
        self.response = web.StreamResponse(headers={**SSE_HEADERS, **served_headers(self.call, served)})
        await self.response.prepare(self.request)
        if self.path == CHAT:
            for i in range(n):
                await self.write({**self.head(), "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]})

    def head(self) -> dict:
        s = self.served
        return {"id": self.id, "object": self.kind, "created": self.created, "model": s.model,
                "system_fingerprint": f"{s.model}-{s.version}"}

    async def send(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None = None) -> None:
        if self.path == CHAT:
            choice = {"index": index, "delta": {"content": text} if text or finish_reason is None else {},
                      "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        event = {**self.head(), "choices": [choice]}
        if self.ask.include_usage:
            event["usage"] = None
        await self.write(event)

    async def write(self, event: dict | None) -> None:
        """One server-sent event (None: `[DONE]`), once the socket's buffer has room for it."""
        data = b"data: [DONE]\n\n" if event is None else b"data: " + compact(event).encode() + b"\n\n"
        transport = self.request.transport
        try:
            if transport is not None and transport.get_write_buffer_size() == 0:
                await self.response.write(data)  # the socket took all before: no wait, no timer
            else:
                async with asyncio.timeout(self.stall_s):  # waits while the reader is behind
                    await self.response.write(data)
        except (ConnectionError, asyncio.TimeoutError) as e:
            stalled = isinstance(e, asyncio.TimeoutError)
            log.info("%s: the reader %s; its generation is stopped", self.call.request_id,
                     f"took nothing for {self.stall_s:g} s" if stalled else "left")
            if transport is not None:
                transport.close()
            raise ReaderGone() from None


def ssl_context(tls) -> ssl.SSLContext:
    """The gRPC port's certificate, key and client CA, for the HTTP port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def response_id(path: str, request_id: str) -> str:
    return ("chatcmpl-" if path == CHAT else "cmpl-") + request_id


def served_headers(call: Call, served: Served) -> dict[str, str]:
    return {"x-request-id": call.request_id, "x-vigil-model-version": served.version}


def usage(results) -> dict:
    prompt = results[0].finished.prompt_tokens if results else 0
    completion = sum(g.finished.completion_tokens for g in results if g is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def merged(streams: list) -> AsyncIterator[tuple[int, Chunk | Generated]]:
    """(index, update) of several streams as each comes, at most one update of each read
    ahead; leaving early, or one stream failing, closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for update in only:
                yield 0, update
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                try:
                    update = task.result()
                except StopAsyncIteration:
                    continue
                yield i, update
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()
