"""Real processes for network tests (the node, DCMTK storescp, network namespaces) and the
clients the tests talk to them with (raw C-STORE, UPS C-FIND, the REST API)."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy import insert

from cxrtriage.storage.models import Instance, Reading, ScoreResult

from .tools import require

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int, netns: str | None = None) -> bool:
    if netns:
        probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"
        return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", probe], capture_output=True).returncode == 0
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


class NodeProcess:
    """``cxrtriage serve`` in a subprocess with its own config, archive and database."""

    def __init__(self, workdir: Path, database_url: str, *, netns: str | None = None, **overrides: Any) -> None:
        self.workdir = workdir
        self.port = overrides.pop("port", None) or free_port()
        self.netns = netns
        workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "node_name": "testnode",
            "storage": {"database_url": database_url, "archive_dir": str(workdir / "archive"), "min_free_mb": 1},
            "dicom": {"port": self.port, "ae_title": "CXRTRIAGE"},
            "metrics": {"port": 0},
            "web": {"port": 0},
            "workers": {"backoff_seconds": 0.3, "backoff_max_seconds": 2.0, "poll_seconds": 0.1},
            "logging": {"file": str(workdir / "node.log")},
        }
        for section, values in overrides.items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.database_url = database_url
        self.process: subprocess.Popen | None = None

    @property
    def log(self) -> str:
        path = self.workdir / "node.log"
        return path.read_text() if path.exists() else ""

    def start(self, timeout: float = 120) -> NodeProcess:
        self.log_offset = len(self.log)  # the log file is shared with earlier runs in the same folder
        argv = in_netns(self.netns, [sys.executable, "-m", "cxrtriage", "serve", "-c", str(self.config_path)])
        out = open(self.workdir / "stdout.log", "ab")
        self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir)
        roles = yaml.safe_load(self.config_path.read_text()).get("node", {}).get("roles", ["receiver"])
        if "receiver" in roles:
            wait_for(lambda: port_open(self.port, self.netns) or self.process.poll() is not None, timeout,
                     "the node to listen")
        else:  # no DICOM port to wait for
            wait_for(lambda: '"node started"' in self.log[self.log_offset:] or self.process.poll() is not None,
                     timeout, "the node to start")
        if self.process.poll() is not None:
            raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log[-3000:]}")
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up, as in a power cut or an OOM kill."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def web_url(self) -> str:
        """Base URL of the worklist web server (from the node's log)."""
        import re

        match = wait_for(lambda: re.search(r'"msg": "worklist", "url": "(http://[^"]+)/"', self.log[self.log_offset:]),
                         60, "the web server")
        return match.group(1)

    def db(self):  # type: ignore[no-untyped-def]
        from cxrtriage.storage.db import Database

        return Database(self.database_url)


class StoreSCP:
    """DCMTK ``storescp`` writing what it receives into a folder, one file per SOP instance."""

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None, netns: str | None = None) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        self.netns = netns
        folder.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        exe = require("storescp", "dcmtk")
        argv = in_netns(self.netns, [exe, "-aet", self.ae_title, "-od", str(self.folder), "+B", str(self.port)])
        self.log = open(self.folder.parent / f"storescp-{self.port}.log", "ab")
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.port, self.netns), 30, "storescp to listen")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file() and not p.name.endswith(".log"))


