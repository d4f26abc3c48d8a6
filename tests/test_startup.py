"""``cxrtriage serve`` refuses to start with one line naming what is wrong, before the models load.

Each case runs the real command in a subprocess against a real obstacle (a
port held by a listening socket, a closed PostgreSQL port, a file where the
archive should be) and reads what an operator would read.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from .harness import NodeProcess, free_port

SERVE_TIMEOUT = 90  # never reached when the check works: each case fails in about a second


def write_config(folder: Path, **sections: dict[str, Any]) -> Path:
    """A config.yaml with free ports, storage in ``folder``, no scoring threads (nothing to warm up)."""
    config: dict[str, Any] = {
        "inference": {"device": "cpu"},
        "workers": {"scoring_workers": 0},
        "dicom": {"port": free_port()},
        "web": {"port": free_port()},
        "metrics": {"port": free_port()},
        "storage": {"database_url": f"sqlite:///{folder / 'node.db'}", "archive_dir": str(folder / "archive")},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve(config: Path, *options: str) -> tuple[int, str]:
    """``cxrtriage [options] serve -c config``: exit code and stdout + stderr."""
    done = subprocess.run([sys.executable, "-m", "cxrtriage", *options, "serve", "-c", str(config)],
                          capture_output=True, text=True, timeout=SERVE_TIMEOUT, cwd=config.parent,
                          env={**os.environ, "COLUMNS": "300"})
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def assert_one_line_error(code: int, output: str, *expected: str, exit_code: int = 1) -> None:
    assert code == exit_code, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith(("error:", "config error:"))]
    assert errors, output
    for text in expected:
        assert text in errors[0], output
    assert "listening" not in output  # nothing was started before the check failed


@pytest.mark.parametrize("listener", ["dicom", "web", "metrics"])
def test_port_in_use_names_the_listener_and_port(tmp_path: Path, held_port: int, listener: str) -> None:
    config = write_config(tmp_path, **{listener: {"port": held_port}})
    code, output = serve(config)
    assert_one_line_error(code, output, f"{listener} listener cannot bind 127.0.0.1:{held_port}",
                          "address already in use")


def test_two_listeners_on_one_port(tmp_path: Path) -> None:
    port = free_port()
    code, output = serve(write_config(tmp_path, dicom={"port": port}, web={"port": port}))
    assert_one_line_error(code, output, f"web listener cannot bind 127.0.0.1:{port}")


def test_missing_tls_file_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-server.pem"
    key = tmp_path / "server.key"
    key.write_text("not used")
    config = write_config(tmp_path, dicom={"tls": {"enabled": True, "certificate": str(missing),
                                                    "private_key": str(key)}})
    code, output = serve(config)
    assert_one_line_error(code, output, "dicom.tls", str(missing))


def test_unreachable_database_is_named_without_its_password(tmp_path: Path) -> None:
    closed = free_port()
    config = write_config(tmp_path, storage={"database_url": f"postgresql://cx:s3cr3t-pw@127.0.0.1:{closed}/cx"})
    code, output = serve(config)
    assert_one_line_error(code, output, "storage.database_url", f"127.0.0.1:{closed}", "unreachable")
    assert "s3cr3t-pw" not in output


def test_archive_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the archive cannot be a folder below a file")
    archive = blocker / "archive"
    code, output = serve(write_config(tmp_path, storage={"archive_dir": str(archive)}))
    assert_one_line_error(code, output, "storage.archive_dir", str(archive))


def test_log_file_that_cannot_be_opened(tmp_path: Path) -> None:
    log_file = tmp_path / "no-such-folder" / "node.log"
    code, output = serve(write_config(tmp_path, logging={"file": str(log_file)}))
    assert_one_line_error(code, output, "logging.file", str(log_file))


def test_bad_config_value_keeps_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, dicom={"port": 70000})
    code, output = serve(config)
    assert_one_line_error(code, output, str(config), "dicom.port", "70000", exit_code=2)


def test_debug_shows_the_traceback(tmp_path: Path, held_port: int) -> None:
    code, output = serve(write_config(tmp_path, web={"port": held_port}), "--debug")
    assert code == 1 and "Traceback" in output and "ListenerError" in output, output


def test_a_listener_failing_half_way_stops_what_started(tmp_path: Path, held_port: int) -> None:
    """Past the pre-flight check (a port taken in between), the node stops the DICOM listener it had
    started and the error is the same ListenerError."""
    from cxrtriage.config import load_settings
    from cxrtriage.errors import ListenerError
    from cxrtriage.node import Node

    settings = load_settings(write_config(tmp_path, metrics={"port": held_port}, workers={"send_workers": 0}))
    node = Node(settings)
    with pytest.raises(ListenerError, match=f"metrics listener cannot bind 127.0.0.1:{held_port}"):
        node.start()
    with socket.socket() as again:  # the DICOM port was released
        again.bind((settings.dicom.host, settings.dicom.port))
    assert node.stopping.is_set()


@pytest.fixture(scope="module")
def started_twice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, str]]:
    """A node started, stopped, restarted with two settings changed (one a secret), restarted unchanged."""
    workdir = tmp_path_factory.mktemp("audit")
    url = f"sqlite:///{workdir / 'node.db'}"
    secret = "web-token-never-in-the-database"
    first_port, second_port = free_port(), free_port()
    for port, token in ((first_port, None), (second_port, secret), (second_port, secret)):
        node = NodeProcess(workdir, url, port=port, workers={"scoring_workers": 0, "send_workers": 0},
                           web={"token": token})
        node.start()
        node.web_url()  # served from the socket the node bound
        node.stop()
        assert node.process is not None and node.process.returncode == 0, node.log[-2000:]
    yield node, secret


def test_config_change_is_audited_by_key_name_only(started_twice: tuple[NodeProcess, str]) -> None:
    from sqlalchemy import select

    from cxrtriage.storage.models import AuditEvent

    node, secret = started_twice
    db = node.db()
    try:
        with db.session() as session:
            rows = session.scalars(select(AuditEvent).where(AuditEvent.action == "config_changed")
                                   .order_by(AuditEvent.id)).all()
            dump = [(r.actor, r.detail) for r in rows]
    finally:
        db.dispose()
    assert [actor for actor, _ in dump] == ["node:testnode"] * 2, dump  # first start, one change, none
    first, second = (json.loads(detail) for _, detail in dump)
    assert "web.token" in first["changed"] and "dicom.port" in first["changed"]
    assert second["changed"] == ["dicom.port", "web.token"]
    assert secret not in json.dumps(dump)
    assert all(len(digest) == 16 for digest in second["fingerprint"].values())  # salted hashes, no values
    assert second["fingerprint"]["web.token"] != first["fingerprint"]["web.token"]


def test_other_commands_name_an_unreachable_database(tmp_path: Path) -> None:
    closed = free_port()
    config = write_config(tmp_path, storage={"database_url": f"postgresql://cx:s3cr3t-pw@127.0.0.1:{closed}/cx"})
    done = subprocess.run([sys.executable, "-m", "cxrtriage", "archive", "verify", "-c", str(config)],
                          capture_output=True, text=True, timeout=SERVE_TIMEOUT)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "Traceback" not in output and "s3cr3t-pw" not in output, output
    assert f"storage.database_url: database postgresql://cx:***@127.0.0.1:{closed}/cx unreachable" in output


def test_config_audit_on_each_database(database: Any) -> None:
    """The same diff on SQLite and PostgreSQL: first start (all keys), a change (its keys), no change (no event)."""
    from cxrtriage.config import Settings
    from cxrtriage.config_audit import record_config_change

    base = Settings()
    assert len(record_config_change(database, base)) > 50
    changed = base.model_copy(update={"web": base.web.model_copy(update={"readers": {"ann": "pw-of-ann"}})})
    assert record_config_change(database, changed) == ["web.readers"]
    assert record_config_change(database, changed) == []
    with database.session() as session:
        details = [row[0] for row in session.execute(sa.text("SELECT detail FROM audit_events"))]
    assert len(details) == 2 and not any("pw-of-ann" in d or "ann" in json.loads(d)["changed"] for d in details)
