"""Start-up checks that take milliseconds, run before the models load (seconds).

``cxrtriage serve`` calls :func:`preflight` right after reading config.yaml, so
an operator learns about a busy port, a missing TLS file, an unreachable
database or an archive that cannot be written at once, as one line naming
the listener, address, path or key, and not after the model warm-up.
The node binds its listeners through :mod:`.listeners`, so a port taken in
between still ends in the same one-line :class:`~.errors.ListenerError`.
"""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from .config import Settings
from .errors import StartupError
from .listeners import bind


def preflight(settings: Settings) -> None:
    """Raise :class:`StartupError` for the first thing that would stop the node: storage, TLS, then ports."""
    from .ops.checks import check_tls

    require_database(settings.storage.database_url)
    check_archive_writable(Path(settings.storage.archive_dir))
    for tls in check_tls(settings):
        if not tls.ok:
            raise StartupError(tls.what)
    check_ports(settings)


def require_database(url: str) -> None:
    """The database answers (password hidden in the message) and its schema is not newer than this code."""
    from .ops.checks import check_database

    database = check_database(url)
    if not database.ok:
        raise StartupError(f"storage.database_url: {database.what}")


def check_archive_writable(root: Path) -> None:
    """Create ``storage.archive_dir`` (as the node would) and write and remove one file in it."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root, prefix=".preflight-"):
            pass
    except OSError as error:
        raise StartupError(f"storage.archive_dir {root}: cannot be created or written: "
                           f"{error.strerror or error}") from None


def listeners(settings: Settings) -> list[tuple[str, str, int]]:
    """(listener, host, port) of each listener this node's roles open, with a fixed port (0 picks a free one)."""
    wanted = [("dicom", settings.dicom.host, settings.dicom.port)] if settings.node.runs("receiver") else []
    if settings.node.runs("web") and settings.web.enabled:
        wanted.append(("web", settings.web.host, settings.web.port))
    if settings.metrics.enabled:
        wanted.append(("metrics", settings.metrics.host, settings.metrics.port))
    return [(name, host, port) for name, host, port in wanted if port]


def check_ports(settings: Settings) -> None:
    """Bind every listener's address and port, all at once, then close them.

    Each listens while the next is bound: SO_REUSEADDR lets two sockets bind one port until one listens,
    so this is what makes two listeners configured on one port fail here.
    """
    with ExitStack() as held:
        for name, host, port in listeners(settings):
            held.enter_context(bind(name, host, port)).listen(1)
