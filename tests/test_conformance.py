"""The DCMTK private dictionary names the node's private block (docs/conformance.md).

The block (group 0099, creator CXRTRIAGE) travels in C-FIND responses
(cxrtriage/scp/query.py add_severity), encoded Implicit VR Little Endian as
the default transfer syntax sends it: without a dictionary a reader knows
neither the VR nor the name of its elements and shows raw bytes.
"""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian

from cxrtriage.scp.query import PRIVATE_CREATOR, StudySeverity, add_severity

from .tools import require

DICTIONARY = Path(__file__).resolve().parents[1] / "docs" / "dcmtk" / "cxrtriage-private.dic"
NAMES = ("CxrtriageZoneScoreTotal", "CxrtriageBrixiaStyleTotal", "CxrtriageProbabilityOfDisease",
         "CxrtriageAIStatus", "CxrtriageReadingPriority", "CxrtriageWorklistBand")


def _response(path: Path) -> Path:
    """A study-level C-FIND response with the private block, as the node builds it."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = "1.2.3.4"
    add_severity(ds, StudySeverity(total=4, brixia=9, p_disease=0.93, status="SCORED", priority=87.5, band="critical"))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True, implicit_vr=True, little_endian=True)
    return path


def _dcmdump(path: Path, dictionaries: list[str]) -> str:
    env = {**os.environ, "DCMDICTPATH": os.pathsep.join(dictionaries)}
    proc = subprocess.run([require("dcmdump", "dcmtk"), str(path)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dcmdump_names_the_private_elements_with_the_dictionary(tmp_path: Path) -> None:
    path = _response(tmp_path / "find-response.dcm")
    standard = sorted(glob.glob("/usr/share/libdcmtk*/dicom.dic"))[-1:]  # DCMTK's own, when not built in
    plain = _dcmdump(path, standard)
    assert not any(name in plain for name in NAMES)
    assert "(0099,1006) ?? 43\\52\\49" in plain  # raw bytes ("CRI..."): neither VR nor name known

    named = _dcmdump(path, [*standard, str(DICTIONARY)])
    lines = {name: next(line for line in named.splitlines() if name in line) for name in NAMES}
    assert lines["CxrtriageZoneScoreTotal"].split()[1:3] == ["IS", "[4]"]
    assert lines["CxrtriageBrixiaStyleTotal"].split()[1:3] == ["IS", "[9]"]
    assert lines["CxrtriageProbabilityOfDisease"].split()[1:3] == ["DS", "[0.9300]"]
    assert lines["CxrtriageAIStatus"].split()[1:3] == ["CS", "[SCORED]"]
    assert lines["CxrtriageReadingPriority"].split()[1:3] == ["DS", "[87.50]"]
    assert lines["CxrtriageWorklistBand"].split()[1:3] == ["CS", "[CRITICAL]"]
    assert f"[{PRIVATE_CREATOR}]" in named
