"""The bytes of an encoded pydicom Dataset as a template: constant runs, slots and optional items.

A template is compiled once from a dataset pydicom would write (explicit VR
little endian) and rendered many times with other values. :class:`Rules`
decide, while the dataset is walked, which elements become *slots* (filled in
per rendering), which sequence items are *optional* (written or left out per
rendering) and which items a slot stands in for whole; everything else is
encoded once, as pydicom's ``write_dataset`` encodes it, and adjacent constant
bytes are merged. Sequences and items keep the explicit or undefined lengths
pydicom gave them; explicit lengths are recomputed when rendered, since slots
and optional items change them. This module knows nothing of what the
datasets are: :mod:`.result_templates` holds the rules of the node's SEG and SR.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "Filling", "Item", "Node", "Rules", "Seq", "Slot", "Template", "element_head", "encode_element", "encode_item",
    "file_header", "item_bytes", "long_element", "long_header", "short_element",
]

# -- encoding ------------------------------------------------------------------

_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = b"\xff\xff\xff\xff"


def _writer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def encode_element(elem: DataElement, encoding: Any) -> bytes:
    """One element as pydicom writes it (explicit VR little endian, ``encoding`` its character set)."""
    fp = _writer()
    write_data_element(fp, elem, encoding)
    return fp.getvalue()


def encode_item(item: Dataset, encoding: Any) -> bytes:
    """A dataset as one sequence item of explicit length."""
    fp = _writer()
    write_dataset(fp, item, encoding)
    return item_bytes(fp.getvalue())


def element_head(elem: DataElement) -> bytes:
    """Tag and VR: the start of an explicit VR element."""
    tag = int(elem.tag)
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + str(elem.VR).encode()[:2]


def short_element(head: bytes, value: bytes) -> bytes:
    """An element of a VR with a 2-byte length; ``value`` already padded to even length."""
    return head + struct.pack("<H", len(value)) + value


def long_header(head: bytes, length: int) -> bytes:
    """Tag, VR, reserved bytes and 4-byte length of an element of a VR such as SQ, OB or UN."""
    return head + b"\0\0" + struct.pack("<I", length)


def long_element(head: bytes, body: bytes, undefined: bool = False) -> bytes:
    """An element of a VR with a 4-byte length; of undefined length it ends with a Sequence Delimitation Item."""
    if undefined:
        return head + b"\0\0" + _UNDEFINED + body + _SEQ_END
    return long_header(head, len(body)) + body


def item_bytes(body: bytes, undefined: bool = False) -> bytes:
    """A sequence item around encoded elements; of undefined length it ends with an Item Delimitation Item."""
    if undefined:
        return _ITEM + _UNDEFINED + body + _ITEM_END
    return _ITEM + struct.pack("<I", len(body)) + body


def file_header(meta: Dataset) -> bytes:
    """Preamble, "DICM" and the File Meta Information, as pydicom writes a file."""
    fp = _writer()
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
    return fp.getvalue()


# -- compiled form ---------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """A value filled in per rendering: ``kind`` says how, ``arg`` which one; ``head`` is the element's tag + VR.

    A slot among a sequence's items stands for a whole item (its header
    included) or nothing; it has no head or tag.
    """

    kind: str
    arg: Any = None
    head: bytes = b""
    tag: int = 0

    @classmethod
    def of(cls, elem: DataElement, kind: str, arg: Any = None) -> Slot:
        """The slot standing for ``elem``."""
        return cls(kind, arg, element_head(elem), int(elem.tag))

    @property
    def vr(self) -> str:
        return self.head[4:6].decode()


@dataclass
class Item:
    """A sequence item; ``option`` names the condition under which it is written (None: always)."""

    option: str | None
    nodes: list[Node]
    undefined: bool


@dataclass
class Seq:
    head: bytes  # tag and "SQ"
    items: list[Item | Slot]
    undefined: bool


Node = bytes | Slot | Seq


class Rules(Protocol):
    """What of a dataset varies: asked for each element and each sequence item as the dataset is walked."""

    def slot(self, elem: DataElement, parent: Dataset, encoding: Any, depth: int) -> Slot | None:
        """The slot standing for ``elem`` (in ``parent``, ``depth`` sequences deep), or None: constant or walked."""

    def item(self, sequence: DataElement, index: int, item: Dataset, depth: int) -> str | Slot | None:
        """The option under which item ``index`` of ``sequence`` is written (None: always), or a slot for it whole."""


class Filling(Protocol):
    """One rendering's values."""

    def slot(self, slot: Slot) -> bytes | list[Buffer]:
        """The slot's bytes; at the top level a large value may come in pieces, which are not joined."""

    def written(self, option: str) -> bool:
        """Is an item of this option written?"""


