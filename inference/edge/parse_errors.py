"""Request bytes that do not parse as the method's message get INVALID_ARGUMENT.

grpc.aio parses a request before any handler runs and answers a parse failure with
UNKNOWN ("Unexpected DecodeError"); a message of a request stream that fails to parse
is raised inside whatever reads the stream. `DecodeErrors` gives every method a parser
that never raises: what did not parse reaches the handler as `Undecodable`, and the call
ends there with INVALID_ARGUMENT naming the method and the message type it expected.
"""

from __future__ import annotations

import inspect

import grpc

KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class Undecodable:
    def __init__(self, type_name: str, error: Exception):
        self.type_name = type_name
        self.error = error

    def message(self, method: str) -> str:
        return f"request: the bytes sent to {method} are not a {self.type_name} message ({self.error})"


def tolerant(deserializer):
    owner = getattr(deserializer, "__self__", None)
    type_name = owner.DESCRIPTOR.full_name if hasattr(owner, "DESCRIPTOR") else "request"

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as exc:  # whatever the parser raises, the bytes are not a message
            return Undecodable(type_name, exc)
    return parse


def wrap(behavior, method: str, request_streaming: bool, response_streaming: bool):
    """`behavior`, refusing what did not parse; of the same kind (async or not, streaming
    or not), as grpc.aio calls a handler by its kind."""
    if inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
        async def refuse(context, request: Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message(method))

        async def each(requests, context):
            async for request in requests:
                if isinstance(request, Undecodable):
                    await refuse(context, request)
                yield request

        async def check(request, context):
            if request_streaming:
                return each(request, context)
            if isinstance(request, Undecodable):
                await refuse(context, request)
            return request

        if inspect.isasyncgenfunction(behavior):
            async def streaming(request, context):
                async for response in behavior(await check(request, context), context):
                    yield response
            return streaming

        async def unary(request, context):
            return await behavior(await check(request, context), context)
        return unary

    # a synchronous handler runs in grpc's thread pool (a streaming one as it is iterated),
    # with a context whose abort raises
    def each_sync(requests, context):
        for request in requests:
            if isinstance(request, Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
            yield request

    def check_sync(request, context):
        if request_streaming:
            return each_sync(request, context)
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message(method))
        return request

    if response_streaming:
        def streaming_sync(request, context):
            yield from behavior(check_sync(request, context), context)
        return streaming_sync

    def unary_sync(request, context):
        return behavior(check_sync(request, context), context)
    return unary_sync


class DecodeErrors(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kind = next(k for k in KINDS if getattr(handler, k) is not None)
        return handler._replace(request_deserializer=tolerant(handler.request_deserializer),
                                **{kind: wrap(getattr(handler, kind), details.method, handler.request_streaming,
                                              handler.response_streaming)})
