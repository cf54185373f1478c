"""What a request can fail with, whichever front it came through. Each front maps these
to its own status codes (gRPC: `grpc_front`); anything else a request raises is an
internal error. Messages name the field at fault and quote inputs through `shown`,
which cuts them short.
"""

from __future__ import annotations


class ServingError(Exception):
    status = "internal"  # the request's status in its event, metrics, log line and span


class InvalidArgument(ServingError, ValueError):
    """Bad input; the message starts with the name of the offending field."""
    status = "invalid_argument"


class NotFound(ServingError, LookupError):
    """The model or version named is not loaded here."""
    status = "not_found"


class Overloaded(ServingError):
    """No room for the request now: its version's queue is full, or the caller's key is over a limit."""
    status = "resource_exhausted"


class Failed(ServingError, RuntimeError):
    """The engine failed while it ran the request."""


def shown(value, limit: int = 64) -> str:
    """repr(value), cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
