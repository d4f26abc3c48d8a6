"""Reading DICOM and image files: pixels, transfer syntaxes, and typed refusals."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from cxrtriage.inference.phantom import write_cr
from cxrtriage.inference.radiograph import RadiographError, load_radiograph

from .bad_inputs import write_bad_corpus


def test_cr_round_trip(phantom, phantom_cr: Path) -> None:
    r = load_radiograph(phantom_cr)
    assert r.shape == phantom.image.shape
    assert r.pixel_spacing_mm == (pytest.approx(phantom.pixel_spacing_mm, abs=1e-5),) * 2
    assert r.patient_orientation == ["L", "F"]
    # Lungs are dark and bone/soft tissue bright, as displayed.
    assert r.pixels[phantom.lungs].mean() < r.pixels[~phantom.lungs].mean()


def test_monochrome1_is_inverted(phantom, tmp_path: Path) -> None:
    mono2 = load_radiograph(write_cr(phantom, tmp_path / "m2.dcm")).pixels
    mono1 = load_radiograph(write_cr(phantom, tmp_path / "m1.dcm", monochrome1=True)).pixels
    assert np.abs(mono1 - mono2).mean() < 0.01


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_transfer_syntaxes_decode_identically(phantom_cr: Path, tmp_path: Path, syntax) -> None:
    reference = load_radiograph(phantom_cr).pixels
    ds = pydicom.dcmread(phantom_cr)
    ds.compress(syntax)
    path = tmp_path / "compressed.dcm"
    ds.save_as(path)
    assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == str(syntax)
    np.testing.assert_array_equal(load_radiograph(path).pixels, reference)


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
def test_jpeg_process_syntaxes_decode(name: str) -> None:
    """JPEG lossless (process 14) and lossy (baseline / extended) pixel data decode.

    These pydicom test files are not chest images; the pixel decoding is what
    is tested here, so the header is adjusted in memory to pass the checks.
    """
    from pydicom.data import get_testdata_file

    from cxrtriage.inference.radiograph import radiograph_from_dataset

    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.BodyPartExamined = "CHEST"
    r = radiograph_from_dataset(ds)
    assert r.shape == (ds.Rows, ds.Columns)
    assert 0.0 <= r.pixels.min() < r.pixels.max() <= 1.0


def test_rg1_and_its_jpeg2000_twin_decode_identically(rg1: Path, rg1_j2k: Path) -> None:
    a, b = load_radiograph(rg1), load_radiograph(rg1_j2k)
    assert a.shape == (1955, 1841)
    assert a.pixel_spacing_mm is None  # PixelSpacing is 0\0: unknown, not zero
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_png_and_16bit_png(phantom, tmp_path: Path) -> None:
    p8, p16 = tmp_path / "x8.png", tmp_path / "x16.png"
    cv2.imwrite(str(p8), (phantom.image * 255).astype(np.uint8))
    cv2.imwrite(str(p16), (phantom.image * 65535).astype(np.uint16))
    a, b = load_radiograph(p8), load_radiograph(p16)
    assert a.shape == b.shape == phantom.image.shape
    # 8-bit is taken as is (/255); 16-bit, of unknown bit depth, is stretched min..max.
    assert np.abs(a.pixels - phantom.image).max() <= 1 / 255 + 1e-6
    lo, hi = phantom.image.min(), phantom.image.max()
    assert np.abs(b.pixels - (phantom.image - lo) / (hi - lo)).max() < 1e-3


def test_every_bad_input_is_refused_with_its_reason(phantom_cr: Path, tmp_path: Path) -> None:
    expected = write_bad_corpus(phantom_cr, tmp_path / "bad")
    assert len(expected) >= 18
    for path, reason in expected.items():
        with pytest.raises(RadiographError) as info:
            load_radiograph(path)
        assert info.value.reason == reason, f"{path.name}: {info.value}"
        assert reason in str(info.value)


def _per_pixel(ds: pydicom.Dataset) -> np.ndarray:
    """The per-pixel path: every LUT applied to every pixel in float, then np.percentile."""
    from cxrtriage.inference.radiograph import _presentation, stretch

    return stretch(_presentation(ds.pixel_array, ds, str(ds.PhotometricInterpretation)))


@pytest.mark.parametrize("variant", ["rg1", "signed_rescale", "voi_lut_sequence", "window_mono2_8bit", "flat"])
def test_the_stored_value_table_gives_the_per_pixel_presentation(rg1: Path, variant: str) -> None:
    """dicom_pixels computes the LUT chain once per stored value (a table); it must equal the per-pixel
    chain: rescale, VOI LUT sequence or window, MONOCHROME1 inversion, percentile stretch."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from cxrtriage.inference.preprocess import equalize
    from cxrtriage.inference.radiograph import Radiograph, dicom_image, dicom_pixels

    ds = pydicom.dcmread(rg1)  # MONOCHROME1, 16-bit, with a window
    rng = np.random.default_rng(7)
    if variant == "signed_rescale":
        pixels = rng.normal(-200, 400, (300, 280)).clip(-2000, 3000).astype(np.int16)
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024
        del ds.WindowCenter, ds.WindowWidth
    elif variant == "voi_lut_sequence":
        pixels = rng.integers(0, 4096, (300, 280), dtype=np.uint16)
        ds.BitsStored, ds.HighBit, ds.PhotometricInterpretation = 12, 11, "MONOCHROME2"
        del ds.WindowCenter, ds.WindowWidth
        item = Dataset()
        item.LUTDescriptor = [4096, 0, 16]
        item.LUTData = [int(v) for v in (np.sqrt(np.arange(4096) / 4095) * 65535)]
        ds.VOILUTSequence = Sequence([item])
    elif variant == "window_mono2_8bit":
        pixels = rng.integers(10, 240, (300, 280), dtype=np.uint8)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PhotometricInterpretation = 8, 8, 7, "MONOCHROME2"
        ds.WindowCenter, ds.WindowWidth = 100, 120
    elif variant == "flat":
        pixels = np.full((300, 280), 700, np.uint16)
    else:
        pixels = None
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    table = dicom_pixels(ds)
    assert table.dtype == np.float32
    np.testing.assert_allclose(table, _per_pixel(ds), rtol=0, atol=1e-6)
    if variant != "flat":
        assert table.min() == 0.0 and table.max() == 1.0
    # Scoring reads only the equalised image: made from the stored values, bit for bit, the pixels never made
    radiograph = Radiograph(dicom_image(ds), "stored")
    equalized = radiograph.equalized()
    assert radiograph.stored is not None and radiograph._pixels is None
    np.testing.assert_array_equal(equalized, equalize(table))
    # ... and handed to another process as (codes, table), the same values once looked up
    for as_equalized, want in ((True, equalized), (False, table)):
        parts = radiograph.as_lookup(as_equalized)
        assert parts is not None
        np.testing.assert_array_equal(parts[1][parts[0]], want)
    np.testing.assert_array_equal(radiograph.pixels, table)


