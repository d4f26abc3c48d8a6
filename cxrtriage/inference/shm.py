"""Arrays handed between processes in shared memory: messages carry a :class:`Block`, never the pixels.

A block is one POSIX shared-memory segment holding several named arrays
back to back. Whoever writes it closes its handle at once; readers attach,
use views and close. One process, the scoring client, unlinks each block
when its job is over. All processes of the engine share the parent's
resource tracker (spawn passes it on), which unlinks whatever is left if
the parent dies.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

_ALIGN = 64  # each array starts on a cache line, so views are aligned for SIMD code


@dataclass(frozen=True)
class ArraySlot:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class Block:
    """Where a set of arrays lies: a segment name, and each array's dtype, shape and offset (a few hundred bytes)."""

    name: str
    slots: tuple[ArraySlot, ...]


def write_block(arrays: Mapping[str, np.ndarray]) -> Block:
    """Copy ``arrays`` into a new segment; the caller (or whoever it hands the block to) must :func:`unlink` it."""
    slots, offset = [], 0
    for key, array in arrays.items():
        slots.append(ArraySlot(key, array.dtype.str, tuple(array.shape), offset))
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    segment = shared_memory.SharedMemory(create=True, size=max(offset, 1))
    try:
        for slot, array in zip(slots, arrays.values()):
            _view(segment, slot)[...] = array
    finally:
        segment.close()
    return Block(segment.name, tuple(slots))


def _view(segment: shared_memory.SharedMemory, slot: ArraySlot) -> np.ndarray:
    return np.ndarray(slot.shape, dtype=np.dtype(slot.dtype), buffer=segment.buf, offset=slot.offset)


@contextmanager
def open_block(block: Block) -> Iterator[dict[str, np.ndarray]]:
    """Views of the block's arrays, valid inside the ``with``; copy what must outlive it."""
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
    """Free the segment (idempotent: a block already gone is fine)."""
    if block is None:
        return
    try:
        segment = shared_memory.SharedMemory(name=block.name)
    except FileNotFoundError:
        return
    segment.close()
    segment.unlink()
