"""The native `vigil.v1.LLM` gRPC service: Generate, GenerateStream, Classify,
Feedback, and the admin calls for model versions and traffic. Each call is translated
to a request of the serving layer, and its outcome back into the response."""

from __future__ import annotations

import contextlib

from google.protobuf.timestamp_pb2 import Timestamp

from inference.api.errors import InvalidArgument, NotFound, shown
from inference.api.grpc_front import call_of, grpc_errors
from inference.api.requests import Chunk, ClassifyRequest, FeedbackRequest, GenerateRequest
from inference.api.serving import Serving
from inference.runtime.engine import Finished, Timing
from inference.runtime.sampling import SamplingParams
from protos import llm_pb2, llm_pb2_grpc

FINISH_REASONS = {
    "stop": llm_pb2.FINISH_REASON_STOP, "length": llm_pb2.FINISH_REASON_LENGTH,
    "cancelled": llm_pb2.FINISH_REASON_CANCELLED, "error": llm_pb2.FINISH_REASON_ERROR,
}


def sampling_params(s: llm_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    top_p = s.top_p if s.HasField("top_p") and s.top_p != 0.0 else 1.0
    return SamplingParams(
        max_tokens=s.max_tokens or default_max_tokens, temperature=s.temperature, top_k=s.top_k,
        top_p=top_p, seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop),
        ignore_eos=s.ignore_eos)


def model_request(cls, request, context, method: str, **fields):
    """A GenerateRequest or ClassifyRequest message as the serving layer's request."""
    input_field = request.WhichOneof("input")
    if input_field == "chat":
        fields["messages"] = [{"role": m.role, "content": m.content} for m in request.chat.messages]
    else:
        fields["prompt"] = getattr(request, input_field or "prompt", "")
    return cls(call_of(context, method, request.request_id), model=request.model, version=request.version,
               routing_key=request.routing_key, attributes=dict(request.attributes),
               input_field=input_field or "prompt", **fields)


def confidence(f: Finished) -> llm_pb2.ConfidenceSummary:
    c = f.confidence
    return llm_pb2.ConfidenceSummary(mean_logprob=c.mean_logprob, mean_entropy=c.mean_entropy,
                                     min_top1_prob=c.min_top1_prob)


def timing(t: Timing) -> llm_pb2.Timing:
    return llm_pb2.Timing(queue_seconds=t.queue_s, time_to_first_token_seconds=t.first_token_s,
                          total_seconds=t.total_s)


def ending(f: Finished) -> dict:
    """The fields of the response that ends a generation."""
    return dict(finish_reason=FINISH_REASONS[f.finish_reason], prompt_tokens=f.prompt_tokens,
                completion_tokens=f.completion_tokens, confidence=confidence(f), timing=timing(f.timing))


class LLMService(llm_pb2_grpc.LLMServicer):
    def __init__(self, serving: Serving, versions):
        self.serving = serving
        self.versions = versions  # inference.api.versions.VersionManager

    def generation(self, request, context, method: str) -> GenerateRequest:
        params = sampling_params(request.sampling, self.serving.limits.default_max_tokens)
        return model_request(GenerateRequest, request, context, method, sampling=params)

    @grpc_errors
    async def Generate(self, request, context):
        g = await self.serving.generate(self.generation(request, context, "Generate"))
        s = g.served
        return llm_pb2.GenerateResponse(request_id=s.request_id, model=s.model, version=s.version,
                                        text=g.finished.text, flags=s.flags, **ending(g.finished))

    @grpc_errors
    async def GenerateStream(self, request, context):
        first = True  # the flags go in the first message only
        async with contextlib.aclosing(self.serving.stream(self.generation(request, context, "GenerateStream"))) \
                as updates:
            async for update in updates:
                s = update.served
                head = dict(request_id=s.request_id, model=s.model, version=s.version, flags=s.flags if first else ())
                if isinstance(update, Chunk):
                    yield llm_pb2.GenerateStreamResponse(**head, text=update.text, token_ids=update.token_ids)
                else:
                    yield llm_pb2.GenerateStreamResponse(**head, final=True, **ending(update.finished))
                first = False

    @grpc_errors
    async def Classify(self, request, context):
        c = await self.serving.classify(model_request(ClassifyRequest, request, context, "Classify",
                                                      labels=list(request.labels)))
        s = c.served
        return llm_pb2.ClassifyResponse(
            request_id=s.request_id, model=s.model, version=s.version,
            scores=[llm_pb2.LabelScore(label=x.label, probability=x.probability, logprob=x.logprob) for x in c.scores],
            prediction=c.prediction, prompt_tokens=c.prompt_tokens, timing=timing(c.timing), flags=s.flags)

    @grpc_errors
    async def Feedback(self, request, context):
        truth = request.WhichOneof("truth")
        feedback_id = self.serving.feedback(FeedbackRequest(
            request.request_id, request.model, request.version,
            label=request.label if truth == "label" else None,
            score=request.score if truth == "score" else None,
            comment=request.comment if request.HasField("comment") else ""))
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
