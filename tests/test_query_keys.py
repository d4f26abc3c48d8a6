"""Query/Retrieve by the standard against the real node, driven by DCMTK and pynetdicom.

* C-GET and C-MOVE need the unique keys of their level and the levels above
  (PS3.4 C.4.2.2.1, C.4.3.2): without them, or with a wild card or empty
  value, the answer is 0xA900 "Identifier does not match SOP Class" with an
  Error Comment naming the key, and nothing is sent (never the whole archive).
* C-FIND wild cards are ``*`` and ``?`` only (PS3.4 C.2.2.2.4): ``[``, ``]``,
  ``%`` and ``_`` match themselves, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from cxrtriage.inference.phantom import PhantomGenerator, write_cr

from .harness import NodeProcess, StoreSCP
from .tools import require

pytestmark = pytest.mark.slow

#: Patient IDs whose characters are LIKE or GLOB syntax; each its own study.
PATIENTS = ("PID[1]", "PID1", "P_1", "PX1", "P%1")


def _images(folder: Path) -> list[Path]:
    generator = PhantomGenerator(64, 56)  # never scored here: the size does not matter
    return [write_cr(generator(2_300_000 + i), folder / f"cr{i}.dcm", patient_id=pid)
            for i, pid in enumerate(PATIENTS)]


def _store(port: int, files: list[Path]) -> None:
    sent = subprocess.run([require("storescu", "dcmtk"), "-aec", "CXRTRIAGE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr


@pytest.fixture
def node(tmp_path: Path, database_url: str) -> Iterator[tuple[NodeProcess, StoreSCP, list[Dataset]]]:
    mover = StoreSCP(tmp_path / "moved", "MOVESCP").start()
    node = NodeProcess(tmp_path / "node", database_url, workers={"scoring_workers": 0},
                       dicom={"move_destinations": [{"ae_title": "MOVESCP", "host": "127.0.0.1",
                                                     "port": mover.port}]}).start()
    files = _images(tmp_path / "in")
    try:
        _store(node.port, files)
        yield node, mover, [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    finally:
        node.stop()
        mover.stop()


def _dcmtk(tool: str, port: int, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require(tool, "dcmtk"), "-v", "-aet", "VIEWER", "-aec", "CXRTRIAGE", *args,
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=120, cwd=cwd)


def _keys(**keys: str) -> list[str]:
    return [arg for keyword, value in keys.items() for arg in ("-k", f"{keyword}={value}")]


def test_retrieve_without_unique_keys_is_refused(tmp_path: Path, node: tuple) -> None:
    proc, mover, headers = node
    first = headers[0]
    refused = [
        ("-S", dict(QueryRetrieveLevel="STUDY")),  # no key at all: the whole archive before
        ("-S", dict(QueryRetrieveLevel="STUDY", PatientID=first.PatientID)),  # not the study's unique key
        ("-S", dict(QueryRetrieveLevel="STUDY", StudyInstanceUID="*")),  # universal matching
        ("-S", dict(QueryRetrieveLevel="STUDY", StudyInstanceUID="")),
        ("-S", dict(QueryRetrieveLevel="SERIES", SeriesInstanceUID=first.SeriesInstanceUID)),  # no study UID
        ("-S", dict(QueryRetrieveLevel="IMAGE", StudyInstanceUID=first.StudyInstanceUID,
                    SeriesInstanceUID=first.SeriesInstanceUID)),  # no SOP Instance UID
        ("-P", dict(QueryRetrieveLevel="PATIENT", PatientID="PID*")),  # wild card
        ("-P", dict(QueryRetrieveLevel="STUDY", StudyInstanceUID=first.StudyInstanceUID)),  # no Patient ID
    ]
    for model, keys in refused:
        out = tmp_path / f"got{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        got = _dcmtk("getscu", proc.port, model, *_keys(**keys), "-od", str(out))
        assert "DataSetDoesNotMatchSOPClass" in got.stderr, (keys, got.stderr)
        assert list(out.iterdir()) == [], keys
        moved = _dcmtk("movescu", proc.port, model, "-aem", "MOVESCP", *_keys(**keys))
        assert "DataSetDoesNotMatchSOPClass" in moved.stderr, (keys, moved.stderr)
    assert mover.received() == []


def test_retrieve_with_unique_keys_sends_exactly_those(tmp_path: Path, node: tuple) -> None:
    proc, mover, headers = node
    first, second = headers[0], headers[1]
    one, both = {str(first.SOPInstanceUID)}, {str(first.SOPInstanceUID), str(second.SOPInstanceUID)}
    accepted = [
        ("-S", dict(QueryRetrieveLevel="STUDY", StudyInstanceUID=first.StudyInstanceUID), one),
        ("-S", dict(QueryRetrieveLevel="STUDY",  # a list of UIDs at the retrieve level
                    StudyInstanceUID=f"{first.StudyInstanceUID}\\{second.StudyInstanceUID}"), both),
        ("-S", dict(QueryRetrieveLevel="IMAGE", StudyInstanceUID=first.StudyInstanceUID,
                    SeriesInstanceUID=first.SeriesInstanceUID, SOPInstanceUID=first.SOPInstanceUID), one),
        ("-P", dict(QueryRetrieveLevel="PATIENT", PatientID="PID[1]"), one),  # `[` is no wild card
        ("-P", dict(QueryRetrieveLevel="STUDY", PatientID=first.PatientID,
                    StudyInstanceUID=first.StudyInstanceUID), one),
    ]
    for k, (model, keys, expected) in enumerate(accepted):
        out = tmp_path / f"got{k}"
        out.mkdir()
        got = _dcmtk("getscu", proc.port, model, *_keys(**keys), "-od", str(out))
        assert got.returncode == 0 and "DataSetDoesNotMatchSOPClass" not in got.stderr, (keys, got.stderr)
        received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()}
        assert received == expected, keys
    moved = _dcmtk("movescu", proc.port, "-S", "-aem", "MOVESCP",
                   *_keys(QueryRetrieveLevel="STUDY", StudyInstanceUID=second.StudyInstanceUID))
    assert moved.returncode == 0 and "Failed" not in moved.stderr, moved.stderr
    assert [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in mover.received()] == [
        str(second.SOPInstanceUID)]


def test_refusal_names_the_missing_key(node: tuple) -> None:
    """The Error Comment says what is missing (and carries no dataset values)."""
    proc, _, headers = node
    ae = AE(ae_title="VIEWER")
    for model in (StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet):
        ae.add_requested_context(model)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", proc.port, ae_title="CXRTRIAGE",
                         ext_neg=[build_role(ComputedRadiographyImageStorage, scp_role=True)])
    assert assoc.is_established
    try:
        def comment(model: str, **keys: str) -> tuple[int, str]:
            query = Dataset()
            for keyword, value in keys.items():
                setattr(query, keyword, value)
            final = [status for status, _ in assoc.send_c_get(query, model) if status][-1]
            return int(final.Status), str(final.get("ErrorComment", ""))

        status, text = comment(StudyRootQueryRetrieveInformationModelGet, QueryRetrieveLevel="STUDY",
                               PatientID=headers[0].PatientID)
        assert status == 0xA900 and "StudyInstanceUID missing" in text and "PID" not in text
        status, text = comment(PatientRootQueryRetrieveInformationModelGet, QueryRetrieveLevel="PATIENT",
                               PatientID="P*")
        assert status == 0xA900 and "PatientID" in text and "wild card" in text
        status, text = comment(StudyRootQueryRetrieveInformationModelGet, QueryRetrieveLevel="WARD")
        assert status == 0xA900 and "Query/Retrieve Level" in text
    finally:
        assoc.release()


def _found_patients(port: int, cwd: Path, pattern: str) -> set[str]:
    """Patient IDs of a STUDY-level C-FIND (findscu -X writes each response to a file)."""
    cwd.mkdir()
    found = _dcmtk("findscu", port, "-S", "-X", *_keys(QueryRetrieveLevel="STUDY", PatientID=pattern,
                                                       StudyInstanceUID=""), cwd=cwd)
    assert found.returncode == 0, found.stderr
    return {str(pydicom.dcmread(p).PatientID) for p in cwd.glob("rsp*.dcm")}


def test_find_wildcards_are_star_and_question_mark_only(tmp_path: Path, node: tuple) -> None:
    proc, _, _ = node
    expectations = {
        "PID[1]": {"PID[1]"},  # not the character class [1]: PID1 does not match
        "PID[1]*": {"PID[1]"},
        "PID[1]?": set(),
        "P?D[1]": {"PID[1]"},
        "P_1": {"P_1"},  # `_` is not LIKE's any-character
        "P_*": {"P_1"},
        "P%1": {"P%1"},  # `%` is not LIKE's any-string
        "P%*": {"P%1"},
        "P?1": {"P_1", "PX1", "P%1"},
        "PID?": {"PID1"},
        "*]": {"PID[1]"},
    }
    for k, (pattern, expected) in enumerate(expectations.items()):
        assert _found_patients(proc.port, tmp_path / f"find{k}", pattern) == expected, pattern
