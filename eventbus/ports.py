"""The ports services listen on: the argparse type of every port option, the error that
names a port a service cannot own, and the Prometheus endpoint every service serves.

Every listener binds 127.0.0.1 unless told otherwise, and none shares its port with
another process (no SO_REUSEPORT): a second instance on a busy port stops with an error
naming the port.
"""

from __future__ import annotations

import argparse
import socket

from prometheus_client import start_http_server

HIGHEST = 65535


def port(text: str) -> int:
    """argparse type of a port option: 0 to 65535, 0 picking a free port."""
    return _parse(text, 0)


def port_or_minus_one(text: str) -> int:
    """argparse type of a port option where -1 has a meaning of its own, said in its help."""
    return _parse(text, -1)


def _parse(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not lowest <= value <= HIGHEST:
        raise argparse.ArgumentTypeError(f"{value} is not a port: {lowest} to {HIGHEST}")
    return value


class PortError(OSError):
    """A listener that could not bind; the message names what, where and why."""


def cannot_listen(what: str, host: str, port: int, cause: OSError | None = None) -> PortError:
    """The error of `what` (e.g. "metrics") failing to bind host:port. Without `cause`
    (gRPC does not say why) the reason is found by binding the same address once more."""
    if cause is None:
        try:
            _bind(host, port)
        except OSError as e:
            cause = e
    reason = (cause.strerror or str(cause)) if cause is not None else "the bind failed"
    return PortError(f"{what}: cannot listen on {host}:{port}: {reason.lower()}")


def check_free(what: str, host: str, port: int) -> None:
    """Raise PortError unless host:port can be bound now; 0 (any free port) and -1 (no
    listener) always can."""
    if port > 0:
        try:
            _bind(host, port)
        except OSError as e:
            raise cannot_listen(what, host, port, e) from None


def _bind(host: str, port: int) -> None:
    """Bind as the listeners do: SO_REUSEADDR, so only a live listener (not a closed
    connection's TIME_WAIT) makes the port busy."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(address)


def serve_metrics(registry, host: str, port: int):
    """Prometheus /metrics of `registry` on host:port, in a thread; returns the HTTP server
    (its server_port is the port taken when `port` is 0)."""
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise cannot_listen("metrics", host, port, e) from None
    return server
