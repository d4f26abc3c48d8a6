"""The overlay PNG says which models made it, and carries the research-use notice when it applies."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cxrtriage.inference.identity import ModelIdentity
from cxrtriage.inference.overlay import NOTICE_COLOUR, render_overlay
from cxrtriage.inference.radiograph import load_radiograph


def amber_rows(canvas: np.ndarray) -> np.ndarray:
    """Rows where most pixels are the notice's amber."""
    return np.flatnonzero((canvas == np.array(NOTICE_COLOUR, dtype=np.uint8)).all(axis=2).mean(axis=1) > 0.5)


def test_overlay_carries_the_research_notice_for_models_not_trained_on_real_films(pipeline, phantom_cr) -> None:
    r = load_radiograph(phantom_cr)
    result = pipeline(r)
    assert result.identity.research_use
    canvas = render_overlay(r.pixels, result)
    rows = amber_rows(canvas)
    assert rows.size > 0 and rows.min() > 0.8 * canvas.shape[0]  # a footer band at the bottom

    real = ModelIdentity(*(replace(m, origin="published", training_data=("real",))
                           for m in (result.identity.lungs, result.identity.disease)))
    assert amber_rows(render_overlay(r.pixels, replace(result, identity=real))).size == 0


def test_the_written_overlay_is_a_palette_png_a_third_the_size_that_looks_the_same(
    pipeline, rg1, tmp_path
) -> None:
    import cv2

    from cxrtriage.inference.overlay import LUNG_COLOUR, OPACITY_COLOUR, ZONE_COLOUR, write_overlay

    r = load_radiograph(rg1)  # a real chest film: its noise is what costs bytes
    result = pipeline(r)
    canvas = render_overlay(r.pixels, result)
    path = write_overlay(tmp_path / "overlays" / "x.png", r.pixels, result)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[25] == 3  # colour type 3: palette
    assert not list(path.parent.glob(".*partial"))  # written whole, nothing left behind

    rgb_png = cv2.imencode(".png", canvas)[1]  # what the overlay used to be written as
    assert len(data) < len(rgb_png) / 3

    shown = cv2.imread(str(path))  # as any viewer decodes it
    assert shown.shape == canvas.shape
    error = np.abs(shown.astype(int) - canvas.astype(int)).max(axis=2)
    assert (error <= 2).mean() > 0.99  # the radiograph: grey levels within 2 of 255
    for colour in (LUNG_COLOUR, ZONE_COLOUR, OPACITY_COLOUR, NOTICE_COLOUR):  # the drawing, exactly
        drawn = (canvas == np.array(colour, np.uint8)).all(axis=2)
        assert (shown[drawn] == np.array(colour, np.uint8)).all()
    # the research-use footer intact: the same band, every amber row still amber (a row of the notice's text sits
    # near half amber, and its anti-aliased edges snap to amber in the palette, so it may tip over half)
    footer, shown_footer = amber_rows(canvas), amber_rows(shown)
    assert set(footer) <= set(shown_footer) and (shown_footer.min(), shown_footer.max()) == (footer.min(), footer.max())


def test_palette_indices_are_each_pixels_nearest_entry() -> None:
    """Greys come from a 256-entry table and other colours once per distinct colour; both must give what
    a search of the whole palette gives for every pixel (squared distance, first entry on a tie)."""
    from cxrtriage.inference.overlay import PALETTE, palette_indices

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (60, 50), dtype=np.uint8)
    canvas = np.repeat(grey[..., None], 3, axis=2)
    canvas[:20] = rng.integers(0, 256, (20, 50, 3), dtype=np.uint8)  # any colour: tint, outlines, text
    canvas[25:30, :5] = (0, 191, 255)  # exactly an entry (the amber of the notice)
    distances = ((canvas[:, :, None, :].astype(np.int32) - PALETTE[None, None].astype(np.int32)) ** 2).sum(axis=3)
    np.testing.assert_array_equal(palette_indices(canvas), distances.argmin(axis=2))