# -- compiling -------------------------------------------------------------------


def _dataset(ds: Dataset, rules: Rules, encoding: Any, depth: int) -> list[Node]:
    encoding = ds.get("SpecificCharacterSet", encoding)
    nodes: list[Node] = []
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:  # group lengths: pydicom's write_dataset leaves them out
            continue
        nodes.append(_element(ds[tag], ds, rules, encoding, depth))
    return _merge(nodes)


def _element(elem: DataElement, parent: Dataset, rules: Rules, encoding: Any, depth: int) -> Node:
    slot = rules.slot(elem, parent, encoding, depth)
    if slot is not None:
        return slot
    if elem.VR != "SQ":
        return encode_element(elem, encoding)
    items: list[Item | Slot] = []
    for index, x in enumerate(elem.value):
        decided = rules.item(elem, index, x, depth)  # before its content: rules may count items
        if isinstance(decided, Slot):
            items.append(decided)
        else:
            undefined = bool(getattr(x, "is_undefined_length_sequence_item", False))
            items.append(Item(decided, _dataset(x, rules, encoding, depth + 1), undefined))
    return Seq(element_head(elem), items, elem.is_undefined_length)


def _merge(nodes: Iterable[Node]) -> list[Node]:
    """Adjacent constant bytes joined; a sequence with no slot or option inside becomes bytes."""
    out: list[Node] = []
    for node in nodes:
        if isinstance(node, Seq) and _constant(node):
            node = _render_seq(node, _CONSTANT)
        if isinstance(node, bytes) and out and isinstance(out[-1], bytes):
            out[-1] = out[-1] + node
        else:
            out.append(node)
    return out


def _constant(seq: Seq) -> bool:
    return all(isinstance(item, Item) and item.option is None and all(isinstance(n, bytes) for n in item.nodes)
               for item in seq.items)


class _Constant:
    """The filling of a sequence with nothing to fill."""

    def slot(self, slot: Slot) -> bytes:
        raise AssertionError(f"slot {slot.kind} in a constant sequence")

    def written(self, option: str) -> bool:
        raise AssertionError(f"option {option} in a constant sequence")


_CONSTANT = _Constant()

# -- rendering -------------------------------------------------------------------


def _joined(filled: bytes | list[Buffer]) -> bytes:
    return filled if isinstance(filled, bytes) else b"".join(filled)


def _render(node: Node, filling: Filling) -> bytes:
    if isinstance(node, bytes):
        return node
    if isinstance(node, Seq):
        return _render_seq(node, filling)
    return _joined(filling.slot(node))


def _render_seq(seq: Seq, filling: Filling) -> bytes:
    parts = []
    for item in seq.items:
        if isinstance(item, Slot):
            parts.append(_joined(filling.slot(item)))  # a whole item, or nothing
        elif item.option is None or filling.written(item.option):
            parts.append(item_bytes(b"".join([_render(n, filling) for n in item.nodes]), item.undefined))
    return long_element(seq.head, b"".join(parts), seq.undefined)


@dataclass
class Template:
    """A dataset's encoding as constant bytes, slots and optional items (see the module docstring)."""

    nodes: list[Node]

    @classmethod
    def compile(cls, ds: Dataset, rules: Rules) -> Template:
        return cls(_dataset(ds, rules, None, 0))

    def parts(self, filling: Filling) -> list[Buffer]:
        """The dataset's bytes in pieces: a top-level slot's pieces are passed on, so a large value is copied once."""
        out: list[Buffer] = []
        for node in self.nodes:
            filled = filling.slot(node) if isinstance(node, Slot) else _render(node, filling)
            if isinstance(filled, bytes):
                out.append(filled)
            else:
                out += filled
        return out

    def render(self, filling: Filling) -> bytes:
        return b"".join(self.parts(filling))
