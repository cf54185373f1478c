"""The native `vigil.v1.LLM` gRPC service: Generate, GenerateStream, Classify,
Feedback, and the admin calls for model versions and traffic."""

from __future__ import annotations

import asyncio
import functools

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from inference.runtime.engine import Finished, Overloaded, TextChunk
from inference.api.limits import InvalidArgument, shown
from inference.api.router import NotFound
from inference.runtime.sampling import SamplingParams
from inference.api.serving import Serving
from protos import llm_pb2, llm_pb2_grpc

FINISH_REASONS = {
    "stop": llm_pb2.FINISH_REASON_STOP, "length": llm_pb2.FINISH_REASON_LENGTH,
    "cancelled": llm_pb2.FINISH_REASON_CANCELLED, "error": llm_pb2.FINISH_REASON_ERROR,
}


async def abort_on_error(context: grpc.aio.ServicerContext, exc: Exception):
    if isinstance(exc, InvalidArgument):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, NotFound):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, Overloaded):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server overloaded: {exc}")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")


def grpc_errors(handler):
    """Turn the serving layer's exceptions into gRPC status codes."""
    if asyncio.iscoroutinefunction(handler):
        @functools.wraps(handler)
        async def unary(self, request, context):
            try:
                return await handler(self, request, context)
            except (InvalidArgument, NotFound, Overloaded, RuntimeError, ValueError) as exc:
                await abort_on_error(context, exc)
        return unary

    @functools.wraps(handler)
    async def streaming(self, request, context):
        try:
            async for item in handler(self, request, context):
                yield item
        except (InvalidArgument, NotFound, Overloaded, RuntimeError, ValueError) as exc:
            await abort_on_error(context, exc)
    return streaming


def sampling_params(s: llm_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    top_p = s.top_p if s.HasField("top_p") and s.top_p != 0.0 else 1.0
    return SamplingParams(
        max_tokens=s.max_tokens or default_max_tokens, temperature=s.temperature, top_k=s.top_k,
        top_p=top_p, seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop),
        ignore_eos=s.ignore_eos)


def chat_messages(chat: llm_pb2.Chat) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def confidence(f: Finished) -> llm_pb2.ConfidenceSummary:
    c = f.confidence
    return llm_pb2.ConfidenceSummary(mean_logprob=c.mean_logprob, mean_entropy=c.mean_entropy,
                                     min_top1_prob=c.min_top1_prob)


def timing(t) -> llm_pb2.Timing:
    return llm_pb2.Timing(queue_seconds=t.queue_s, time_to_first_token_seconds=t.first_token_s,
                          total_seconds=t.total_s)


