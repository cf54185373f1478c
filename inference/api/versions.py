"""Loading and unloading model versions while the server runs.

A version is a checkpoint (a GGUF file, a Hugging Face folder, or the demo model) in a
weight-only precision, with its own engine and KV pool. Loading runs in a worker
thread so the event loop keeps serving; a new version starts with no traffic unless
it is the model's first.
"""

from __future__ import annotations

import asyncio
import threading

from inference.api.errors import InvalidArgument
from inference.api.router import ModelVersion, Router
from inference.runtime.compute import single_threaded_torch
from inference.runtime.demo import demo_model_path
from inference.runtime.engine import Engine, Finished, Job
from inference.api.options import EngineOptions
from inference.runtime.loading import build_model, load_checkpoint
from inference.runtime.precision import INT4_GROUP_SIZES, QUANTIZE_MODES
from inference.runtime.sampling import SamplingParams


class VersionManager:
    def __init__(self, router: Router, options: EngineOptions, on_token=None):
        self.router = router
        self.options = options
        self.on_token = on_token  # (model, version) -> callback(seconds) for inter-token latency
        self.lock = asyncio.Lock()

    def load_sync(self, model: str, version: str, source: str, quantize: str = "none",
                  group_size: int = 32, system_prompt: str = "") -> ModelVersion:
        with single_threaded_torch():  # the cores belong to the compute thread
            return self.build(model, version, source, quantize, group_size, system_prompt)

    def build(self, model: str, version: str, source: str, quantize: str, group_size: int,
              system_prompt: str = "") -> ModelVersion:
        validate_version(model, version, source, quantize, group_size)
        path = demo_model_path() if source == "demo" else source
        try:
            ckpt = load_checkpoint(path)
        except (FileNotFoundError, ValueError) as exc:
            raise InvalidArgument(f"source: {exc}") from None
        try:
            net = build_model(ckpt, quantize, group_size)
        except ValueError as exc:  # e.g. a group size that does not divide the model's widths
            raise InvalidArgument(str(exc)) from None
        engine = Engine(net, ckpt.tokenizer, kv_slots=self.options.kv_slots,
                        max_seq_len=min(self.options.max_seq_len, ckpt.config.max_position_embeddings),
                        max_waiting=self.options.max_waiting)
        warm_up(engine, ckpt.tokenizer.encode("Hello"))
        engine.on_token = self.on_token(model, version) if self.on_token else None
        mv = ModelVersion(model, version, source, quantize, engine, ckpt.tokenizer, group_size=group_size,
                          system_prompt=system_prompt)
        try:
            self.router.add(mv)
        except ValueError as exc:
            engine.stop()
            raise InvalidArgument(str(exc)) from None
        return mv

    async def load(self, model: str, version: str, source: str, quantize: str = "none",
                   group_size: int = 32, system_prompt: str = "") -> ModelVersion:
        async with self.lock:
            validate_version(model, version, source, quantize, group_size)
            if version in self.router.versions.get(model, {}):
                raise InvalidArgument(f"version: {model} {version!r} is already loaded")
            return await asyncio.to_thread(self.load_sync, model, version, source, quantize, group_size,
                                           system_prompt)

    async def unload(self, model: str, version: str) -> ModelVersion:
        async with self.lock:
            mv = self.router.remove(model, version)
        await asyncio.to_thread(mv.engine.stop)
        return mv

    def stop(self) -> None:
        for mv in self.router.all():
            mv.engine.stop()


def warm_up(engine: Engine, prompt_ids: list[int]) -> None:
    """A short request through the engine before the version takes traffic, so that the
    first real request does not pay for the first calls of its kernels."""
    done = threading.Event()
    engine.submit(Job(prompt_ids, lambda out: isinstance(out, Finished) and done.set(),
                      params=SamplingParams(max_tokens=8, ignore_eos=True)))
    done.wait()


def validate_version(model: str, version: str, source: str, quantize: str, group_size: int) -> None:
    if not model:
        raise InvalidArgument("model: is empty")
    if not version:
        raise InvalidArgument("version: is empty")
    if not source:
        raise InvalidArgument("source: is empty")
    if quantize not in QUANTIZE_MODES:
        raise InvalidArgument(f"quantize: {quantize!r} is not one of {', '.join(QUANTIZE_MODES)}")
    if quantize == "int4" and group_size not in INT4_GROUP_SIZES:
        raise InvalidArgument(f"group_size: {group_size} is not one of {INT4_GROUP_SIZES}")
