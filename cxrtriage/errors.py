"""Errors that stop the node before it serves: the command prints them as one line, without a traceback."""

from __future__ import annotations


class StartupError(Exception):
    """The node cannot start; ``str()`` is the whole, one-line message an operator reads."""


class ListenerError(StartupError):
    """A listener (``dicom``, ``web`` or ``metrics``) could not bind its address and port."""

    def __init__(self, listener: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"{listener} listener cannot bind {host}:{port}: {reason}")
        self.listener, self.host, self.port, self.reason = listener, host, port, reason
