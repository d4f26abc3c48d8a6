"""The node's HTTP listeners (worklist, metrics), bound so that a busy port is one :class:`ListenerError` line.

The DICOM listener is :func:`.scp.server.start_server`. Each listener is bound
in the calling thread: a port that cannot be bound raises before anything
is served, naming the listener, the address and the port.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from .config import MetricsSettings, WebSettings
from .errors import ListenerError
from .observability import event
from .scp.server import bind_failure

log = logging.getLogger(__name__)


def bind(listener: str, host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` the way the servers bind (SO_REUSEADDR), or :class:`ListenerError`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ListenerError(listener, host, port, f"unknown address ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        if os.name == "posix":  # as uvicorn and pynetdicom do: a port in TIME_WAIT can be bound again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ListenerError(listener, host, port, bind_failure(error)) from None
    return sock


def start_metrics(settings: MetricsSettings, registry: Any) -> Any:
    """Serve Prometheus ``/metrics`` from ``registry`` in a thread; returns the WSGI server (``.shutdown()``)."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(settings.port, addr=settings.host, registry=registry)
    except OSError as error:
        raise ListenerError("metrics", settings.host, settings.port, bind_failure(error)) from None
    event(log, logging.INFO, "metrics", url=f"http://{settings.host}:{server.server_port}/metrics")
    return server


def web_server(app: Any, settings: WebSettings) -> tuple[Any, Callable[[], None]]:
    """A uvicorn server for ``app`` on a socket bound and listening now, and the callable that serves
    (run it in a thread). Connections wait in the backlog until it serves."""
    import uvicorn

    sock = bind("web", settings.host, settings.port)
    sock.listen(2048)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    event(log, logging.INFO, "worklist", url=f"http://{settings.host}:{sock.getsockname()[1]}/")
    return server, lambda: server.run(sockets=[sock])