@pytest.mark.parametrize("syntax", ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_unused_high_bits_are_ignored_as_pydicom_ignores_them(rg1: Path, tmp_path: Path, syntax: str,
                                                               photometric: str) -> None:
    """Native unsigned words are read as stored and the stored-value table masks their unused high bits
    (PS3.5 8.1.1: they may hold anything, e.g. old overlay planes): the pixels equal those of the same image
    with the bits cleared, and pydicom's own shifted array through the per-pixel chain."""
    from cxrtriage.inference.radiograph import _stored_bits_mask, dicom_image, dicom_pixels

    rng = np.random.default_rng(11)
    clean = rng.integers(200, 3900, (240, 200), dtype=np.uint16)
    noisy = clean | (rng.integers(0, 16, clean.shape, dtype=np.uint16) << 12)  # bits 12-15 set at random
    images = {}
    for name, words in (("clean", clean), ("noisy", noisy)):
        ds = pydicom.dcmread(rg1)
        ds.Rows, ds.Columns = words.shape
        ds.BitsStored, ds.HighBit, ds.PhotometricInterpretation = 12, 11, photometric
        ds.PixelData = words.tobytes()
        ds.file_meta.TransferSyntaxUID = getattr(pydicom.uid, syntax)
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        read = pydicom.dcmread(path)
        assert str(read.file_meta.TransferSyntaxUID) == str(getattr(pydicom.uid, syntax))
        assert _stored_bits_mask(read) == 0xFFF  # the words are read as stored
        images[name] = dicom_pixels(read)
        np.testing.assert_allclose(images[name], _per_pixel(pydicom.dcmread(path)), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(images["noisy"], images["clean"])
    stored = dicom_image(pydicom.dcmread(tmp_path / "noisy.dcm"))
    assert not isinstance(stored, np.ndarray) and int(stored.codes.max()) > 4095  # the table covers every word
