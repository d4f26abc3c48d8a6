"""Training data: the synthetic generator and the published datasets' layouts.

Every source yields :class:`Example` objects at full resolution;
:func:`prepare` turns one into the model-sized input and target of a stage,
with the same preprocessing the pipeline uses at inference time.

Layouts read:

* ``synthetic``: :class:`~cxrtriage.inference.phantom.PhantomGenerator` seeds.
* ``folder`` (Mendeley 8gf9vpkhgy, lung masks): ``<root>/<dataset>/img/*.png``
  with ``<root>/<dataset>/mask/<same name>``; soft mask edges are cut at 127.
* ``supervisely`` (Mendeley 36fjrg9s69, lungs and COVID-19):
  ``<root>/<dataset>/img/<name>`` with ``<root>/<dataset>/ann/<name>.json``
  whose objects of class "Lungs" / "COVID-19" carry base64, zlib-compressed
  PNG bitmaps pasted at ``bitmap.origin``; the tag "Normal" marks healthy
  images, "Score R" / "Score D" are the raters' 0-6 scores.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from ..phantom import PhantomGenerator
from ..preprocess import equalize, lung_box, masked_lung_crop, resize
from ..radiograph import IMAGE_SUFFIXES, load_image_file

Task = Literal["lungs", "disease"]


@dataclass
class Example:
    """One training image at full resolution."""

    name: str
    image: np.ndarray  # float32 [0, 1], MONOCHROME2
    lungs: np.ndarray  # bool
    disease: np.ndarray | None = None  # bool; None when the source has no disease labels
    label: int | None = None  # 1 diseased, 0 normal; None when unknown
    scores: dict[str, float] | None = None


@dataclass
class Sample:
    """Model-sized input image and targets of one stage."""

    image: np.ndarray  # float32 (S, S)
    mask: np.ndarray  # bool (S, S)
    label: float


def prepare(task: Task, example: Example, size: int, equalize_image: bool = False) -> Sample:
    """Stage I: the whole image and lung mask. Stage II: the masked lung crop."""
    image = equalize(example.image) if equalize_image else example.image
    if task == "lungs":
        return Sample(resize(image, (size, size)), resize(example.lungs, (size, size), nearest=True), 0.0)
    if example.disease is None:
        raise ValueError(f"{example.name}: no disease annotation, cannot train the disease stage on it")
    box = lung_box(example.lungs)
    crop = masked_lung_crop(image, example.lungs, box)
    disease = box.take(example.disease & example.lungs)
    label = example.label if example.label is not None else int(disease.any())
    return Sample(resize(crop, (size, size)), resize(disease, (size, size), nearest=True), float(label))


# -- synthetic -------------------------------------------------------------


def synthetic_example(seed: int) -> Example:
    """A phantom of random size as a training example."""
    phantom = PhantomGenerator(height=None, width=None)(seed)
    return Example(
        name=f"phantom-{seed}",
        image=phantom.image,
        lungs=phantom.lungs,
        disease=phantom.disease,
        label=int(phantom.has_disease),
    )


def _prepare_synthetic(args: tuple[Task, int, int, bool]) -> Sample:
    task, seed, size, equalize_image = args
    return prepare(task, synthetic_example(seed), size, equalize_image)


def synthetic_samples(
    task: Task, seeds: Iterable[int], size: int, workers: int = 2, equalize_image: bool = False
) -> list[Sample]:
    """Prepared samples of the given phantom seeds, drawn on ``workers`` processes."""
    jobs = [(task, s, size, equalize_image) for s in seeds]
    if workers <= 1:
        return [_prepare_synthetic(j) for j in jobs]
    with get_context("spawn").Pool(workers) as pool:
        return pool.map(_prepare_synthetic, jobs, chunksize=16)


# -- published layouts -----------------------------------------------------


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"cannot read mask {path}")
    return mask > 127


def folder_examples(root: str | Path) -> Iterator[Example]:
    """Lung-mask datasets laid out as ``<dataset>/img`` + ``<dataset>/mask``."""
    root = Path(root)
    dataset_dirs = [d for d in sorted(root.iterdir()) if (d / "img").is_dir() and (d / "mask").is_dir()]
    if (root / "img").is_dir() and (root / "mask").is_dir():
        dataset_dirs.insert(0, root)
    if not dataset_dirs:
        raise FileNotFoundError(f"{root}: no <dataset>/img + <dataset>/mask folders found")
    for d in dataset_dirs:
        for img_path in _images(d / "img"):
            mask_path = d / "mask" / img_path.name
            if not mask_path.exists():
                candidates = list((d / "mask").glob(img_path.stem + ".*"))
                if not candidates:
                    continue
                mask_path = candidates[0]
            image = load_image_file(img_path).pixels
            lungs = _read_mask(mask_path)
            if lungs.shape != image.shape:
                lungs = resize(lungs, image.shape, nearest=True)
            yield Example(name=f"{d.name}/{img_path.name}", image=image, lungs=lungs)


def decode_supervisely_bitmap(data: str) -> np.ndarray:
    """A Supervisely bitmap (base64 of a zlib-compressed PNG) as a boolean mask."""
    png = zlib.decompress(base64.b64decode(data))
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ValueError("bitmap is not a PNG")
    if decoded.ndim == 3:
        # RGBA: the alpha channel is the mask; RGB: any non-zero channel.
        decoded = decoded[:, :, 3] if decoded.shape[2] == 4 else decoded.max(axis=2)
    return decoded > 0


def supervisely_masks(ann: dict, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """Masks per class title ("Lungs", "COVID-19") from one annotation JSON."""
    masks: dict[str, np.ndarray] = {}
    for obj in ann.get("objects", []):
        bitmap = obj.get("bitmap")
        if not bitmap:
            continue
        patch = decode_supervisely_bitmap(bitmap["data"])
        x, y = (int(v) for v in bitmap["origin"])
        canvas = masks.setdefault(obj["classTitle"], np.zeros(shape, dtype=bool))
        ph, pw = patch.shape
        ph, pw = min(ph, shape[0] - y), min(pw, shape[1] - x)
        canvas[y : y + ph, x : x + pw] |= patch[:ph, :pw]
    return masks


def supervisely_examples(root: str | Path) -> Iterator[Example]:
    """Supervisely projects: ``<dataset>/img`` + ``<dataset>/ann/<image name>.json``."""
    root = Path(root)
    dataset_dirs = [d for d in sorted(root.iterdir()) if (d / "img").is_dir() and (d / "ann").is_dir()]
    if not dataset_dirs:
        raise FileNotFoundError(f"{root}: no <dataset>/img + <dataset>/ann folders found")
    for d in dataset_dirs:
        for img_path in _images(d / "img"):
            ann_path = d / "ann" / (img_path.name + ".json")
            if not ann_path.exists():
                continue
            ann = json.loads(ann_path.read_text())
            image = load_image_file(img_path).pixels
            masks = supervisely_masks(ann, image.shape)
            if "Lungs" not in masks:
                continue
            tags = {t.get("name"): t.get("value") for t in ann.get("tags", [])}
            disease = masks.get("COVID-19", np.zeros(image.shape, dtype=bool))
            normal = "Normal" in tags
            if not normal and not disease.any():
                continue  # as the authors did: a non-normal image with no lesion is unusable
            scores = {k: float(v) for k, v in tags.items() if k in ("Score R", "Score D") and v is not None}
            yield Example(
                name=f"{d.name}/{img_path.name}",
                image=image,
                lungs=masks["Lungs"],
                disease=disease,
                label=0 if normal else 1,
                scores=scores or None,
            )


def dataset_samples(
    task: Task, layout: str, root: str | Path | None, size: int, equalize_image: bool = False
) -> list[Sample]:
    if layout == "folder":
        return [prepare(task, e, size, equalize_image) for e in folder_examples(root or ".")]
    if layout == "supervisely":
        return [prepare(task, e, size, equalize_image) for e in supervisely_examples(root or ".")]
    raise ValueError(f"unknown dataset layout {layout!r}; use synthetic, folder or supervisely")


# -- DRRs of a chest CT ----------------------------------------------------

#: Volumes loaded in this process (worker processes load each once).
_VOLUMES: dict[str, tuple[object, tuple[np.ndarray, np.ndarray]]] = {}


@dataclass(frozen=True)
class CTSource:
    """Which CT to render: a NIfTI volume + label map, or the shipped CT when both are None."""

    ct: str | None = None
    labels: str | None = None
    lung_labels: tuple[int, ...] = (10, 11, 12, 13, 14)
    spacing_mm: float = 3.0

    def paths(self) -> tuple[Path, Path]:
        from .ct import shipped_ct_paths

        if self.ct is None and self.labels is None:
            return shipped_ct_paths()
        if self.ct is None or self.labels is None:
            raise ValueError("give both the CT volume (--ct) and its label map (--labels), or neither")
        return Path(self.ct), Path(self.labels)

    def key(self) -> str:
        """Cache key: the files (path, size, mtime), labels, grid and renderer version."""
        import hashlib

        from .drr import RENDER_VERSION

        parts = [RENDER_VERSION, ",".join(map(str, self.lung_labels)), f"{self.spacing_mm:.3f}"]
        for p in self.paths():
            st = p.resolve().stat()
            parts += [str(p.resolve()), str(st.st_size), str(int(st.st_mtime))]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def default_drr_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cxrtriage" / "drr"


def prepare_volume(source: CTSource, cache_dir: str | Path) -> Path:
    """Load, clean and resample the CT once; later runs read the cached grid."""
    from .ct import load_ct

    folder = Path(cache_dir) / source.key()
    path = folder / "volume.npz"
    if not path.exists():
        ct, labels = source.paths()
        load_ct(ct, labels, source.lung_labels, source.spacing_mm).save(path)
    return path


def _volume(path: str) -> tuple[object, tuple[np.ndarray, np.ndarray]]:
    from .ct import CTVolume
    from .drr import split_lungs

    if path not in _VOLUMES:
        volume = CTVolume.load(path)
        _VOLUMES[path] = (volume, split_lungs(volume))
    return _VOLUMES[path]


def _unpack(bits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.unpackbits(bits)[: shape[0] * shape[1]].reshape(shape).astype(bool)


def _read_cached(path: Path) -> dict | None:
    """A cached render's arrays (None when absent or torn). Older caches lack the per-side masks."""
    if not path.exists():
        return None
    try:
        with np.load(path) as d:
            rows, cols = (int(v) for v in d["shape"])
            shape = (rows, cols)
            out: dict = {"image": d["image"].astype(np.float32), "disease": _unpack(d["disease"], shape)}
            if "right" in d:
                out["right"], out["left"] = _unpack(d["right"], shape), _unpack(d["left"], shape)
                out["lungs"] = out["right"] | out["left"]
                out["meta"] = json.loads(str(d["meta"]))
            else:
                out["lungs"] = _unpack(d["lungs"], shape)
            return out
    except (OSError, ValueError, KeyError, EOFError):
        return None  # a torn write: render again


