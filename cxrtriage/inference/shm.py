"""Arrays handed between processes in shared memory: messages carry a :class:`Block`, never the pixels.

A block is one POSIX shared-memory segment holding several named arrays
back to back. Whoever writes it closes its handle at once; readers attach,
use views and close. One process, the scoring client, unlinks each block
when its job is over. All processes of the engine share the parent's
resource tracker (spawn passes it on), which unlinks whatever is left if
the parent dies.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

SEGMENT_PREFIX = "cxrtriage_"
_ALIGN = 64  # each array starts on a cache line, so views are aligned for SIMD code


@dataclass(frozen=True)
class ArraySlot:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class Block:
    """Where a set of arrays lies: a segment name, and each array's dtype, shape and offset (a few hundred bytes).

    ``in_ring``: the arrays lie in a slot of a :class:`Ring`, a segment that outlives the block; it stays
    mapped in every process that reads or writes it, and its slot goes back to the ring's owner instead of
    the segment being unlinked.
    """

    name: str
    slots: tuple[ArraySlot, ...]
    in_ring: bool = False
    end: int = 0  # in a ring: where its slot ends; the bytes after its arrays up to there are free (write_beside)


@dataclass(frozen=True)
class Ring:
    """``count`` slots of ``slot_bytes`` in one long-lived segment, for the images the scoring engine reads.

    A new segment per image costs its writer and its reader a page fault per 4 KiB page and, on a GPU, a
    copy into pinned memory; a ring is mapped once per process, and a device engine registers it with CUDA once
    (``cudaHostRegister``), so the GPU copies a slot straight from it. Its owner hands out and takes
    back the slots (:class:`~.engine_jobs.EnginePool`) and unlinks the segment at the end.
    """

    name: str
    count: int
    slot_bytes: int


def _layout(arrays: Mapping[str, np.ndarray], start: int = 0) -> tuple[list[ArraySlot], int]:
    slots, offset = [], start
    for key, array in arrays.items():
        slots.append(ArraySlot(key, array.dtype.str, tuple(array.shape), offset))
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    return slots, offset - start


def segment_name(pid: int | None = None) -> str:
    """A new segment's name: ``cxrtriage_<pid of its maker>_<random>``, so that a segment left in /dev/shm
    says which process made it."""
    return f"{SEGMENT_PREFIX}{os.getpid() if pid is None else pid}_{secrets.token_hex(6)}"


def write_block(arrays: Mapping[str, np.ndarray]) -> Block:
    """Copy ``arrays`` into a new segment; the caller (or whoever it hands the block to) must :func:`unlink` it."""
    slots, size = _layout(arrays)
    segment = shared_memory.SharedMemory(name=segment_name(), create=True, size=max(size, 1))
    try:
        for slot, array in zip(slots, arrays.values()):
            _view(segment, slot)[...] = array
    finally:
        segment.close()
    return Block(segment.name, tuple(slots))


def create_ring(count: int, slot_bytes: int) -> tuple[Ring, shared_memory.SharedMemory]:
    """A new ring; the caller keeps the handle and closes and unlinks it when no process uses the ring."""
    slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
    segment = shared_memory.SharedMemory(name=segment_name(), create=True, size=count * slot_bytes)
    return Ring(segment.name, count, slot_bytes), segment


def write_slot(ring: Ring, slot: int, arrays: Mapping[str, np.ndarray]) -> Block | None:
    """Copy ``arrays`` into ``slot`` of ``ring``; None (nothing written) where they do not fit in a slot."""
    slots, size = _layout(arrays, slot * ring.slot_bytes)
    if size > ring.slot_bytes or not 0 <= slot < ring.count:
        return None
    _fill(ring.name, slots, arrays)
    return Block(ring.name, tuple(slots), in_ring=True, end=(slot + 1) * ring.slot_bytes)


def write_beside(block: Block, arrays: Mapping[str, np.ndarray]) -> Block:
    """Copy ``arrays`` into the free rest of ``block``'s ring slot, where they fit, else into a new segment.

    The engine so hands its outputs back in the slot its input came in (mapped in every process, its pages
    long faulted in), which belongs to the job until the job is over; a new segment per output cost the
    engine's one thread 2.5 ms an image on an H200 (docs/benchmarks.md, GPU run 4).
    """
    if block.in_ring:
        start = max((s.offset + int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in block.slots),
                    default=0)
        slots, size = _layout(arrays, -(-start // _ALIGN) * _ALIGN)
        if slots and slots[0].offset + size <= block.end:
            _fill(block.name, slots, arrays)
            return Block(block.name, tuple(slots), in_ring=True, end=block.end)
    return write_block(arrays)


def _fill(ring: str, slots: list[ArraySlot], arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` to their places in this process's mapping of the ring segment ``ring``."""
    segment = mapped(ring)
    for place, array in zip(slots, arrays.values()):
        _view(segment, place)[...] = array


_mapped: dict[str, shared_memory.SharedMemory] = {}  # this process's mappings of rings, kept for its life


def ring_mappings() -> dict[str, shared_memory.SharedMemory]:
    """The rings this process has mapped, by name."""
    return dict(_mapped)


def mapped(name: str) -> shared_memory.SharedMemory:
    """This process's mapping of the ring segment ``name`` (made once; its pages then fault in once)."""
    segment = _mapped.get(name)
    if segment is None:
        segment = _mapped[name] = shared_memory.SharedMemory(name=name)
    return segment


def _view(segment: shared_memory.SharedMemory, slot: ArraySlot) -> np.ndarray:
    return np.ndarray(slot.shape, dtype=np.dtype(slot.dtype), buffer=segment.buf, offset=slot.offset)


@contextmanager
def open_block(block: Block) -> Iterator[dict[str, np.ndarray]]:
    """Views of the block's arrays, valid inside the ``with``; copy what must outlive it."""
    if block.in_ring:  # the ring stays mapped; its slot is the owner's to reuse once the job is over
        yield {slot.key: _view(mapped(block.name), slot) for slot in block.slots}
        return
    segment = shared_memory.SharedMemory(name=block.name)
    views = {slot.key: _view(segment, slot) for slot in block.slots}
    try:
        yield views
    finally:
        views.clear()
        try:
            segment.close()
        except BufferError:  # a view escaped; the mapping goes when it is collected
            pass


def unlink(block: Block | None) -> None:
    """Free the segment (idempotent: a block already gone is fine); a ring's block frees nothing."""
    if block is None or block.in_ring:
        return
    try:
        segment = shared_memory.SharedMemory(name=block.name)
    except FileNotFoundError:
        return
    segment.close()
    segment.unlink()
