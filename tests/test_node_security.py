"""DICOM TLS with mutual authentication, metrics, and logs without patient names."""

from __future__ import annotations

import re
import ssl
import urllib.request
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .harness import NodeProcess, make_pki, send_raw, wait_for

pytestmark = pytest.mark.slow


def echo(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE", tls_args=(context, "127.0.0.1") if context else None)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_dicom_tls_requires_a_client_certificate(tmp_path: Path, database_url: str) -> None:
    pki = make_pki(tmp_path / "pki")
    node = NodeProcess(
        tmp_path / "node", database_url, workers={"scoring_workers": 0},
        dicom={"tls": {"enabled": True, "certificate": str(pki["server.pem"]), "private_key": str(pki["server.key"]),
                       "ca_certificates": str(pki["ca.pem"])}},
    ).start()
    try:
        trusted = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        trusted.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        assert echo(node.port, trusted)
        anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        assert not echo(node.port, anonymous)  # no client certificate: handshake refused
        assert not echo(node.port, None)  # plain TCP to a TLS port
    finally:
        node.stop()


def test_metrics_and_logs_without_patient_names(tmp_path: Path, database_url: str, phantom_cr: Path) -> None:
    node = NodeProcess(tmp_path / "node", database_url).start()
    try:
        assert send_raw(node.port, phantom_cr) == 0x0000
        url = wait_for(lambda: re.search(r'"url": "(http://127\.0\.0\.1:\d+/metrics)"', node.log), 30, "metrics URL").group(1)

        def scored() -> str | None:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            return text if 'cxrtriage_scored_total{outcome="scored"} 1.0' in text else None

        text = wait_for(scored, 120, "the scored counter")
        assert 'cxrtriage_received_total{status="0x0000"} 1.0' in text
        assert 'cxrtriage_stage_seconds_count{stage="inference"} 1.0' in text
        assert "cxrtriage_queue_depth" in text
        assert "PHANTOM^" not in node.log  # the phantom's patient name never reaches the log
        assert "PHANTOM^" in phantom_cr.read_bytes().decode("latin-1")
    finally:
        node.stop()