def cached_drr(volume_path: str | Path, seed: int):  # -> DRR
    """DRR ``seed`` of a prepared volume, with its truth; rendered once, then read from the cache."""
    from .drr import DRR, render

    cached = Path(volume_path).parent / f"{seed}.npz"
    data = _read_cached(cached)
    if data is not None and "right" in data:
        meta = data["meta"]
        return DRR(seed=seed, image=data["image"], right_lung=data["right"], left_lung=data["left"],
                   disease=data["disease"], affected_zones=(), pixel_spacing_mm=meta["pixel_spacing_mm"],
                   view=meta["view"], lesion=meta["lesion"], params=meta["params"])
    volume, sides = _volume(str(volume_path))
    drr = render(volume, seed, sides=sides)  # type: ignore[arg-type]
    # The cache keeps float16: hand back exactly what a later read gives, so cold and warm runs agree
    drr.image = drr.image.astype(np.float16).astype(np.float32)
    meta = {"view": drr.view, "lesion": drr.lesion, "pixel_spacing_mm": drr.pixel_spacing_mm, "params": drr.params}
    tmp = cached.with_name(f"{seed}.{os.getpid()}.tmp.npz")
    np.savez(tmp, image=drr.image.astype(np.float16), shape=np.array(drr.image.shape),
             right=np.packbits(drr.right_lung), left=np.packbits(drr.left_lung),
             disease=np.packbits(drr.disease), meta=json.dumps(meta, default=float))
    tmp.replace(cached)  # atomic: readers never see half a file
    return drr