class LLMService(llm_pb2_grpc.LLMServicer):
    def __init__(self, serving: Serving, versions):
        self.serving = serving
        self.versions = versions  # inference.api.versions.VersionManager

    def start(self, request, out):
        """Route the request and tokenize its input; returns the version, the token ids
        and the input as it came (for shadow copies, which tokenize it their own way)."""
        mv = self.serving.route(out, request.model, request.version, request.routing_key, dict(request.attributes))
        field = request.WhichOneof("input")
        if field == "chat":
            source = (None, chat_messages(request.chat), "chat")
        else:
            source = (getattr(request, field or "prompt", ""), None, field or "prompt")
        return mv, self.serving.prompt_ids(out, mv, *source), source

    def generation(self, request, out):
        mv, ids, source = self.start(request, out)
        params = self.serving.sampling(sampling_params(request.sampling, self.serving.limits.default_max_tokens))
        self.serving.shadow(out, *source, lambda copy, smv, sids: self.serving.complete(copy, smv, sids, params))
        return mv, ids, params

    @grpc_errors
    async def Generate(self, request, context):
        with self.serving.track("Generate", request.request_id, context) as out:
            mv, ids, params = self.generation(request, out)
            update = await self.serving.complete(out, mv, ids, params)
            return llm_pb2.GenerateResponse(
                request_id=out.request_id, model=out.model, version=out.version, text=update.text,
                prompt_tokens=update.prompt_tokens, completion_tokens=update.completion_tokens,
                finish_reason=FINISH_REASONS[update.finish_reason], confidence=confidence(update),
                timing=timing(update.timing), flags=out.flags)

    @grpc_errors
    async def GenerateStream(self, request, context):
        with self.serving.track("GenerateStream", request.request_id, context) as out:
            mv, ids, params = self.generation(request, out)
            head = dict(request_id=out.request_id, model=out.model, version=out.version)
            flags = out.flags
            async for update in self.serving.generate(out, mv, ids, params):
                if isinstance(update, TextChunk):
                    yield llm_pb2.GenerateStreamResponse(**head, text=update.text, token_ids=update.token_ids,
                                                         flags=flags)
                else:
                    yield llm_pb2.GenerateStreamResponse(
                        **head, final=True, finish_reason=FINISH_REASONS[update.finish_reason],
                        prompt_tokens=update.prompt_tokens, completion_tokens=update.completion_tokens,
                        confidence=confidence(update), timing=timing(update.timing), flags=flags)
                flags = ()

    @grpc_errors
    async def Classify(self, request, context):
        with self.serving.track("Classify", request.request_id, context) as out:
            mv, ids, source = self.start(request, out)
            labels = list(request.labels)
            scored = await self.serving.classify(out, mv, ids, labels)
            self.serving.shadow(out, *source, lambda copy, smv, sids: self.serving.classify(copy, smv, sids, labels))
            return llm_pb2.ClassifyResponse(
                request_id=out.request_id, model=out.model, version=out.version,
                scores=[llm_pb2.LabelScore(label=l, probability=p, logprob=lp) for l, p, lp in scored],
                prediction=max(scored, key=lambda s: s[1])[0], prompt_tokens=out.prompt_tokens,
                timing=timing(out.timing), flags=out.flags)

    @grpc_errors
    async def Feedback(self, request, context):
        truth = request.WhichOneof("truth")
        feedback_id = self.serving.feedback(
            request.request_id, request.model, request.version,
            label=request.label if truth == "label" else None,
            score=request.score if truth == "score" else None,
            comment=request.comment if request.HasField("comment") else "")
        return llm_pb2.FeedbackResponse(accepted=True, feedback_id=feedback_id)

    # -- admin -----------------------------------------------------------------------

    def info(self, mv) -> llm_pb2.ModelVersionInfo:
        loaded = Timestamp()
        loaded.FromMilliseconds(int(mv.loaded_at * 1000))
        weights = self.serving.router.weights.get(mv.model, {})
        total = sum(weights.values()) or 1.0
        return llm_pb2.ModelVersionInfo(
            model=mv.model, version=mv.version, source=mv.source, quantize=mv.quantize,
            group_size=mv.group_size if mv.quantize == "int4" else 0,
            state=llm_pb2.VERSION_STATE_READY, weight=weights.get(mv.version, 0.0) / total, loaded_at=loaded)

    @grpc_errors
    async def ListVersions(self, request, context):
        versions = [mv for mv in self.serving.router.all() if not request.model or mv.model == request.model]
        if request.model and not versions:
            raise NotFound(f"model: {shown(request.model)} is not loaded")
        return llm_pb2.ListVersionsResponse(versions=[self.info(mv) for mv in versions])

    @grpc_errors
    async def LoadVersion(self, request, context):
        mv = await self.versions.load(request.model, request.version, request.source,
                                      request.quantize or "none", request.group_size or 32,
                                      request.system_prompt)
        return llm_pb2.LoadVersionResponse(info=self.info(mv))

    @grpc_errors
    async def UnloadVersion(self, request, context):
        mv = await self.versions.unload(request.model, request.version)
        info = self.info(mv)
        info.state, info.weight = llm_pb2.VERSION_STATE_UNLOADED, 0.0
        return llm_pb2.UnloadVersionResponse(info=info)

    @grpc_errors
    async def SetTraffic(self, request, context):
        try:
            weights = self.serving.router.set_weights(request.model, dict(request.weights))
        except ValueError as exc:  # a negative, infinite or all-zero weight
            raise InvalidArgument(str(exc)) from None
        total = sum(weights.values())
        return llm_pb2.SetTrafficResponse(model=request.model, weights={v: w / total for v, w in weights.items()})
