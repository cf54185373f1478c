"""The serving pipeline, one entry point per kind of request: `generate` (one answer),
`stream` (chunks, then the answer), `classify` and `feedback`. Each validates the
request, routes it to a model version, runs it on that version's engine (and a copy
on each shadow version), and records exactly one event, one log line, one span and
one set of metrics for it, whatever its outcome. Failures are raised as `errors`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import hashlib
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from eventbus import temperature, topics
from inference.api.errors import Failed, InvalidArgument, NotFound, Overloaded, ServingError, shown
from inference.api.events import FEEDBACK_TOPIC, INFERENCE_TOPIC, EventSink, TokenHasher
from inference.api.limits import Limits, check_chars
from inference.api.requests import (Call, Chunk, Classified, ClassifyRequest, FeedbackRequest, GenerateRequest,
                                    Generated, LabelScore, ModelRequest, Served)
from inference.api.router import ModelVersion, Router
from inference.edge import ratelimit
from inference.edge.requestlog import log_request
from inference.edge.tracing import Tracing
from inference.runtime.engine import Busy, Finished, Job, Scored, TextChunk, Timing
from inference.runtime.sampling import SamplingParams


@dataclass
class RequestRecord:
    """What a request's event is made of; filled in as the request goes."""
    method: str
    request_id: str
    protocol: str = "grpc"
    model: str = ""
    version: str = ""
    route: str = ""
    tenant: str = ""
    trace_id: str = ""
    flags: list[str] = field(default_factory=list)
    shadow_of: str = ""
    status: str = "ok"
    error: str = ""
    prompt_chars: int = 0
    prompt_sha256: str = ""
    prompt_text: str = ""
    finished: Finished | None = None
    scores: dict[str, float] | None = None
    prompt_tokens: int = 0
    timing: Timing = field(default_factory=Timing)
    started: float = field(default_factory=time.monotonic)
    submitted: float = 0.0  # monotonic time the engine took the job (its arrival); 0: never
    span: object = None     # inference.edge.tracing.RequestSpan while traced

    def served(self) -> Served:
        return Served(self.request_id, self.model, self.version, tuple(self.flags))