def _render_into_cache(args: tuple[str, int]) -> None:
    cached_drr(*args)


def render_drrs(volume_path: str | Path, seeds: Iterable[int], workers: int = 2) -> int:
    """Render the seeds not yet in the cache on ``workers`` processes, so that an evaluation that then reads them
    one by one with :func:`cached_drr` does not render them on one core. Returns how many were rendered."""
    folder = Path(volume_path).parent
    missing = [s for s in seeds if not (folder / f"{s}.npz").exists()]
    jobs = [(str(volume_path), s) for s in missing]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            _render_into_cache(job)
    else:
        with get_context("spawn").Pool(min(workers, len(jobs)), initializer=_worker_init) as pool:
            pool.map(_render_into_cache, jobs, chunksize=2)
    return len(missing)


def drr_example(volume_path: str | Path, seed: int) -> Example:
    """DRR ``seed`` as a training example (from the cache when rendered before)."""
    data = _read_cached(Path(volume_path).parent / f"{seed}.npz")
    if data is None:
        drr = cached_drr(volume_path, seed)
        return Example(f"drr-{seed}", drr.image, drr.lungs, drr.disease, int(drr.has_disease))
    return Example(f"drr-{seed}", data["image"], data["lungs"], data["disease"], int(data["disease"].any()))


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one render per worker process: no thread oversubscription


def _prepare_drr(args: tuple[Task, str, int, int, bool]) -> Sample:
    task, volume_path, seed, size, equalize_image = args
    return prepare(task, drr_example(volume_path, seed), size, equalize_image)


def drr_samples(
    task: Task,
    seeds: Iterable[int],
    size: int,
    source: CTSource | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    equalize_image: bool = False,
) -> list[Sample]:
    """Prepared samples of DRR seeds, rendered (or read from the cache) on ``workers`` processes."""
    volume_path = str(prepare_volume(source or CTSource(), cache_dir or default_drr_cache()))
    jobs = [(task, volume_path, s, size, equalize_image) for s in seeds]
    if workers <= 1:
        return [_prepare_drr(j) for j in jobs]
    with get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        return pool.map(_prepare_drr, jobs, chunksize=4)
