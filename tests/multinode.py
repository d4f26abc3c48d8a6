"""Several nodes on one database: a private PostgreSQL cluster, HAProxy, nodes with roles, DCMTK storescu.

The private cluster (initdb + pg_ctl on a free port, data and socket in a
fresh folder under /tmp) is this test's alone: restarting it mid-stream
never touches the shared server on 5432. Nodes reach it through its Unix
socket, so nodes inside a private network namespace (beside Orthanc) and
the test outside it reach the same database: a path-named socket belongs
to no network namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .harness import NodeProcess, free_port, in_netns, port_open, wait_for
from .tools import require

REPO = Path(__file__).resolve().parent.parent
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "cxrtriage.cfg"


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` account then."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class PrivatePostgres:
    """A PostgreSQL cluster of its own, in a temporary folder: start, restart (as ``pg_ctlcluster ... restart``
    does) and stop without touching any other server."""

    def __init__(self, extra_conf: str = "") -> None:
        self.extra_conf = extra_conf  # postgresql.conf lines (bench/scaling.py loads pg_stat_statements)
        self.initdb = shutil.which("initdb") or pytest.skip("initdb not installed (postgresql)")
        self.pg_ctl = shutil.which("pg_ctl") or pytest.skip("pg_ctl not installed (postgresql)")
        self.port = free_port()
        # Not pytest's tmp_path: that is private to root, and the server runs as postgres.
        self.root = Path(tempfile.mkdtemp(prefix="cxrt-pg-"))
        self.data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.started = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL through the Unix socket (reachable from any network namespace)."""
        return f"postgresql://postgres@/postgres?host={self.root}&port={self.port}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run(_as_postgres(list(args)), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise AssertionError(f"{args[:2]} failed: {proc.stdout}{proc.stderr}\n{log[-2000:]}")

    def start(self) -> PrivatePostgres:
        if not self.data.exists():
            self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                      "-E", "UTF8", "--locale=C.UTF-8")
            # fsync off: the cluster's own durability is not under test (a fast restart is a clean shutdown,
            # which writes everything committed), and the shared two-core machine is slow enough.
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                           f"unix_socket_directories = '{self.root}'\nmax_connections = 200\n"
                           "shared_buffers = 32MB\nfsync = off\nfull_page_writes = off\n" + self.extra_conf)
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "start")
        self.started = True
        return self

    def restart(self, while_down: Callable[[], object] | None = None) -> None:
        """``pg_ctl restart -m fast`` (what ``pg_ctlcluster ... restart`` runs): every connection is cut and
        the server is away until it is up again; ``while_down`` runs between the stop and the start (to
        hold the outage until something was seen to fail in it)."""
        self.stop("fast")
        if while_down is not None:
            while_down()
        self.start()

    def stop(self, mode: str = "immediate") -> None:
        if self.started:
            self._run(self.pg_ctl, "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop")
            self.started = False

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def node(workdir: Path, database_url: str, name: str, roles: Sequence[str], *, netns: str | None = None,
         archive: Path | None = None, **overrides: Any) -> NodeProcess:
    """A ``cxrtriage serve`` with ``roles`` (config ``node.roles``), named ``name`` (unique per node: its
    workers' lease holders and its ``nodes`` row carry it), optionally on a shared ``archive`` folder."""
    storage = {"archive_dir": str(archive)} if archive is not None else {}
    storage.update(overrides.pop("storage", {}))
    proc = NodeProcess(workdir, database_url, netns=netns, node_name=name, node={"roles": list(roles)},
                       storage=storage, **overrides)
    return proc


class HAProxy:
    """HAProxy in the foreground with deploy/haproxy/cxrtriage.cfg, its ports and addresses from the
    environment (the file is the one docs/deploy.md shows, not a copy)."""

    def __init__(self, folder: Path, receivers: Sequence[int], *, netns: str | None = None,
                 check_interval_ms: int = 500) -> None:
        self.exe = shutil.which("haproxy") or pytest.skip("haproxy not installed (apt-get install haproxy)")
        self.folder, self.netns = folder, netns
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.stats = folder / "haproxy.sock"
        self.env = {
            **os.environ,
            "CXRTRIAGE_LB_BIND": f"127.0.0.1:{self.port}",
            "CXRTRIAGE_RECEIVER_1": f"127.0.0.1:{receivers[0]}",
            "CXRTRIAGE_RECEIVER_2": f"127.0.0.1:{receivers[1]}",
            "CXRTRIAGE_LB_STATS": str(self.stats),
            "CXRTRIAGE_LB_CHECK_INTER": f"{check_interval_ms}ms",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def check_config(self) -> None:
        proc = subprocess.run([self.exe, "-c", "-f", str(HAPROXY_CFG)], env=self.env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def start(self) -> HAProxy:
        self.check_config()
        log = open(self.folder / "haproxy.log", "ab")
        self.process = subprocess.Popen(in_netns(self.netns, [self.exe, "-db", "-f", str(HAPROXY_CFG)]),
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.port, self.netns) and self.stats.exists(), 30, "HAProxy to listen")
        return self

    def _stat(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the receivers' backend from the admin socket: one row per server."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        lines = b"".join(chunks).decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "receivers" and row.get("svname") not in ("BACKEND", None):
                rows[row["svname"]] = row
        return rows

    def server_states(self) -> dict[str, str]:
        """Each receiver's state as HAProxy sees it: ``UP``, ``DOWN``, ``UP 1/2`` (going down) ..."""
        return {name: row["status"] for name, row in self._stat().items()}

    def check_states(self) -> dict[str, str]:
        """Each receiver's last health check result (``L7OK``, ``L4CON``, ``L7TOUT`` ...)."""
        return {name: row["check_status"] for name, row in self._stat().items()}

    def sessions(self) -> dict[str, int]:
        """Sessions open to each receiver now (health checks are not sessions, so this counts traffic)."""
        return {name: int(row["scur"] or 0) for name, row in self._stat().items()}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@dataclass
class StoreResult:
    """What one storescu run reported: files it was told Success for, and its exit status."""

    acknowledged: list[Path]
    returncode: int
    output: str


def storescu(port: int, files: Sequence[Path], *, netns: str | None = None, timeout: float = 120) -> StoreResult:
    """DCMTK ``storescu`` of ``files`` over one association; which files were answered Success.

    DCMTK logs (``-v``) ``Sending file: <path>`` before each C-STORE and ``Received Store Response
    (Success)`` after it; anything else (a failure status, a cut connection) leaves the file unacknowledged.
    """
    exe = require("storescu", "dcmtk")
    argv = in_netns(netns, [exe, "-v", "-aec", "CXRTRIAGE", "-aet", "MODALITY", "--no-halt",
                            "127.0.0.1", str(port), *map(str, files)])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    acknowledged: list[Path] = []
    current: Path | None = None
    for line in output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = Path(sending[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    return StoreResult(acknowledged, proc.returncode, output)


def sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def phantoms(folder: Path, count: int, seed: int, size: tuple[int, int] = (320, 288)) -> list[Path]:
    """``count`` small synthetic CRs (one study each), written once per folder."""
    from cxrtriage.inference.phantom import PhantomGenerator, write_cr

    folder.mkdir(parents=True, exist_ok=True)
    generator = PhantomGenerator(*size)
    return [write_cr(generator(seed + i), folder / f"img{i:03d}.dcm") for i in range(count)]

