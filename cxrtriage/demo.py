"""``cxrtriage demo``: synthetic studies of mixed severity (and the real RG1 CR) sent to a node."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from .inference.phantom import PhantomGenerator, write_cr


@dataclass
class Sent:
    """One file sent, with the C-STORE status the node answered (None: no valid response)."""

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
    """C-STORE ``files`` to the node over one association (the node's own sender, as ``CXRDEMO``)."""
    from .config import Peer
    from .scp.sender import SendError, send_files

    try:
        statuses = send_files(Peer(ae_title=called_ae, host=host, port=port), [path for _, path in files], "CXRDEMO")
    except SendError as exc:
        raise ConnectionError(f"{exc}: is `cxrtriage serve` running?") from exc
    return [Sent(label, path, status) for (label, path), status in zip(files, statuses)]


def run_demo(host: str, port: int, called_ae: str, studies: int, seed: int) -> list[Sent]:
    """Write the demo files to a temp folder and send them."""
    folder = Path(tempfile.mkdtemp(prefix="cxrtriage-demo-"))
    return send(host, port, called_ae, demo_files(folder, studies, seed))