class Serving:
    def __init__(self, router: Router, sink: EventSink, metrics, limits: Limits = Limits(),
                 source: str = "vigil-inference", include_text: bool = False,
                 tracing: Tracing | None = None, log_text: bool = False, token_key: bytes = b""):
        """include_text: events carry the prompt and completion themselves, not only
        their SHA-256 and length. tracing: spans per request (inference.edge.tracing; off
        when None). log_text: the per-request log line carries prompt and completion.
        token_key: the key of the completion token hashes in events (events.TokenHasher)."""
        self.router = router
        self.sink = sink
        self.metrics = metrics
        self.include_text = include_text
        self.token_hashes = TokenHasher(token_key)
        self.tracing = tracing if tracing is not None else Tracing()
        self.log_text = log_text
        if limits.default_max_tokens > limits.max_tokens:  # the default must itself be allowed
            limits = dataclasses.replace(limits, default_max_tokens=limits.max_tokens)
        self.limits = limits
        self.source = source
        self.served_by: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self.shadow_tasks: set[asyncio.Task] = set()

    # -- the entry points ----------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> Generated:
        with self.track(request.call, request.invalid) as out:
            mv, ids, params = self.start_generation(out, request)
            return Generated(out.served(), await self.complete(out, mv, ids, params))

    async def stream(self, request: GenerateRequest) -> AsyncIterator[Chunk | Generated]:
        """Chunks of text as they come, then the Generated. Leaving early cancels the generation."""
        with self.track(request.call, request.invalid) as out:
            mv, ids, params = self.start_generation(out, request)
            served = out.served()
            async with contextlib.aclosing(self.run(out, mv, ids, params, chunks=True)) as updates:
                async for update in updates:
                    if isinstance(update, TextChunk):
                        yield Chunk(served, update.text, update.token_ids, update.logprobs)
                    else:
                        yield Generated(served, update)

    async def classify(self, request: ClassifyRequest) -> Classified:
        with self.track(request.call, request.invalid) as out:
            mv, ids = self.start(out, request)
            labels = list(request.labels)
            scores = await self.score(out, mv, ids, labels)
            self.shadow(out, request, lambda copy, smv, sids: self.score(copy, smv, sids, labels))
            return Classified(out.served(), scores, out.prompt_tokens, out.timing)

    def feedback(self, request: FeedbackRequest) -> str:
        """Publishes the feedback event; returns its feedback_id."""
        r, lim = request, self.limits
        if not r.request_id:
            raise InvalidArgument("request_id: is empty")
        if r.label is None and r.score is None:
            raise InvalidArgument("truth: neither label nor score is set")
        if r.score is not None and not math.isfinite(r.score):
            raise InvalidArgument(f"score: {r.score} is not finite")
        if r.label is not None and not r.label:
            raise InvalidArgument("label: is empty")
        check_chars("request_id", r.request_id, lim.max_id_chars)
        check_chars("model", r.model, lim.max_name_chars)
        check_chars("version", r.version, lim.max_name_chars)
        check_chars("label", r.label or "", lim.max_label_chars)
        check_chars("comment", r.comment, lim.max_comment_chars)
        model, version = r.model, r.version
        served = self.served_by.get(r.request_id)
        if not model:
            if served is None:
                raise InvalidArgument("model: is empty and request_id is not one this server remembers")
            model = served[0]
        if model not in self.router.versions and served is None:
            raise NotFound(f"model: {shown(model)} is not loaded")
        if not version and served is not None and served[0] == model:
            version = served[1]
        feedback_id = str(uuid.uuid4())
        self.sink.publish(FEEDBACK_TOPIC, topics.event_key(model), {
            "feedback_id": feedback_id, "request_id": r.request_id, "model": model, "version": version,
            "label": r.label, "score": r.score, "comment": r.comment, "time": time.time(), "source": self.source,
        })
        return feedback_id

    # -- a request's life ------------------------------------------------------------------

    @contextlib.contextmanager
    def track(self, call: Call, invalid: InvalidArgument | None = None):
        """Yields the request's record; on exit, records its event and metrics. `invalid`:
        the front could not translate the request's message; recorded, then raised."""
        refusal = ratelimit.current_refusal()  # a stream message over its key's limit: refused before it counts
        if refusal is not None:
            raise Overloaded(str(refusal))
        caller = ratelimit.current_caller()  # the API key behind the call, where keys are checked
        fits = len(call.request_id) <= self.limits.max_id_chars  # one too long is not recorded, a UUID is
        out = RequestRecord(call.method, (call.request_id if fits else "") or str(uuid.uuid4()), call.protocol)
        if caller is not None:
            out.tenant = caller.tenant
        self.tracing.begin(out, call.metadata)  # the request's span; out.trace_id
        try:
            check_chars(call.id_field, call.request_id, self.limits.max_id_chars)
            if invalid is not None:
                raise invalid
            yield out
        except ServingError as exc:
            out.status, out.error = exc.status, str(exc)
            raise
        except asyncio.CancelledError:
            out.status = self.gone(call)
            raise
        except GeneratorExit:
            # a stream closed at a `yield`: grpc.aio closes a streaming handler when the
            # client cancels or its deadline passes while a message is being sent
            if out.finished is None:
                out.status = self.gone(call)
            raise
        except Exception as exc:
            out.status, out.error = "internal", str(exc)
            raise
        finally:
            self.record(out)
            if caller is not None:
                caller.pay(ratelimit.tokens_used(out))  # the key's tokens-per-minute bucket

    DEADLINE_SLACK = 0.1  # seconds

    def gone(self, call: Call) -> str:
        """Why a call ended early: "deadline_exceeded" or "cancelled". The client's own
        deadline timer fires (and cancels the call) a moment before the server's copy of
        the deadline passes, so a call cancelled within DEADLINE_SLACK of it counts as expired."""
        if call.deadline is not None and call.deadline - time.monotonic() <= self.DEADLINE_SLACK:
            return "deadline_exceeded"
        return "cancelled"

    def start(self, out: RequestRecord, request: ModelRequest) -> tuple[ModelVersion, list[int]]:
        """Route the request and tokenize its input."""
        mv = self.route(out, request)
        return mv, self.prompt_ids(out, mv, request)

    def start_generation(self, out: RequestRecord, request: GenerateRequest):
        mv, ids = self.start(out, request)
        params = self.checked_sampling(request.sampling)
        self.shadow(out, request, lambda copy, smv, sids: self.complete(copy, smv, sids, params))
        return mv, ids, params

    def route(self, out: RequestRecord, request: ModelRequest) -> ModelVersion:
        r, lim = request, self.limits
        if not r.model:
            raise InvalidArgument("model: is empty")
        check_chars("model", r.model, lim.max_name_chars)
        check_chars("version", r.version, lim.max_name_chars)
        check_chars("routing_key", r.routing_key, lim.max_id_chars)
        attributes = dict(r.attributes)
        if len(attributes) > lim.max_attributes:
            raise InvalidArgument(f"attributes: {len(attributes)} given, the limit is {lim.max_attributes}")
        for name, value in attributes.items():
            field_name = r.attribute_field.format(name[:64])
            if len(name) > lim.max_attribute_chars:
                raise InvalidArgument(f"{field_name}: the name has {len(name)} characters, the limit is "
                                      f"{lim.max_attribute_chars}")
            check_chars(field_name, value, lim.max_attribute_chars)
        mv = self.router.pick(r.model, r.version, r.routing_key)
        out.model, out.version = mv.model, mv.version
        if out.tenant:
            attributes["tenant"] = out.tenant
        out.flags = self.router.flags_on(mv.model, r.routing_key, attributes)
        if r.version:
            out.route = "pinned"
        else:
            out.route = "stable" if mv.version == self.router.stable_version(mv.model) else "canary"
        return mv

    def shadow(self, out: RequestRecord, request: ModelRequest, run) -> None:
        """Start a copy of a routed request on each shadow version of its model; the copy's
        answer is thrown away and its event has route "shadow". `run(out, mv, ids)` does
        the work. A shadow version whose queue is full is skipped, so copies never take a
        place a real request could have had."""
        if out.route == "pinned":
            return
        for version in self.router.shadows.get(out.model, ()):
            mv = self.router.versions.get(out.model, {}).get(version)
            if mv is None or version == out.version:
                continue
            if mv.engine.full():
                self.metrics.shadow_skipped.labels(mv.model, mv.version).inc()
                continue
            # a context of its own: the copy is not the caller's request, so it is not
            # charged to the caller's key nor part of the caller's trace
            task = asyncio.create_task(self.run_shadow(out, mv, request, run), context=contextvars.Context())
            self.shadow_tasks.add(task)
            task.add_done_callback(self.shadow_tasks.discard)

    async def run_shadow(self, primary: RequestRecord, mv: ModelVersion, request: ModelRequest, run) -> None:
        with contextlib.suppress(Exception), self.track(Call(primary.method, protocol=primary.protocol)) as out:  # recorded, not raised
            out.model, out.version, out.route, out.shadow_of = mv.model, mv.version, "shadow", primary.request_id
            out.tenant, out.flags = primary.tenant, primary.flags
            await run(out, mv, self.prompt_ids(out, mv, request))

    def prompt_ids(self, out: RequestRecord, mv: ModelVersion, request: ModelRequest) -> list[int]:
        prompt, messages, field_name = request.prompt, request.messages, request.input_field
        if messages is not None:
            if not messages:
                raise InvalidArgument(f"{field_name}.messages: is empty")
            if len(messages) > self.limits.max_messages:
                raise InvalidArgument(f"{field_name}.messages: {len(messages)} messages, the limit is "
                                      f"{self.limits.max_messages}")
            chars = sum(len(m["content"]) for m in messages)
            if chars > self.limits.max_prompt_chars:
                raise InvalidArgument(f"{field_name}.messages: {chars} characters of content, the limit is "
                                      f"{self.limits.max_prompt_chars}")
            for i, m in enumerate(messages):
                if m["role"] not in ("system", "user", "assistant", "tool"):
                    raise InvalidArgument(f"{field_name}.messages[{i}].role: {shown(m['role'])} is not "
                                          "one of system, user, assistant, tool")
            if mv.system_prompt and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": mv.system_prompt}, *messages]
            if mv.tokenizer.chat_template is None:
                raise InvalidArgument(f"{field_name}: model {mv.model} has no chat template; send a prompt")
            prompt = mv.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if not prompt:
            raise InvalidArgument(f"{field_name}: is empty")
        if len(prompt) > self.limits.max_prompt_chars:
            raise InvalidArgument(f"{field_name}: {len(prompt)} characters, the limit is "
                                  f"{self.limits.max_prompt_chars}")
        out.prompt_chars = len(prompt)
        out.prompt_sha256 = hashlib.sha256(prompt.encode()).hexdigest()
        out.prompt_text = prompt
        ids = mv.tokenizer.encode(prompt)
        limit = mv.engine.max_seq_len - 1
        if len(ids) > limit:
            raise InvalidArgument(f"{field_name}: {len(ids)} tokens, the limit is {limit}")
        out.prompt_tokens = len(ids)
        return ids

    def checked_sampling(self, params: SamplingParams) -> SamplingParams:
        try:
            params.validate(self.limits.max_tokens)
        except ValueError as exc:
            raise InvalidArgument(f"sampling.{exc}") from None
        if len(params.stop) > self.limits.max_stop:
            raise InvalidArgument(f"sampling.stop: {len(params.stop)} stop strings, the limit is "
                                  f"{self.limits.max_stop}")
        for i, stop in enumerate(params.stop):
            if not stop:
                raise InvalidArgument(f"sampling.stop[{i}]: is empty")
            check_chars(f"sampling.stop[{i}]", stop, self.limits.max_stop_chars)
        return params

    # -- on the engine -------------------------------------------------------------------

    @staticmethod
    def submit(mv: ModelVersion, job: Job) -> None:
        try:
            mv.engine.submit(job)
        except Busy as exc:
            raise Overloaded(str(exc)) from None

    async def complete(self, out: RequestRecord, mv: ModelVersion, ids: list[int], params: SamplingParams) -> Finished:
        async with contextlib.aclosing(self.run(out, mv, ids, params, chunks=False)) as updates:
            async for update in updates:
                return update

    async def run(self, out: RequestRecord, mv: ModelVersion, ids: list[int], params: SamplingParams,
                  chunks: bool) -> AsyncIterator[TextChunk | Finished]:
        """Yields TextChunk ... Finished (only Finished unless `chunks`).
        Leaving early cancels the generation."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        job = Job(ids, lambda u: loop.call_soon_threadsafe(updates.put_nowait, u), params=params, stream=chunks)
        self.submit(mv, job)
        out.submitted = job.arrival
        try:
            while True:
                update = await updates.get()
                if isinstance(update, Finished):
                    out.finished = update
                    out.timing = update.timing
                    if update.finish_reason == "error":
                        raise Failed(update.error)
                    if update.finish_reason == "cancelled":  # the engine stopped it: its version was unloaded
                        out.status = "cancelled"
                    yield update
                    return
                yield update
        finally:
            if out.finished is None:
                job.cancel()

    async def score(self, out: RequestRecord, mv: ModelVersion, ids: list[int], labels: list[str]) -> list[LabelScore]:
        if len(labels) < 2:
            raise InvalidArgument(f"labels: {len(labels)} given, at least 2 needed")
        if len(labels) > self.limits.max_labels:
            raise InvalidArgument(f"labels: {len(labels)} given, at most {self.limits.max_labels}")
        if len(set(labels)) != len(labels):
            raise InvalidArgument("labels: contains duplicates")
        label_ids = []
        for i, label in enumerate(labels):
            if not label or len(label) > self.limits.max_label_chars:
                raise InvalidArgument(f"labels[{i}]: must have 1 to {self.limits.max_label_chars} characters")
            label_ids.append(mv.tokenizer.encode(label, add_special=False))
        if len(ids) + max(map(len, label_ids)) > mv.engine.max_seq_len:
            raise InvalidArgument("labels: prompt and the longest label exceed the context length")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        job = Job(ids, lambda u: loop.call_soon_threadsafe(done.set_result, u), label_ids=label_ids)
        self.submit(mv, job)
        out.submitted = job.arrival
        try:
            result = await done
        except asyncio.CancelledError:
            job.cancel()
            raise
        if isinstance(result, Finished):  # cancelled or failed inside the engine
            raise Failed(result.error or result.finish_reason)
        assert isinstance(result, Scored)
        out.timing = result.timing
        top = max(result.logprobs)
        weights = [math.exp(lp - top) for lp in result.logprobs]
        total = sum(weights)
        probabilities = [w / total for w in weights]
        if mv.temperature != 1.0:  # the rollout's recalibration of this version
            probabilities = temperature.scale(probabilities, mv.temperature)
        scores = [LabelScore(label, p, lp) for label, p, lp in zip(labels, probabilities, result.logprobs)]
        out.scores = {s.label: s.probability for s in scores}
        return scores

    # -- the one record per request ------------------------------------------------------

    def record(self, out: RequestRecord) -> None:
        f = out.finished
        if out.model and out.version and not out.shadow_of:  # feedback is for answers a caller got
            self.served_by[out.request_id] = (out.model, out.version)
            while len(self.served_by) > 100_000:
                self.served_by.popitem(last=False)
        total = time.monotonic() - out.started
        event = {
            "event_id": str(uuid.uuid4()), "time": time.time(), "source": self.source,
            "request_id": out.request_id, "method": out.method, "model": out.model,
            "version": out.version, "route": out.route, "status": out.status, "error": out.error,
            "tenant": out.tenant, "trace_id": out.trace_id, "flags": out.flags, "shadow_of": out.shadow_of,
            "prompt_chars": out.prompt_chars, "prompt_sha256": out.prompt_sha256,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": f.completion_tokens if f else 0,
            "finish_reason": f.finish_reason if f else ("cancelled" if out.status == "cancelled" else ""),
            "queue_seconds": out.timing.queue_s,
            "first_token_seconds": out.timing.first_token_s,
            "total_seconds": out.timing.total_s or total,
            "mean_logprob": f.confidence.mean_logprob if f else None,
            "mean_entropy": f.confidence.mean_entropy if f else None,
            "min_top1_prob": f.confidence.min_top1_prob if f else None,
            "label_probabilities": out.scores,
            "completion_chars": len(f.text) if f else 0,
            "completion_sha256": hashlib.sha256(f.text.encode()).hexdigest() if f and f.text else "",
            "completion_token_hashes": self.token_hashes(f.token_ids) if f else (),
        }
        if self.include_text:
            event["prompt_text"] = out.prompt_text if out.prompt_chars else None
            event["completion_text"] = f.text if f else None
        on_done = self.tracing.publishing(out, INFERENCE_TOPIC)  # the publish span, ended on delivery
        self.sink.publish(INFERENCE_TOPIC, topics.event_key(out.model), event, on_done=on_done)
        self.tracing.end(out)
        log_request(event, self.tracing.span_id(out) if out.span is not None else "",
                    out.prompt_text if self.log_text else None, (f.text if f else "") if self.log_text else None)
        m, labels = self.metrics, (out.model or "unknown", out.version or "unknown")
        m.requests.labels(*labels, out.method, out.status, out.protocol).inc()
        m.e2e.labels(*labels).observe(total)
        if out.prompt_tokens and out.status == "ok":
            m.prompt_tokens.labels(*labels).inc(out.prompt_tokens)
        if f:
            m.generation_tokens.labels(*labels).inc(f.completion_tokens)
            m.queue.labels(*labels).observe(f.timing.queue_s)
            if f.completion_tokens:
                m.ttft.labels(*labels).observe(f.timing.first_token_s)

