"""What the two gRPC services share: a call as the serving layer's `Call`, and the
serving layer's errors as status codes."""

from __future__ import annotations

import asyncio
import functools
import time

import grpc

from inference.api.errors import InvalidArgument, NotFound, Overloaded, ServingError
from inference.api.requests import Call

CODES = {InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT, NotFound: grpc.StatusCode.NOT_FOUND,
         Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED}


def status_code(exc: Exception) -> grpc.StatusCode:
    return next((code for kind, code in CODES.items() if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


async def abort(context: grpc.aio.ServicerContext, exc: Exception):
    code = status_code(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        await context.abort(code, f"server overloaded: {exc}")
    if code == grpc.StatusCode.INTERNAL:
        await context.abort(code, f"internal error: {exc}")
    await context.abort(code, str(exc))


def grpc_errors(handler):
    """The serving layer's exceptions as gRPC status codes."""
    if asyncio.iscoroutinefunction(handler):
        @functools.wraps(handler)
        async def unary(self, request, context):
            try:
                return await handler(self, request, context)
            except (ServingError, RuntimeError, ValueError) as exc:
                await abort(context, exc)
        return unary

    @functools.wraps(handler)
    async def streaming(self, request, context):
        try:
            async for item in handler(self, request, context):
                yield item
        except (ServingError, RuntimeError, ValueError) as exc:
            await abort(context, exc)
    return streaming


def call_of(context: grpc.aio.ServicerContext, method: str, request_id: str, id_field: str = "request_id") -> Call:
    remaining = context.time_remaining()
    return Call(method, request_id, id_field, metadata_of(context),
                None if remaining is None else time.monotonic() + remaining)


def metadata_of(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata, keys in lower case (binary `-bin` keys left out)."""
    pairs = context.invocation_metadata() or ()
    return {k.lower(): v for k, v in pairs if isinstance(v, str) and not k.endswith("-bin")}