class RecordingSCP:
    """An in-process pynetdicom storage SCP on 127.0.0.1 that keeps what arrives, byte for byte.

    Each C-STORE is kept as (transfer syntax, the dataset bytes exactly as
    received) and answered with ``status``.
    """

    def __init__(self, ae_title: str = "PACS", status: int = 0x0000, sop_classes: tuple[str, ...] = (),
                 transfer_syntaxes: tuple[str, ...] = ()) -> None:
        self.ae_title = ae_title
        self.status = status
        self.sop_classes = sop_classes
        self.transfer_syntaxes = transfer_syntaxes  # empty: every syntax pynetdicom knows
        self.port = free_port()
        self.received: list[tuple[str, bytes]] = []
        self.server: Any = None

    def start(self) -> RecordingSCP:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import Comprehensive3DSRStorage, SegmentationStorage  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        for sop_class in self.sop_classes or (SegmentationStorage, Comprehensive3DSRStorage):
            ae.add_supported_context(sop_class, list(self.transfer_syntaxes) or ALL_TRANSFER_SYNTAXES)

        def keep(event: Any) -> int:
            self.received.append((str(event.context.transfer_syntax), event.request.DataSet.getvalue()))
            return self.status

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, keep)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def netns_available() -> bool:
    return os.geteuid() == 0 and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


# -- clients -------------------------------------------------------------

#: What send_raw returns when no presentation context was accepted.
NO_CONTEXT = "no presentation context"


def send_raw(port: int, path: Path) -> int | str:
    """C-STORE a file's dataset bytes exactly as they are, whatever they contain.

    The request is built from DIMSE primitives, so nothing in the dataset is
    parsed on the sending side; the presentation context is the file meta's
    SOP class and transfer syntax.
    """
    meta = read_file_meta_info(path)
    data = path.read_bytes()
    offset = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    sop_uid = meta.MediaStorageSOPInstanceUID
    return send_dataset_bytes(port, meta.MediaStorageSOPClassUID, sop_uid if UID_OK(sop_uid) else "1.2.3.4",
                              meta.TransferSyntaxUID, data[offset:])


def send_dataset_bytes(port: int, sop_class: str, sop_uid: str, transfer_syntax: str, data: bytes, *,
                       calling_aet: str = "MODALITY", timeout: float | None = None) -> int | str:
    """C-STORE ``data`` as the dataset, unparsed, on a context of ``sop_class`` and ``transfer_syntax``."""
    ae = AE(ae_title=calling_aet)
    if timeout is not None:
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
    if not assoc.is_established:
        return NO_CONTEXT
    try:
        if not assoc.accepted_contexts:
            return NO_CONTEXT
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = sop_class
        request.AffectedSOPInstanceUID = sop_uid
        request.Priority = 2
        request.DataSet = io.BytesIO(data)
        context = assoc.accepted_contexts[0]
        # As Association.send_c_store does: pause the reactor thread so that
        # it does not take the response off the queue first.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(request, context.context_id)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        return int(response.Status) if response is not None else "no response"
    finally:
        if assoc.is_established:
            assoc.release()


def UID_OK(value: str) -> bool:
    return all(part.isdigit() for part in str(value).split("."))


