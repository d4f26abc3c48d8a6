"""Orthanc as the PACS, in a private network namespace (Orthanc 1.10 binds all interfaces).

Orthanc, the node and every client run inside a namespace whose only
interface is loopback, so nothing listens on the machine's real network.
The node uses SQLite here: the PostgreSQL server is outside the namespace.
One Orthanc serves the module, with its DICOMweb plugin and HTTP Basic
authentication (the STOW-RS destination's credentials); each test starts
from an empty Orthanc.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from cxrtriage.inference.phantom import PhantomGenerator, write_cr

from .harness import NodeProcess, port_open, private_netns, wait_for
from .tools import require

pytestmark = pytest.mark.slow

ORTHANC_HTTP, ORTHANC_DICOM = 8042, 4242
ORTHANC_USER, ORTHANC_PASSWORD = "cxrtriage", "stow-secret"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
_AUTH = "Basic " + base64.b64encode(f"{ORTHANC_USER}:{ORTHANC_PASSWORD}".encode()).decode()


def rest(netns: str, method: str, path: str, body: bytes | dict | None = None) -> object:
    """Call Orthanc's REST API (or its DICOMweb root) from inside the namespace."""
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    script = (
        "import sys, urllib.request\n"
        f"req = urllib.request.Request('http://127.0.0.1:{ORTHANC_HTTP}{path}', method='{method}', "
        f"data=sys.stdin.buffer.read() or None, headers={{'Authorization': '{_AUTH}'}})\n"
        "sys.stdout.write(urllib.request.urlopen(req, timeout=60).read().decode())\n"
    )
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script], input=payload or b"",
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout) if proc.stdout.strip() else None


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    with private_netns() as name:
        yield name


