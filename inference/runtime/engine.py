"""Continuous batching: a model version's prefills and decode steps, scheduled.

Requests join the running batch between decode steps (after their prefill) and leave
it as soon as they finish, are cancelled or fail; each holds one slot of the bounded KV
pool while it runs. Prompts are prefilled in chunks, one or more prompts in order of
arrival, beside the running batch's decode step, so a long prompt no longer stalls the
sequences that decode meanwhile (a 2,000-token prompt prefilled at once holds every
stream up for the whole prefill, seconds on a CPU). While sequences decode, a step's
chunk is sized from measured times so that it takes about as long as a decode step
(`PREFILL_SHARE` of one; on a CPU a forward of 16 prompt tokens costs about what a
decode step of 15 sequences does), at least `MIN_PREFILL_CHUNK` and at most `prefill_chunk`
tokens; with nothing decoding, `prefill_chunk` tokens a step (which bounds the
activations' memory). The waiting queue is bounded too: when it is full, `submit` raises
`Busy` at once. A request is taken while fewer than `max_waiting` requests wait beyond those the free
slots will take at the next step. Results go back through each request's `emit` callback, which
the gRPC layer points at its own event loop, so the engine never touches asyncio.
Steps run on the process's compute thread (`inference.runtime.compute`).
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from inference.runtime.compute import ComputeThread, single_threaded_torch
from inference.runtime.model import KVCache, Llama
from inference.runtime.sampling import Sampler, SamplingParams, sample
from inference.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Busy(Exception):
    """The engine takes no request now: its waiting queue is full, or it is stopping."""


@dataclass
class Timing:
    queue_s: float = 0.0
    first_token_s: float = 0.0
    total_s: float = 0.0


@dataclass
class Confidence:
    mean_logprob: float = 0.0
    mean_entropy: float = 0.0
    min_top1_prob: float = 1.0


@dataclass
class TextChunk:
    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)  # of each of token_ids, as sampled


@dataclass
class Finished:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # stop, length, cancelled, error
    confidence: Confidence
    timing: Timing
    error: str = ""
    logprobs: list[float] = field(default_factory=list)  # of each of token_ids, as sampled

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Scored:
    """Classify's answer: log-likelihood of each label's tokens after the prompt."""
    logprobs: list[float]
    prompt_tokens: int
    timing: Timing
    error: str = ""


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    emit: Callable[[object], None]
    params: SamplingParams | None = None       # generation
    label_ids: list[list[int]] | None = None   # classification
    stream: bool = True                        # send text as it comes, not only at the end
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class Running:
    job: Job
    slot: int
    sampler: Sampler
    detok: object
    stop: tuple[str, ...]
    started: float
    position: int = 0  # tokens in the KV cache
    pending: list[int] = field(default_factory=list)  # prompt tokens not prefilled yet
    last_token: int = 0
    tokens: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # ids whose text is not sent yet
    text: str = ""
    emitted: int = 0  # characters of text already sent
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    first_token_at: float = 0.0
    last_token_at: float = 0.0


class EngineStats:
    """What the metrics layer reads; written by the engine thread only."""

    def __init__(self):
        self.running = 0
        self.waiting = 0
        self.batch_size = 0
        self.kv_tokens_used = 0
        self.kv_tokens_total = 0
        self.steps = 0


class Engine:
    PREFILL_SHARE = 1.0      # a step's prefill time, as a share of its decode step's, while others decode
    MIN_PREFILL_CHUNK = 16   # prompt tokens a step at least

    def __init__(self, model: Llama, tokenizer: Tokenizer, *, kv_slots: int = 16,
                 max_seq_len: int = 1024, max_waiting: int = 64,
                 on_token: Callable[[float], None] | None = None, compute: ComputeThread | None = None,
                 prefill_chunk: int | None = 256):
        """`prefill_chunk`: prompt tokens prefilled a step at most (None: each prompt at
        once, whatever else runs)."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.max_waiting = max_waiting
        device = next(model.parameters()).device
        dtype = model.norm.weight.dtype
        with single_threaded_torch():  # no OpenMP pool outside the compute thread
            self.cache = KVCache(model.config, kv_slots, max_seq_len, dtype=dtype, device=device)
        self.device = device
        self.free_slots = list(range(kv_slots))
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Running] = []      # decoding, in slot order
        self.prefilling: list[Running] = []   # in a slot, prompt not all in the cache; in arrival order
        self.prefill_chunk = prefill_chunk
        self.decode_s = 0.0          # moving averages: a decode step's time,
        self.prefill_token_s = 0.0   # and a prefill chunk's time per token
        self.stats = EngineStats()
        self.stats.kv_tokens_total = kv_slots * max_seq_len
        self.on_token = on_token  # inter-token latency observer
        self.lock = threading.Lock()  # guards waiting, taking a free slot, and stopping
        self.stopping = False
        self.stopped = threading.Event()
        self.compute = compute or ComputeThread.shared()
        self.compute.attach(self)

    # -- called from any thread ------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.stopping:
                raise Busy("the engine is shutting down")
            self.drop_cancelled_waiting()
            if self.full():
                raise Busy(f"{len(self.waiting)} requests already waiting for {len(self.free_slots)} free "
                                 f"KV slots (limit {self.max_waiting} beyond them)")
            self.waiting.append(job)
            self.stats.waiting = len(self.waiting)
        self.compute.notify()

    def full(self) -> bool:
        """No room for another request. Exact under self.lock: a job leaves `waiting`
        together with the slot it takes."""
        return len(self.waiting) >= len(self.free_slots) + self.max_waiting

    def drop_cancelled_waiting(self) -> None:
        """Answer and forget waiting jobs whose callers are gone. Holds self.lock."""
        if any(job.cancelled for job in self.waiting):
            now = time.monotonic()
            for job in [job for job in self.waiting if job.cancelled]:
                self.waiting.remove(job)
                job.emit(Finished("", [], len(job.prompt_ids), "cancelled", Confidence(),
                                  Timing(queue_s=now - job.arrival, total_s=now - job.arrival)))
            self.stats.waiting = len(self.waiting)

    def stop(self) -> None:
        """Cancel what runs and waits, and leave the compute thread."""
        with self.lock:
            self.stopping = True
        self.compute.notify()
        self.stopped.wait()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling or self.stopping)

    # -- on the compute thread -------------------------------------------------------

    def step_or_close(self) -> bool:
        """One scheduling step; True once the engine has stopped."""
        if self.stopping:
            for r in self.running + self.prefilling:
                self.finish(r, "cancelled")
            with self.lock:
                waiting, self.waiting = list(self.waiting), collections.deque()
            for job in waiting:
                job.emit(Finished("", [], len(job.prompt_ids), "cancelled", Confidence(), Timing()))
            self.stopped.set()
            return True
        try:
            self.step()
        except Exception as exc:  # a bug must fail the requests in flight, not the server
            log.exception("engine step failed")
            for r in self.running + self.prefilling:
                self.finish(r, "error", error=f"internal error: {exc}")
        return False

    def step(self) -> None:
        for r in [r for r in self.running + self.prefilling if r.job.cancelled]:
            self.finish(r, "cancelled")
        with self.lock:
            self.drop_cancelled_waiting()
        self.admit()
        decoding = list(self.running)  # those whose prefill ends now decode from the next step
        if self.prefilling:
            self.prefill_some(bool(decoding))
        if decoding:
            self.decode(decoding)
        self.stats.running = len(self.running) + len(self.prefilling)
        self.stats.batch_size = len(self.running)
        self.stats.kv_tokens_used = sum(r.position for r in self.running + self.prefilling)
        self.stats.steps += 1

    def admit(self) -> None:
        while self.free_slots:
            with self.lock:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
                self.stats.waiting = len(self.waiting)
                if job.cancelled:
                    job.emit(Finished("", [], len(job.prompt_ids), "cancelled", Confidence(),
                                      Timing(queue_s=time.monotonic() - job.arrival)))
                    continue
                slot = self.free_slots.pop(0)
            try:
                if job.label_ids is not None:
                    self.classify(job, slot)
                    self.release(slot)
                else:
                    self.prefilling.append(Running(
                        job, slot, Sampler(job.params, self.device), self.tokenizer.incremental_decoder(),
                        job.params.stop, started=time.monotonic(), pending=list(job.prompt_ids)))
            except Exception as exc:
                log.exception("admission failed")
                self.release(slot)
                job.emit(Finished("", [], len(job.prompt_ids), "error", Confidence(), Timing(),
                                  error=f"internal error: {exc}"))

    def release(self, slot: int) -> None:
        with self.lock:
            bisect.insort(self.free_slots, slot)

    def forward(self, tokens: list[list[int]], start: list[int], slots: list[int]) -> torch.Tensor:
        """Logits of the last position of each row: rows of equal length only."""
        t = torch.tensor(tokens, device=self.device)
        positions = torch.tensor(start, device=self.device)[:, None] + torch.arange(t.shape[1], device=self.device)
        return self.model(t, positions, self.cache, torch.tensor(slots, device=self.device), last_only=True)[:, -1]

    def prefill_budget(self, decoding: bool) -> float:
        """Prompt tokens to prefill this step (see the module docstring)."""
        if not self.prefill_chunk:
            return float("inf")
        if not decoding:
            return self.prefill_chunk
        if not (self.decode_s and self.prefill_token_s):
            return self.MIN_PREFILL_CHUNK
        fits = int(self.PREFILL_SHARE * self.decode_s / self.prefill_token_s)
        return max(self.MIN_PREFILL_CHUNK, min(self.prefill_chunk, fits))

    def prefill_some(self, decoding: bool = False) -> None:
        """A chunk of prompt tokens into the cache, the oldest prompt first; a prompt
        wholly in the cache gets its first token and joins the running batch."""
        budget = self.prefill_budget(decoding)
        while self.prefilling and budget > 0:
            r = self.prefilling[0]
            n = int(min(len(r.pending), budget))
            started = time.perf_counter()
            try:
                logits = self.forward([r.pending[:n]], [r.position], [r.slot])
            except Exception as exc:
                log.exception("prefill failed")
                self.finish(r, "error", error=f"internal error: {exc}")
                continue
            if n:
                self.prefill_token_s = moving_average(self.prefill_token_s, (time.perf_counter() - started) / n)
            budget -= max(n, 1)
            r.position += n
            del r.pending[:n]
            if not r.pending:
                self.prefilling.pop(0)
                self.running.append(r)
                self.running.sort(key=lambda x: x.slot)
                self.accept(r, sample(logits, [r.sampler])[0])

    def decode(self, rows: list[Running]) -> None:
        started = time.perf_counter()
        logits = self.forward([[r.last_token] for r in rows], [r.position for r in rows], [r.slot for r in rows])
        self.decode_s = moving_average(self.decode_s, time.perf_counter() - started)
        for r in rows:
            r.position += 1
        for r, choice in zip(list(rows), sample(logits, [r.sampler for r in rows])):
            self.accept(r, choice)

    def accept(self, r: Running, choice) -> None:
        now = time.monotonic()
        if r.first_token_at:
            if self.on_token:
                self.on_token(now - r.last_token_at)
        else:
            r.first_token_at = now
        r.last_token_at = now
        r.last_token = choice.token
        r.logprobs.append(choice.logprob)
        r.entropies.append(choice.entropy)
        r.top1.append(choice.top1_prob)
        if choice.token in self.tokenizer.eos_ids and not r.job.params.ignore_eos:
            return self.finish(r, "stop")
        r.tokens.append(choice.token)
        r.unsent.append(choice.token)
        r.text += r.detok.push(choice.token)
        for s in r.stop:
            cut = r.text.find(s)
            if cut >= 0:
                r.text = r.text[:cut]
                return self.finish(r, "stop")
        if len(r.tokens) >= r.job.params.max_tokens or r.position >= self.max_seq_len:
            return self.finish(r, "length")
        # hold back what could still become the start of a stop string
        hold = max((len(s) - 1 for s in r.stop), default=0)
        ready = len(r.text) - hold
        if r.job.stream and (ready > r.emitted or hold == 0):
            chunk = r.text[r.emitted:max(ready, r.emitted)]
            r.emitted += len(chunk)
            r.job.emit(TextChunk(chunk, r.unsent, r.logprobs[len(r.tokens) - len(r.unsent):len(r.tokens)]))
            r.unsent = []

    def finish(self, r: Running, reason: str, error: str = "") -> None:
        now = time.monotonic()
        (self.running if r in self.running else self.prefilling).remove(r)
        self.cache.forget(r.slot, r.position)
        self.release(r.slot)
        if r.job.stream and (r.emitted < len(r.text) or r.unsent):
            r.job.emit(TextChunk(r.text[r.emitted:], r.unsent,
                                 r.logprobs[len(r.tokens) - len(r.unsent):len(r.tokens)]))
        n = len(r.logprobs)
        confidence = Confidence(sum(r.logprobs) / n, sum(r.entropies) / n, min(r.top1)) if n else Confidence()
        timing = Timing(queue_s=r.started - r.job.arrival,
                        first_token_s=(r.first_token_at or now) - r.job.arrival,
                        total_s=now - r.job.arrival)
        r.job.emit(Finished(r.text, r.tokens, len(r.job.prompt_ids), reason, confidence, timing, error,
                            logprobs=r.logprobs[:len(r.tokens)]))  # not the end-of-sequence token's

    def classify(self, job: Job, slot: int) -> None:
        started = time.monotonic()
        n = len(job.prompt_ids)
        logits = self.forward([job.prompt_ids], [0], [slot])
        first = torch.log_softmax(logits[0].float(), -1)
        scores = []
        for label in job.label_ids:
            total = float(first[label[0]])
            if len(label) > 1:
                t = torch.tensor([label[:-1]], device=self.device)
                positions = torch.arange(n, n + len(label) - 1, device=self.device)[None]
                out = self.model(t, positions, self.cache, torch.tensor([slot], device=self.device))
                logp = torch.log_softmax(out[0].float(), -1)
                total += float(logp.gather(1, torch.tensor(label[1:], device=self.device)[:, None]).sum())
            scores.append(total)
        now = time.monotonic()
        job.emit(Scored(scores, n, Timing(queue_s=started - job.arrival, first_token_s=now - job.arrival,
                                          total_s=now - job.arrival)))


def moving_average(average: float, value: float, weight: float = 0.25) -> float:
    return value if not average else average + weight * (value - average)
