"""Orthanc as the PACS, in a private network namespace (Orthanc 1.10 binds all interfaces).

Orthanc, the node and every client run inside a namespace whose only
interface is loopback, so nothing listens on the machine's real network.
The node uses SQLite here: the PostgreSQL server is outside the namespace.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pydicom
import pytest

from cxrtriage.inference.phantom import PhantomGenerator, write_cr

from .harness import NodeProcess, netns_available, port_open, wait_for
from .tools import require

pytestmark = pytest.mark.slow

ORTHANC_HTTP, ORTHANC_DICOM = 8042, 4242


def rest(netns: str, method: str, path: str, body: bytes | dict | None = None) -> object:
    """Call Orthanc's REST API from inside the namespace."""
    payload = json.dumps(body).encode() if isinstance(body, dict) else body
    script = (
        "import sys, urllib.request\n"
        f"req = urllib.request.Request('http://127.0.0.1:{ORTHANC_HTTP}{path}', method='{method}', data=sys.stdin.buffer.read() or None)\n"
        "sys.stdout.write(urllib.request.urlopen(req, timeout=60).read().decode())\n"
    )
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script], input=payload or b"",
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout) if proc.stdout.strip() else None


@pytest.fixture
def netns():
    if not netns_available():
        pytest.skip("network namespaces need root and iproute2 (ip netns)")
    name = f"cxrt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def orthanc(netns: str, tmp_path: Path):
    exe = shutil.which("Orthanc") or pytest.skip("Orthanc not installed (apt-get install orthanc)")
    folder = tmp_path / "orthanc"
    folder.mkdir()
    node_port = 11112
    config = {
        "Name": "cxrtriage-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": ORTHANC_HTTP,
        "DicomPort": ORTHANC_DICOM,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {"cxrtriage": ["CXRTRIAGE", "127.0.0.1", node_port]},
        "Plugins": [],
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen(["ip", "netns", "exec", netns, exe, "--logdir=" + str(folder), str(folder / "orthanc.json")],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: port_open(ORTHANC_HTTP, netns), 60, "Orthanc's REST API")
        yield {"node_port": node_port}
    finally:
        process.terminate()
        process.wait(timeout=60)


def modalities_in_orthanc(netns: str) -> list[str]:
    series = rest(netns, "GET", "/series?expand") or []
    return sorted(s["MainDicomTags"].get("Modality", "") for s in series)  # type: ignore[union-attr]


def test_orthanc_as_pacs(tmp_path: Path, netns: str, orthanc: dict) -> None:
    node = NodeProcess(
        tmp_path / "node", f"sqlite:///{tmp_path / 'node.db'}", netns=netns, port=orthanc["node_port"],
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
        wait_for(lambda: modalities_in_orthanc(netns).count("SEG") == 2, 300, "results of the image Orthanc sent")
        assert modalities_in_orthanc(netns) == ["CR", "SEG", "SEG", "SR", "SR"]

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
