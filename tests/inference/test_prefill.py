"""Chunked prefill in the engine, on the tiny random Llama: a long prompt prefilled a
chunk a step gives the greedy tokens (and log-probabilities) it gets prefilled at
once, also while other sequences decode between its chunks; the decoding sequences
keep getting tokens during its prefill; a prompt cancelled half-way frees its slot."""

from __future__ import annotations

import queue

import pytest
import torch

from inference.runtime.engine import Engine, Finished, Job, TextChunk
from inference.runtime.loading import build_model, load_checkpoint
from inference.runtime.sampling import SamplingParams
from tests.helpers.waiting import wait_until

LONG = 400  # prompt tokens; the tiny model's 512 positions hold it and its answer
MAX_SEQ_LEN = 512


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    ckpt = load_checkpoint(tiny_llama)
    assert ckpt.config.max_position_embeddings >= MAX_SEQ_LEN
    models = {mode: build_model(ckpt, mode) for mode in ("none", "int4")}
    return ckpt, models


def long_prompt(tok) -> list[int]:
    text = "Once upon a time there was a small model that answered questions. " * 60
    ids = tok.encode(text, add_special=False)
    assert len(ids) >= LONG
    return ids[:LONG]


def short_prompts(tok) -> list[list[int]]:
    return [tok.encode(t, add_special=False) for t in
            ("The quick brown fox", "What is the capital of France?", "Paris is")]


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def run_alone(model, tok, prompt: list[int], max_tokens: int, chunk) -> Finished:
    engine = Engine(model, tok, kv_slots=1, max_seq_len=MAX_SEQ_LEN, max_waiting=1, prefill_chunk=chunk)
    try:
        out: queue.Queue = queue.Queue()
        engine.submit(Job(prompt, out.put, params=params(max_tokens), stream=False))
        done = out.get(timeout=120)
    finally:
        engine.stop()
    assert isinstance(done, Finished) and done.error == "", done
    return done


@pytest.mark.parametrize("mode", ["none", "int4"])
@pytest.mark.parametrize("chunk", [64, 37])
def test_chunked_prefill_gives_the_tokens_of_prefill_at_once(tiny, mode, chunk):
    ckpt, models = tiny
    prompt = long_prompt(ckpt.tokenizer)
    whole = run_alone(models[mode], ckpt.tokenizer, prompt, 24, None)
    chunked = run_alone(models[mode], ckpt.tokenizer, prompt, 24, chunk)
    assert chunked.token_ids == whole.token_ids and len(whole.token_ids) == 24
    torch.testing.assert_close(torch.tensor(chunked.logprobs), torch.tensor(whole.logprobs), atol=1e-4, rtol=0)
    assert chunked.prompt_tokens == whole.prompt_tokens == LONG


@pytest.mark.parametrize("mode", ["none", "int4"])
def test_a_long_prompt_prefills_between_decode_steps(tiny, mode):
    """Three short prompts decode; when the first of them has its first token, a long
    prompt arrives (submitted from the engine's own callback, so between two steps).
    Its 400 tokens go in at most 32 a step while the others decode; every answer is the
    one each prompt gets alone, prefilled at once."""
    ckpt, models = tiny
    model, tok = models[mode], ckpt.tokenizer
    shorts, prompt = short_prompts(tok), long_prompt(tok)
    expected = [run_alone(model, tok, p, 60, None).token_ids for p in shorts]
    expected_long = run_alone(model, tok, prompt, 16, None).token_ids

    engine = Engine(model, tok, kv_slots=4, max_seq_len=MAX_SEQ_LEN, max_waiting=4, prefill_chunk=32)
    results: dict[int, Finished] = {}
    received = [0, 0, 0]  # tokens streamed to each short prompt so far
    seen_at_first_long_token: list[int] = []
    long_job = Job(prompt, lambda out: on_long(out), params=params(16))

    def on_long(out) -> None:
        if isinstance(out, TextChunk) and not seen_at_first_long_token:
            seen_at_first_long_token.extend(received)
        if isinstance(out, Finished):
            results[3] = out

    def on_short(i: int):
        def emit(out) -> None:
            if isinstance(out, TextChunk):
                received[i] += len(out.token_ids)
                if i == 0 and received[0] == 1:
                    engine.submit(long_job)
            elif isinstance(out, Finished):
                results[i] = out
        return emit

    try:
        for i, p in enumerate(shorts):
            engine.submit(Job(p, on_short(i), params=params(60)))
        wait_until(lambda: len(results) == 4, 120, "all four answers")
    finally:
        engine.stop()
    for i in range(3):
        assert results[i].error == "" and results[i].token_ids == expected[i], i
    assert results[3].error == "" and results[3].token_ids == expected_long
    # 400 tokens, at most 32 a step: 13 steps or more, each with a decode step of the others
    assert min(seen_at_first_long_token) >= 10, seen_at_first_long_token


def test_a_prompt_cancelled_during_its_prefill_frees_its_slot(tiny):
    ckpt, models = tiny
    model, tok = models["none"], ckpt.tokenizer
    engine = Engine(model, tok, kv_slots=2, max_seq_len=MAX_SEQ_LEN, max_waiting=2, prefill_chunk=16)
    results: dict[str, Finished] = {}
    long_job = Job(long_prompt(tok), lambda out: isinstance(out, Finished) and results.setdefault("long", out),
                   params=params(8))
    cancelled_at: list[int] = []

    def on_short(out) -> None:
        if isinstance(out, Finished):
            results["short"] = out
        elif not cancelled_at:
            started = [r for r in engine.prefilling if r.job is long_job]
            if started and started[0].position >= 64:  # a few chunks in
                cancelled_at.append(started[0].position)
                long_job.cancel()

    try:
        engine.submit(Job(short_prompts(tok)[0], on_short, params=params(100)))
        engine.submit(long_job)
        wait_until(lambda: len(results) == 2, 120, "both answers")
        assert results["long"].finish_reason == "cancelled" and results["long"].token_ids == []
        assert cancelled_at and cancelled_at[0] < LONG
        assert results["short"].error == "" and len(results["short"].token_ids) == 100
        wait_until(lambda: engine.free_slots == [0, 1] and not engine.has_work(), 10, "the slots back")
    finally:
        engine.stop()
