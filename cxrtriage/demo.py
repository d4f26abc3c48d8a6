"""``cxrtriage demo``: synthetic studies of mixed severity (and the real RG1 CR) sent to a node."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .inference.phantom import PhantomGenerator, write_cr


@dataclass
class Sent:
    """One file sent, with the C-STORE status the node answered (None: no valid response)."""

    label: str
    path: Path
    status: int | None


#: Phantom size: the node scores any size, and at 1024 px one takes about 0.6 s (at 2048 px, over 20 s).
DEMO_SIZE = (1024, 896)


def demo_files(folder: Path, studies: int, seed: int,
               on_written: Callable[[str], None] | None = None) -> list[tuple[str, Path]]:
    """Phantoms with 0-6 affected zones, one of them a STAT order, plus RG1 when pydicom-data is there.

    Drawn two at a time (OpenCV releases the GIL); ``on_written`` hears each label as its file is written.
    """
    generator = PhantomGenerator(*DEMO_SIZE)

    def write(i: int) -> tuple[str, Path]:
        count = i % 7
        stat = i == 1  # a normal-looking study ordered STAT: the AI must not lower it
        label = f"phantom, {count} zone(s) affected" + (", ordered STAT" if stat else "")
        path = write_cr(generator(seed + i, affected_zones=tuple(range(count))), folder / f"demo-{i:02d}.dcm",
                        requested_priority="STAT" if stat else "ROUTINE")
        if on_written:
            on_written(label)
        return label, path

    with ThreadPoolExecutor(max_workers=2) as pool:
        files = list(pool.map(write, range(studies)))
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


def run_demo(host: str, port: int, called_ae: str, studies: int, seed: int,
             on_written: Callable[[str], None] | None = None) -> list[Sent]:
    """Write the demo files to a temp folder and send them."""
    folder = Path(tempfile.mkdtemp(prefix="cxrtriage-demo-"))
    return send(host, port, called_ae, demo_files(folder, studies, seed, on_written))
