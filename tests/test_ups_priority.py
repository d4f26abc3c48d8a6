"""UPS Pull C-FIND: an urgent order's workitem is HIGH whatever the AI band (PS3.4 CC.2.5, PS3.3 C.30.2.1).

A real node; studies sent with DCMTK's storescu (ROUTINE and STAT orders) and
with pynetdicom at DIMSE priority HIGH; the workitems asked for over DICOM.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.scp.query import ups_priority

from .harness import NodeProcess, ups_find, wait_for

pytestmark = pytest.mark.slow


def test_urgent_orders_map_to_high() -> None:
    assert ups_priority("low", "STAT", False) == "HIGH"
    assert ups_priority("unscored", "high ", False) == "HIGH"
    assert ups_priority("moderate", "ROUTINE", True) == "HIGH"  # a DIMSE HIGH C-STORE
    assert ups_priority("moderate", "ROUTINE", False) == "MEDIUM"
    assert ups_priority("low", "", False) == "LOW" and ups_priority("critical", "LOW", False) == "HIGH"


def send_dimse_high(port: int, path: Path) -> int:
    """C-STORE with DIMSE Priority HIGH (0000,0700 = 1; storescu has no option for it)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRTRIAGE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(pydicom.dcmread(path), priority=1).Status)
    finally:
        assoc.release()


def test_stat_and_dimse_high_studies_are_high_in_ups(tmp_path: Path, database_url: str) -> None:
    generator = PhantomGenerator(320, 288)
    routine = write_cr(generator(61, affected_zones=()), tmp_path / "routine.dcm", requested_priority="ROUTINE")
    stat = write_cr(generator(62, affected_zones=()), tmp_path / "stat.dcm", requested_priority="STAT")
    dimse = write_cr(generator(63, affected_zones=()), tmp_path / "dimse.dcm")
    uids = {name: str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            for name, path in (("routine", routine), ("stat", stat), ("dimse", dimse))}
    node = NodeProcess(tmp_path / "node", database_url).start()
    try:
        for path in (routine, stat):
            sent = subprocess.run(["/usr/bin/storescu", "-aec", "CXRTRIAGE", "127.0.0.1", str(node.port), str(path)],
                                  capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr
        assert send_dimse_high(node.port, dimse) == 0x0000

        def scored() -> dict[str, str] | None:
            # After scoring the phantoms (no opacity) are low: the orders alone must keep two of them HIGH.
            items = ups_find(node.port)
            found = {str(i.StudyInstanceUID): str(i.ScheduledProcedureStepPriority) for i in items}
            labels = [str(i.ProcedureStepLabel) for i in items]
            return found if len(found) == 3 and not any("unscored" in label for label in labels) else None

        priorities = wait_for(scored, 240, "three scored workitems")
        assert priorities[uids["stat"]] == "HIGH"
        assert priorities[uids["routine"]] == "LOW"
        assert priorities[uids["dimse"]] == "HIGH"
    finally:
        node.stop()