class Orthanc:
    """One Orthanc in the namespace, with DICOMweb; stopped and started again on the same storage."""

    node_port = 11112

    def __init__(self, exe: str, folder: Path, netns: str) -> None:
        self.exe, self.folder, self.netns = exe, folder, netns
        self.process: subprocess.Popen | None = None
        config = {
            "Name": "cxrtriage-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": ORTHANC_HTTP,
            "DicomPort": ORTHANC_DICOM,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {"cxrtriage": ["CXRTRIAGE", "127.0.0.1", self.node_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (folder / "orthanc.json").write_text(json.dumps(config))

    def start(self) -> None:
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen(["ip", "netns", "exec", self.netns, self.exe, "--logdir=" + str(self.folder),
                                         str(self.folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(ORTHANC_HTTP, self.netns), 60, "Orthanc's REST API")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        wait_for(lambda: not port_open(ORTHANC_HTTP, self.netns), 30, "Orthanc to stop")

    def empty(self) -> None:
        for patient in rest(self.netns, "GET", "/patients") or []:  # type: ignore[union-attr]
            rest(self.netns, "DELETE", f"/patients/{patient}")


@pytest.fixture(scope="module")
def orthanc_server(netns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    exe = shutil.which("Orthanc") or pytest.skip("Orthanc not installed (apt-get install orthanc)")
    server = Orthanc(exe, tmp_path_factory.mktemp("orthanc"), netns)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc(orthanc_server: Orthanc) -> Orthanc:
    """The module's Orthanc, running and empty."""
    if orthanc_server.process is None or orthanc_server.process.poll() is not None:
        orthanc_server.start()
    orthanc_server.empty()
    return orthanc_server


def modalities_in_orthanc(netns: str) -> list[str]:
    series = rest(netns, "GET", "/series?expand") or []
    return sorted(s["MainDicomTags"].get("Modality", "") for s in series)  # type: ignore[union-attr]


def test_orthanc_as_pacs(tmp_path: Path, netns: str, orthanc: Orthanc) -> None:
    node = NodeProcess(
        tmp_path / "node", f"sqlite:///{tmp_path / 'node.db'}", netns=netns, port=orthanc.node_port,
        destinations=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": ORTHANC_DICOM}],
    ).start()
    try:
        generator = PhantomGenerator(448, 416)
        first = write_cr(generator(4_400_000, affected_zones=(0, 1, 3)), tmp_path / "first.dcm")
        storescu = require("storescu", "dcmtk")
        sent = subprocess.run(["ip", "netns", "exec", netns, storescu, "-aet", "MODALITY", "-aec", "CXRTRIAGE",
                               "127.0.0.1", str(node.port), str(first)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        # The node's SEG and SR arrive in Orthanc and are listed by its REST API.
        wait_for(lambda: modalities_in_orthanc(netns) == ["SEG", "SR"], 300, "SEG and SR in Orthanc")
        study_uid = pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID
        found = rest(netns, "POST", "/tools/lookup", study_uid.encode())
        assert found and found[0]["Type"] == "Study"  # type: ignore[index]

        # Orthanc sends an image to the node, which scores it and sends the results back.
        second = write_cr(generator(4_400_001), tmp_path / "second.dcm")
        uploaded = rest(netns, "POST", "/instances", second.read_bytes())
        job = rest(netns, "POST", "/modalities/cxrtriage/store", {"Resources": [uploaded["ID"]], "Synchronous": True})  # type: ignore[index]
        assert job is not None
        # both results of the image Orthanc sent: its SR may land after its SEG, so wait for the whole list
        wait_for(lambda: modalities_in_orthanc(netns) == ["CR", "SEG", "SEG", "SR", "SR"], 300,
                 "results of the image Orthanc sent")

        # Orthanc queries the node with C-FIND through its REST API.
        query = rest(netns, "POST", "/modalities/cxrtriage/query",
                     {"Level": "Study", "Query": {"StudyInstanceUID": study_uid, "PatientID": "", "ModalitiesInStudy": ""}})
        answers = rest(netns, "GET", f"/queries/{query['ID']}/answers?expand&simplify")  # type: ignore[index]
        assert len(answers) == 1  # type: ignore[arg-type]
        answer = answers[0]  # type: ignore[index]
        assert answer["StudyInstanceUID"] == study_uid
        assert set(answer["ModalitiesInStudy"].split("\\")) == {"CR", "SEG", "SR"}
        # Orthanc 1.10 keeps only the keys it considers part of the study level,
        # so the severity elements (tests/test_node.py checks them) do not show here.
    finally:
        node.stop()


def series_by_modality(netns: str, study_uid: str) -> dict[str, int]:
    """QIDO-RS (PS3.18 10.6): the study's series in Orthanc, as {modality: instances}."""
    try:
        series = rest(netns, "GET", f"/dicom-web/studies/{study_uid}/series?includefield=00201209") or []
    except AssertionError:  # 404 until the study exists
        return {}
    return {s["00080060"]["Value"][0]: s["00201209"]["Value"][0] for s in series}  # type: ignore[union-attr,index]


def send_jobs(database: Path) -> list[tuple[str, int, str]]:
    """(state, attempts, last_error) of the node's send jobs, read from its SQLite file."""
    with sqlite3.connect(database) as conn:
        return list(conn.execute("SELECT state, attempts, last_error FROM jobs WHERE kind = 'send'"))


def test_stow_rs_destination_survives_an_outage(tmp_path: Path, netns: str, orthanc: Orthanc) -> None:
    """SEG, SR and the Secondary Capture reach Orthanc's DICOMweb by STOW-RS (HTTP Basic); while Orthanc is
    down the sends wait, and once it is back everything arrives, once."""
    assert DICOMWEB_PLUGIN.exists(), "the Orthanc DICOMweb plugin is missing (apt-get install orthanc-dicomweb)"
    database = tmp_path / "node.db"
    node = NodeProcess(
        tmp_path / "node", f"sqlite:///{database}", netns=netns, port=orthanc.node_port,
        destinations=[{"ae_title": "ORTHANCWEB", "type": "dicomweb", "url": f"http://127.0.0.1:{ORTHANC_HTTP}/dicom-web",
                       "username": ORTHANC_USER, "password": ORTHANC_PASSWORD}],
        results={"secondary_capture": True},
        workers={"breaker_failures": 2, "breaker_open_seconds": 1.0, "send_connect_timeout": 2.0},
    ).start()
    storescu = require("storescu", "dcmtk")

    def store(path: Path) -> str:
        sent = subprocess.run(["ip", "netns", "exec", netns, storescu, "-aet", "MODALITY", "-aec", "CXRTRIAGE",
                               "127.0.0.1", str(node.port), str(path)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)

    expected = {"SEG": 1, "SR": 1, "OT": 1}
    try:
        generator = PhantomGenerator(448, 416)
        first = store(write_cr(generator(4_500_000, affected_zones=(0, 3)), tmp_path / "first.dcm"))
        wait_for(lambda: series_by_modality(netns, first) == expected, 120, "SEG, SR and SC via STOW-RS")

        orthanc.stop()
        second = store(write_cr(generator(4_500_001), tmp_path / "second.dcm"))
        # The sends fail while Orthanc is down (connection refused), and are kept for later.
        wait_for(lambda: any(error for _, _, error in send_jobs(database)), 300, "a failed STOW-RS attempt")
        assert all(state != "failed" for state, _, _ in send_jobs(database))
        orthanc.start()
        wait_for(lambda: series_by_modality(netns, second) == expected, 300, "the results sent after the outage")
        wait_for(lambda: all(state == "done" for state, _, _ in send_jobs(database)), 60, "every send job done")
        assert len(send_jobs(database)) == 6
        assert series_by_modality(netns, first) == expected  # nothing sent twice (one instance per series)
        statistics = rest(netns, "GET", "/statistics")
        assert statistics["CountInstances"] == 6  # type: ignore[index]
    finally:
        node.stop()
