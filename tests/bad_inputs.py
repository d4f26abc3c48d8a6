"""A corpus of files the node must refuse, each with the reason it must give.

Built from one good synthetic CR by breaking one thing at a time. The
encoding corpus (:func:`write_encoding_corpus`) breaks the bytes rather than
the dataset: a body encoded otherwise than its File Meta declares, and a
Deflated dataset that inflates to 1 GiB.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

Breaker = Callable[[Dataset], Dataset | None]


def _resized(ds: Dataset, rows: int, cols: int) -> Dataset:
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = np.zeros((rows, cols), dtype=np.uint16).tobytes()
    return ds


def _rgb(ds: Dataset) -> Dataset:
    """An RGB image that does not say it is a chest."""
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    del ds.BodyPartExamined
    ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), dtype=np.uint8).tobytes()
    return ds


def _delete(keyword: str) -> Breaker:
    def breaker(ds: Dataset) -> Dataset:
        delattr(ds, keyword)
        return ds

    return breaker


def _set(**values: object) -> Breaker:
    def breaker(ds: Dataset) -> Dataset:
        for key, value in values.items():
            setattr(ds, key, value)
        return ds

    return breaker


#: name -> (how to break the dataset, the reason code the reader must give)
DATASET_BREAKERS: dict[str, tuple[Breaker, str]] = {
    "no_pixel_data": (_delete("PixelData"), "no_pixel_data"),
    "mr_sop_class": (_set(SOPClassUID=MRImageStorage), "unsupported_sop_class"),
    "no_sop_class": (_delete("SOPClassUID"), "unsupported_sop_class"),
    "non_chest": (_set(BodyPartExamined="KNEE"), "not_chest"),
    "lateral_ll": (_set(ViewPosition="LL"), "lateral_view"),
    "lateral_rl": (_set(ViewPosition="RL"), "lateral_view"),
    "one_by_one": (lambda ds: _resized(ds, 1, 1), "bad_image_size"),
    "huge_rows_columns": (_set(Rows=60000, Columns=60000), "bad_image_size"),
    "rgb_not_chest": (_rgb, "unsupported_photometric"),
    "palette_colour": (_set(PhotometricInterpretation="PALETTE COLOR"), "unsupported_photometric"),
    "bits_stored_4": (_set(BitsStored=4, HighBit=3), "unsupported_bit_depth"),
    "multi_frame": (_set(NumberOfFrames=3), "multi_frame"),
    "short_pixel_data": (lambda ds: _set(PixelData=ds.PixelData[:100])(ds), "pixel_decode_failed"),
}


def write_bad_corpus(good: Path, folder: Path) -> dict[Path, str]:
    """Write every broken variant of ``good`` into ``folder``; returns path -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[Path, str] = {}
    for name, (breaker, reason) in DATASET_BREAKERS.items():
        ds = pydicom.dcmread(good)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        broken = breaker(ds)
        path = folder / f"{name}.dcm"
        broken.save_as(path, enforce_file_format=False)
        expected[path] = reason
    raw = good.read_bytes()
    meta_end = 132 + 12 + int(pydicom.filereader.read_file_meta_info(good).FileMetaInformationGroupLength)
    (folder / "truncated_header.dcm").write_bytes(raw[: meta_end + 50])  # cut inside the dataset's header
    expected[folder / "truncated_header.dcm"] = "unreadable"
    (folder / "truncated_pixels.dcm").write_bytes(raw[: len(raw) - len(raw) // 3])
    expected[folder / "truncated_pixels.dcm"] = "unreadable"
    (folder / "not_dicom.dcm").write_bytes(b"this is a text file, not DICOM\n" * 10)
    expected[folder / "not_dicom.dcm"] = "not_dicom"
    (folder / "empty.dcm").write_bytes(b"")
    expected[folder / "empty.dcm"] = "not_dicom"
    (folder / "tiny.png").write_bytes(_png(np.zeros((10, 10), dtype=np.uint8)))
    expected[folder / "tiny.png"] = "bad_image_size"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    expected[folder / "broken.png"] = "unreadable"
    return expected


def _png(array: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def encode_body(ds: Dataset, *, implicit: bool, little: bool) -> bytes:
    """The dataset's bytes in the given encoding, whatever its File Meta says."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, ds)
    return fp.getvalue()


def file_bytes(ds: Dataset, transfer_syntax: str, body: bytes) -> bytes:
    """Preamble + File Meta declaring ``transfer_syntax`` + ``body`` as given (nothing re-encoded)."""
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = transfer_syntax
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    fp.write(body)
    return fp.getvalue()


def deflate_bomb(ds: Dataset, inflated_pixel_bytes: int = 1 << 30) -> bytes:
    """A Deflated Explicit VR Little Endian body whose Pixel Data inflates to ``inflated_pixel_bytes`` of zeros.

    Built in milliseconds: after a full flush the compressor forgets its
    history, so every MiB of zeros compresses to the same bytes, repeated.
    """
    header = Dataset()
    for element in ds:
        if element.tag < 0x7FE00010:
            header.add(element)
    mib = 1 << 20
    assert inflated_pixel_bytes % mib == 0
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + inflated_pixel_bytes.to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflater.compress(encode_body(header, implicit=False, little=True) + pixel_header)
    start += deflater.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(mib)
    deflater.compress(zeros)
    deflater.flush(zlib.Z_FULL_FLUSH)  # the first MiB after the header is primed; the next ones repeat exactly
    block = deflater.compress(zeros) + deflater.flush(zlib.Z_FULL_FLUSH)
    # start + block * n inflates to header + n MiB; the first primed MiB was not emitted
    return start + block * (inflated_pixel_bytes // mib) + deflater.flush()


#: name -> (declared transfer syntax, how the body is encoded, or "bomb")
ENCODING_BREAKERS: dict[str, tuple[str, tuple[bool, bool] | str]] = {
    "implicit_labelled_explicit": (ExplicitVRLittleEndian, (True, True)),
    "explicit_labelled_implicit": (ImplicitVRLittleEndian, (False, True)),
    "little_labelled_big": (ExplicitVRBigEndian, (False, True)),
    "big_labelled_little": (ExplicitVRLittleEndian, (False, False)),
    "deflate_bomb": (DeflatedExplicitVRLittleEndian, "bomb"),
    "deflate_garbage": (DeflatedExplicitVRLittleEndian, "garbage"),
}


def write_encoding_corpus(good: Path, folder: Path) -> dict[str, Path]:
    """Files whose bytes do not match their declared transfer syntax (each with its own SOP Instance UID)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for name, (transfer_syntax, how) in ENCODING_BREAKERS.items():
        ds = pydicom.dcmread(good)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if how == "bomb":
            body = deflate_bomb(ds)
        elif how == "garbage":
            body = b"\xff\x00 this is not a deflate stream " * 64
        else:
            assert isinstance(how, tuple)
            body = encode_body(ds, implicit=how[0], little=how[1])
        path = folder / f"{name}.dcm"
        path.write_bytes(file_bytes(ds, transfer_syntax, body))
        files[name] = path
    return files
