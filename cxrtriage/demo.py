"""``cxrtriage demo``: synthetic studies of mixed severity (and the real RG1 CR) sent to a node."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from .inference.phantom import PhantomGenerator, write_cr


@dataclass
class Sent:
    label: str
    path: Path
    status: int | None


def demo_files(folder: Path, studies: int, seed: int) -> list[tuple[str, Path]]:
    """Phantoms with 0-6 affected zones, one of them a STAT order, plus RG1 when pydicom-data is there."""
    generator = PhantomGenerator(1024, 896)
    files = []
    for i in range(studies):
        count = i % 7
        zones = tuple(range(count))
        stat = i == 1  # a normal-looking study ordered STAT: the AI must not lower it
        label = f"phantom, {count} zone(s) affected" + (", ordered STAT" if stat else "")
        path = write_cr(generator(seed + i, affected_zones=zones), folder / f"demo-{i:02d}.dcm",
                        requested_priority="STAT" if stat else "ROUTINE")
        files.append((label, path))
    try:
        from pydicom.data import get_testdata_file

        rg1 = get_testdata_file("RG1_UNCR.dcm", download=False)
    except Exception:  # pydicom-data is optional outside the tests
        rg1 = None
    if rg1:
        files.append(("real adult PA chest CR (pydicom-data RG1_UNCR.dcm)", Path(rg1)))
    return files


def send(host: str, port: int, called_ae: str, files: list[tuple[str, Path]]) -> list[Sent]:
    from pydicom import dcmread
    from pynetdicom import AE

    ae = AE(ae_title="CXRDEMO")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called_ae}@{host}:{port}: is `cxrtriage serve` running?")
    sent = []
    try:
        for label, path in files:
            status = assoc.send_c_store(dcmread(path))
            sent.append(Sent(label, path, int(status.Status) if status and "Status" in status else None))
    finally:
        assoc.release()
    return sent


def run_demo(host: str, port: int, called_ae: str, studies: int, seed: int) -> list[Sent]:
    folder = Path(tempfile.mkdtemp(prefix="cxrtriage-demo-"))
    return send(host, port, called_ae, demo_files(folder, studies, seed))