def call(url: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> tuple[int, object]:
    request = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def ups_find(port: int, **keys: str) -> list:
    from pydicom import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import UnifiedProcedureStepPull  # type: ignore[attr-defined]

    ae = AE(ae_title="READER")
    ae.add_requested_context(UnifiedProcedureStepPull)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
    assert assoc.is_established
    query = Dataset()
    for keyword in ("StudyInstanceUID", "ScheduledProcedureStepPriority", "ProcedureStepLabel", "AccessionNumber"):
        setattr(query, keyword, "")
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    items = [identifier for status, identifier in assoc.send_c_find(query, UnifiedProcedureStepPull)
             if status and status.Status in (0xFF00, 0xFF01)]
    assoc.release()
    return items


def fill_random_studies(db: Any, studies: int, seed: int, now: dt.datetime, *, ranked: bool = True) -> None:
    """Random studies straight into the database (pending, failed, one lung or no lung found, STAT orders,
    DIMSE HIGH, overdue, claimed and read), in bulk; ``ranked``: their study_ranks rows too."""
    rng = random.Random(seed)
    instances: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    readings: list[dict[str, Any]] = []
    for s in range(studies):
        uid = f"1.2.826.0.1.3680043.10.998.{seed}.{s}"
        # most within their band's maximum wait (where severity orders them), some far past it
        received = now - dt.timedelta(minutes=rng.uniform(0, 1500) if rng.random() < 0.1 else rng.uniform(0, 100))
        for i in range(rng.randint(1, 3)):
            iid = len(instances) + 1
            instances.append({
                "id": iid, "sop_instance_uid": f"{uid}.{i}", "sop_class_uid": CR_STORAGE,
                "transfer_syntax_uid": "1.2.840.10008.1.2.1", "study_instance_uid": uid,
                "series_instance_uid": f"{uid}.1", "modality": rng.choice(["CR", "DX"]), "kind": "source",
                "path": f"{uid}/{i}.dcm", "sha256": f"{iid:064x}", "size": 1,
                "requested_priority": rng.choice(["", "", "", "ROUTINE", "stat ", "HIGH", "LOW"]),
                "dimse_priority": rng.choice([None, 0, 1, 2]),
                "received_at": received + dt.timedelta(seconds=i),
            })
            roll = rng.random()
            if roll < 0.1:
                continue  # pending
            if roll < 0.15:
                status = rng.choice(["failed", "not_scorable"])
                results.append({"instance_id": iid, "study_instance_uid": uid, "status": status,
                                "total_score": None, "brixia_total": None, "zones_scored": None, "p_disease": None,
                                "details": "{}"})
                continue
            total = rng.randint(0, 6)
            zones = rng.choice([6, 6, 6, 6, 3, 0, None])
            results.append({"instance_id": iid, "study_instance_uid": uid, "status": "scored", "total_score": total,
                            "brixia_total": rng.randint(0, 20), "zones_scored": zones,
                            "p_disease": round(rng.random(), 6), "details": "{}"})
        roll = rng.random()
        if roll < 0.3:
            state = "read" if roll < 0.15 else rng.choice(["claimed", "unread"])
            readings.append({"study_instance_uid": uid, "state": state,
                             "reader": "dr_a", "updated_at": now})
    with db.engine.begin() as conn:
        for table, rows in ((Instance, instances), (ScoreResult, results), (Reading, readings)):
            if rows:
                conn.execute(insert(table), rows)
    if ranked:
        from cxrtriage.triage.study_rank import rebuild

        with db.session() as session:  # bulk rows bypass the writers that keep study_ranks current
            rebuild(session)


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl (P-256 keys:
    a fraction of RSA's key generation time)."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key",
        "-out", "ca.pem", "-days", "2", "-subj", "/CN=cxrtriage test CA")
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(extra + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def cli(*args: str) -> tuple[int, str]:
    """Run the ``cxrtriage`` command in-process (typer's CliRunner, a wide terminal): exit code and output."""
    from typer.testing import CliRunner

    from cxrtriage.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def overdue_critical_studies(db: Any, first: int, count: int) -> list[str]:
    """Scored, unread studies of the critical band received two hours ago (past any deadline)."""
    from cxrtriage.triage.study_rank import refresh_study

    uids = []
    with db.session() as session:
        for k in range(first, first + count):
            study = f"1.2.826.0.1.3680043.10.995.{k}"
            row = Instance(sop_instance_uid=f"{study}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                           transfer_syntax_uid="1.2.840.10008.1.2.1", study_instance_uid=study,
                           series_instance_uid=f"{study}.2", path="x.dcm", sha256=f"{k:064x}", size=1,
                           modality="CR", kind="source", received_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
            session.add(row)
            session.flush()
            session.add(ScoreResult(instance_id=row.id, study_instance_uid=study, status="scored", total_score=6,
                                    brixia_total=18, p_disease=0.99, zones_scored=6))
            session.flush()
            refresh_study(session, study)
            uids.append(study)
    return uids


@contextlib.contextmanager
def private_netns(prefix: str = "cxrt") -> Iterator[str]:
    """A network namespace with loopback only (Orthanc listens on all interfaces: it runs in here)."""
    import uuid

    import pytest

    if not netns_available():
        pytest.skip("network namespaces need root and iproute2 (ip netns)")
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
