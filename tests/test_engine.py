"""The scoring engine's CPU dry run: batches formed across jobs, a shared-memory hand-off, the pipeline's scores.

One engine process (``device: cpu``) with its CPU workers (two cores' worth)
serves the whole module. On the CPU the workers score whole jobs and send
the engine their network calls; the whole-image hand-off that an engine on
a device takes is tested here too, through the same engine. Two tests kill
it and check that a job then fails with the reason instead of hanging, and
that the next job starts a new engine.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from scipy import ndimage

from cxrtriage.config import InferenceSettings
from cxrtriage.inference import engine_jobs
from cxrtriage.inference.device_ops import (
    boxes_of,
    crop_to_input,
    lung_blobs_batch,
    lung_masks_batch,
    model_input,
)
from cxrtriage.inference.engine import CPU_MAX_BATCH, EngineError, EngineOutput, EngineReply
from cxrtriage.inference.engine_jobs import EnginePool, Prepared
from cxrtriage.inference.instance import InstanceRefused, InstanceScored, score_instance
from cxrtriage.inference.phantom import PhantomGenerator, write_cr
from cxrtriage.inference.pipeline import (
    Pipeline,
    lung_crop,
    lung_kernel,
    model_blobs,
    model_inputs,
    stage_sources,
)
from cxrtriage.inference.preprocess import CropBox
from cxrtriage.inference.radiograph import load_dicom
from cxrtriage.inference.shm import (
    SEGMENT_PREFIX,
    Block,
    create_ring,
    open_block,
    unlink,
    write_beside,
    write_block,
    write_slot,
)
from cxrtriage.stages.engine_scorer import EngineScorer

SEED = 2_300_000
SETTINGS = InferenceSettings(max_batch=8, max_wait_ms=1500)  # a long wait: jobs of one burst share a batch


@pytest.fixture(scope="module")
def crs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three phantom CRs of different sizes and findings."""
    folder = tmp_path_factory.mktemp("engine-crs")
    zones = ((0, 3), (), (1, 2, 4, 5))
    return [write_cr(PhantomGenerator(900 + 40 * i, 760 + 30 * i)(SEED + i, affected_zones=zones[i]),
                     folder / f"cr{i}.dcm") for i in range(3)]


@pytest.fixture(scope="module")
def lateral(crs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = pydicom.dcmread(crs[0])
    ds.ViewPosition = "LL"
    path = tmp_path_factory.mktemp("engine-bad") / "lateral.dcm"
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def reference(crs: list[Path], pipeline: Pipeline) -> list[InstanceScored | InstanceRefused]:
    """What the pool's workers (and LocalScorer) compute: score_instance on the whole in-process pipeline."""
    return [score_instance(pipeline, path, f"uid-{i}") for i, path in enumerate(crs)]


@pytest.fixture(scope="module")
def pool() -> Iterator[EnginePool]:
    # a ring of 2 slots: some jobs' images go through the ring, the others (no free slot) through segments
    with EnginePool(SETTINGS, workers=2, ring_slots=2) as engine_pool:
        engine_pool.warm_up()
        yield engine_pool


@pytest.fixture(scope="module")
def worker_here() -> None:
    """This process as an engine CPU worker (specs loaded, no models), to call prepare() directly."""
    engine_jobs._start_worker(SETTINGS.model_dump_json(), 0)


def _segments(pids: Iterable[int] | None = None) -> set[str]:
    """Our shared-memory segments in /dev/shm; with ``pids``, only those these processes made (tests in the
    other xdist worker make theirs at the same time)."""
    prefixes = tuple(f"{SEGMENT_PREFIX}{pid}_" for pid in pids) if pids is not None else (SEGMENT_PREFIX,)
    return {name for name in os.listdir("/dev/shm") if name.startswith(prefixes)}


def _pool_pids(pool: EnginePool) -> set[int]:
    """The engine's and the CPU workers' process ids (and this process's, which makes the ring)."""
    workers = set(getattr(pool.executor, "_processes", {}) or {})
    return {os.getpid(), *workers, *([pool.engine.pid] if pool.engine.pid else [])}


def _arrays_inside(value: object) -> list[str]:
    """Names of numpy arrays anywhere in a message (dataclasses, tuples, lists, dicts)."""
    if isinstance(value, np.ndarray):
        return [f"ndarray{value.shape}"]
    if is_dataclass(value) and not isinstance(value, type):
        return [a for f in fields(value) for a in _arrays_inside(getattr(value, f.name))]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays_inside(v)]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays_inside(v)]
    return []


def test_device_ops_give_the_cpu_pipelines_masks_box_and_stage2_input(crs: list[Path], pipeline: Pipeline) -> None:
    """The torch post-processing the engine runs on a GPU, checked here on CPU tensors against the OpenCV path."""
    lung_spec, disease_spec = pipeline.lungs_model.spec, pipeline.disease_model.spec
    settings = pipeline.settings
    for path in crs[:1]:
        r = load_dicom(path)
        stage1, stage2 = stage_sources(r, lung_spec, disease_spec)
        prob = pipeline.lungs_model(model_inputs([stage1], lung_spec))[0][0]
        # Stage I's input made on the device from the image (inference.stage1_on_device): OpenCV's, to rounding
        x1 = model_input(torch.from_numpy(stage1), lung_spec.input_size, *lung_spec.channel_stats())
        np.testing.assert_allclose(x1.numpy(), model_inputs([stage1], lung_spec)[0], rtol=0, atol=1e-4)
        expected = lung_crop(stage2, prob, lung_spec.pixel_threshold, settings.min_lung_blob_fraction,
                             settings.crop_margin)
        blobs = model_blobs(prob, lung_spec.pixel_threshold, settings.min_lung_blob_fraction)
        # a batch of that image's blobs and of none: its lungs, and no lung at all
        planes = torch.from_numpy(np.stack([np.stack(blobs), np.zeros_like(np.stack(blobs))]))
        masks = lung_masks_batch(planes, r.shape, lung_spec.pixel_threshold)
        lungs = masks[0]
        assert np.count_nonzero(lungs.numpy() != expected.lungs) <= 1e-4 * expected.lungs.size
        assert not masks[1].any()
        # their boxes: the pipeline's, and the whole image where no lung was found
        boxes = boxes_of(masks, settings.crop_margin)
        assert boxes == [expected.box, CropBox(0, r.shape[0], 0, r.shape[1])]
        x = crop_to_input(torch.from_numpy(stage2), lungs, boxes[0], disease_spec.input_size,
                          *disease_spec.channel_stats())
        want = model_inputs([expected.crop], disease_spec)[0]
        assert x.shape == want.shape
        np.testing.assert_allclose(x.numpy(), want, atol=2e-3)


class _NoStream:
    """What DeviceStages asks of a CUDA stream, doing nothing: on CPU tensors every step is already in order."""

    def __init__(self, *args: object, **kwargs: object) -> None: ...
    def record_event(self) -> None: ...
    def synchronize(self) -> None:
        raise AssertionError("a stream sync spins a CPU core: the engine waits on blocking events")

    def wait_event(self, event: object) -> None: ...
    def wait_stream(self, stream: object) -> None: ...


@dataclass
class _FakeCuda:
    registered: list[tuple[int, int]]  # (address, size) of each cudaHostRegister
    waits: list[bool]  # each event wait: blocking (asleep) or not


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> _FakeCuda:
    """CUDA's streams, events and pinned memory stubbed, so that DeviceStages runs here on CPU tensors (the
    machine has no GPU)."""
    import contextlib

    empty = torch.empty
    fake = _FakeCuda([], [])

    class _Cudart:
        @staticmethod
        def cudaHostRegister(address: int, size: int, flags: int) -> int:  # noqa: N802 (CUDA's name)
            fake.registered.append((address, size))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: _Cudart)
    monkeypatch.setattr(torch.cuda, "Stream", _NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _NoStream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))

    class _Event:  # the engine waits on blocking events (asleep), never by spinning in a stream sync
        def __init__(self, blocking: bool = False) -> None:
            self.blocking = blocking

        def record(self, stream: object = None) -> None: ...

        def synchronize(self) -> None:
            fake.waits.append(self.blocking)

    monkeypatch.setattr(torch.cuda, "Event", _Event)
    return fake


def test_the_device_stages_give_the_host_stages_outputs_from_either_hand_off(
    crs: list[Path], worker_here: None, fake_cuda: _FakeCuda
) -> None:
    """DeviceStages, the engine's GPU path, run here on CPU tensors (CUDA's streams and pinned memory
    stubbed): a batch of 3 padded to the bucket of 4, Stage II's image uploaded as float32 or looked up from
    stored values, and Stage I's input uploaded or made on the device from that image
    (inference.stage1_on_device), gives HostStages' box, P(disease) and model outputs."""
    from cxrtriage.inference.engine import DeviceStages, HostStages, _run_batch

    registered, waits = fake_cuda.registered, fake_cuda.waits
    settings = SETTINGS.model_copy(update={"precision": "fp32", "backend": "torch"})  # the device's networks
    host, device = HostStages(settings), DeviceStages(settings, torch.device("cpu"))
    assert device.buckets == (1, 2, 4, 8)
    ring, segment = create_ring(len(crs), 8 << 20)
    host_outputs: list[list[dict[str, np.ndarray]]] = []
    for stored_values, in_ring, stage1_on_device in ((False, False, False), (True, False, False),
                                                     (True, True, False), (True, True, True)):
        prepared = [engine_jobs.prepare(path, f"uid-{i}", False, stored_values, (ring, i) if in_ring else None,
                                        stage1_on_device) for i, path in enumerate(crs)]
        blocks = [(i, p.block) for i, p in enumerate(prepared) if isinstance(p, Prepared)]
        assert all(block.in_ring == in_ring for _, block in blocks)
        for _, block in blocks:
            with open_block(block) as arrays:
                assert ("stage1" in arrays) != stage1_on_device and ("codes" in arrays) == stored_values
        try:
            waits.clear()
            want = _run_batch(host, blocks, 1)
            wanted = []  # copied: in a ring, the second run's outputs go into the same slots
            for w in want:
                assert w.output is not None, w.error
                assert w.output.block.in_ring == in_ring  # beside the input, in its slot
                with open_block(w.output.block) as a:
                    wanted.append({key: array.copy() for key, array in a.items()})
                unlink(w.output.block)
            if stage1_on_device:  # the host makes the left-out input as the worker would have: the same outputs
                for a, b in zip(wanted, host_outputs[-1]):
                    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
            host_outputs.append(wanted)
            got = _run_batch(device, blocks, 1)
            assert waits == [True, True, True]  # after Stage I, after Stage II, the copy stream
            for w, g, a in zip(want, got, wanted):
                assert w.output is not None and g.output is not None, g.error
                assert g.output.box == w.output.box
                assert g.output.p_disease == pytest.approx(w.output.p_disease, abs=1e-4)
                with open_block(g.output.block) as b:
                    # float32 rounding only: a padded batch may take other kernels (DeepLabV3+'s do)
                    np.testing.assert_allclose(b["prob"], a["prob"], rtol=0, atol=1e-5)
                    np.testing.assert_allclose(b["seg"], a["seg"], atol=2e-3)
                unlink(g.output.block)
        finally:
            for _, block in blocks:
                unlink(block)
    assert device.rings == {ring.name: registered[0]} and registered[0][1] == segment.size  # page-locked once
    segment.close()
    segment.unlink()


def test_a_ring_takes_at_most_half_of_dev_shm_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engine_jobs, "_shm_free_bytes", lambda: 5 * engine_jobs.RING_SLOT_BYTES)
    with EnginePool(SETTINGS, workers=1, ring_slots=10) as small:  # nothing started: no engine, no worker
        assert small.ring is not None and small.ring.count == 2
    assert "ring cut from 10 to 2 slots" in caplog.text
    monkeypatch.setattr(engine_jobs, "_shm_free_bytes", lambda: 0)
    with EnginePool(SETTINGS, workers=1, ring_slots=10) as none:
        assert none.ring is None  # every image then goes through a segment of its own


def test_a_ring_slot_holds_a_block_and_stays_mapped() -> None:
    ring, segment = create_ring(2, 1 << 16)
    try:
        arrays = {"codes": np.arange(6000, dtype=np.uint16).reshape(60, 100), "table": np.ones(7, np.float32)}
        block = write_slot(ring, 1, arrays)
        assert block is not None and block.in_ring and block.name == ring.name
        assert all(ring.slot_bytes <= slot.offset < 2 * ring.slot_bytes for slot in block.slots)  # slot 1
        assert len(pickle.dumps(block)) < 500
        for _ in range(2):
            with open_block(block) as views:
                for key, array in arrays.items():
                    np.testing.assert_array_equal(views[key], array)
        unlink(block)  # the slot's owner takes it back; the segment stays
        assert ring.name.lstrip("/") in _segments()
        assert write_slot(ring, 0, {"big": np.zeros(1 << 15, np.float32)}) is None  # 128 KiB: not in a slot
        assert write_slot(ring, 2, arrays) is None  # no such slot
    finally:
        segment.close()
        segment.unlink()


def test_outputs_go_beside_the_input_in_its_ring_slot_where_they_fit() -> None:
    ring, segment = create_ring(2, 1 << 16)
    try:
        inputs = {"codes": np.arange(6000, dtype=np.uint16).reshape(60, 100), "table": np.ones(7, np.float32)}
        block = write_slot(ring, 0, inputs)
        assert block is not None
        outputs = {"prob": np.full((64, 64), 0.25, np.float32), "seg": np.full((32, 32), 0.75, np.float32)}
        beside = write_beside(block, outputs)  # 12 KB + 16 KB + 4 KB in a 64 KB slot
        assert beside.in_ring and beside.name == ring.name
        first = min(slot.offset for slot in beside.slots)
        assert first >= max(slot.offset + inputs[slot.key].nbytes for slot in block.slots)  # after the input
        assert max(slot.offset for slot in beside.slots) < ring.slot_bytes  # slot 0, not slot 1
        with open_block(block) as views:  # the input is untouched
            for key, array in inputs.items():
                np.testing.assert_array_equal(views[key], array)
        with open_block(beside) as views:
            for key, array in outputs.items():
                np.testing.assert_array_equal(views[key], array)
        big = write_beside(block, {"prob": np.zeros((128, 128), np.float32)})  # 64 KB: no room left in the slot
        try:
            assert not big.in_ring and big.name != ring.name
        finally:
            unlink(big)
        alone = write_block(inputs)  # not in a ring: a new segment
        try:
            elsewhere = write_beside(alone, outputs)
            assert not elsewhere.in_ring and elsewhere.name != alone.name
            unlink(elsewhere)
        finally:
            unlink(alone)
    finally:
        segment.close()
        segment.unlink()


def test_a_block_travels_by_name_and_is_freed() -> None:
    arrays: dict[str, np.ndarray] = {"pixels": np.random.default_rng(1).random((300, 200), dtype=np.float32),
              "labels": np.arange(12, dtype=np.uint8).reshape(3, 4)}
    block = write_block(arrays)
    try:
        assert len(pickle.dumps(block)) < 500 and not _arrays_inside(block)
        with open_block(block) as views:
            for key, array in arrays.items():
                np.testing.assert_array_equal(views[key], array)
    finally:
        unlink(block)
    assert block.name.lstrip("/") not in _segments()
    unlink(block)  # a second unlink is harmless


def test_device_lanes_run_batches_at_once_on_their_own_streams_with_the_same_outputs(
    crs: list[Path], worker_here: None, fake_cuda: _FakeCuda
) -> None:
    """inference.device_lanes: two threads through one DeviceStages at the same time (as two engine lanes)
    each get their own streams and staging buffers, and the outputs of one lane's batch alone."""
    from cxrtriage.inference.engine import DeviceStages, _run_batch

    settings = SETTINGS.model_copy(update={"precision": "fp32"})
    device = DeviceStages(settings, torch.device("cpu"))
    prepared = [engine_jobs.prepare(path, f"uid-{i}", False, True) for i, path in enumerate(crs)]
    blocks = [(i, p.block) for i, p in enumerate(prepared) if isinstance(p, Prepared)]
    try:
        alone = _run_batch(device, blocks, 1)
        barrier = threading.Barrier(2)
        lanes: list[object] = []

        def one_lane(number: int) -> list[EngineReply]:
            barrier.wait()
            replies = _run_batch(device, blocks, number, lane=number)
            lanes.append(device.lane)
            return replies

        with ThreadPoolExecutor(2) as threads:
            together = list(threads.map(one_lane, (2, 3)))
        assert len({id(lane) for lane in lanes}) == 2  # a lane each: own streams, buffers and clock
        for replies in together:
            for want, got in zip(alone, replies):
                assert want.output is not None and got.output is not None, (want.error, got.error)
                assert got.output.box == want.output.box and got.output.p_disease == want.output.p_disease
                with open_block(want.output.block) as a, open_block(got.output.block) as b:
                    np.testing.assert_array_equal(b["prob"], a["prob"])
                    np.testing.assert_array_equal(b["seg"], a["seg"])
                unlink(got.output.block)
    finally:
        for reply in alone:
            if reply.output is not None:
                unlink(reply.output.block)
        for _, block in blocks:
            unlink(block)


def test_lung_blobs_found_on_the_device_are_the_hosts_to_the_last_bit(pipeline: Pipeline, crs: list[Path]) -> None:
    """inference.lung_blobs_on_device: opening, closing, small-blob removal and the two largest blobs as torch
    operations give model_blobs' planes exactly, on Stage I's maps of the CRs (at 256 px and brought to the
    paper's 512), on maps of many blobs with small ones among them, and on an empty map, in one batch."""
    lung_spec = pipeline.lungs_model.spec
    threshold, min_fraction = lung_spec.pixel_threshold, pipeline.settings.min_lung_blob_fraction
    disease_spec = pipeline.disease_model.spec
    maps = [pipeline.lungs_model(model_inputs([stage_sources(load_dicom(path), lung_spec, disease_spec)[0]],
                                              lung_spec))[0][0] for path in crs]
    rng = np.random.default_rng(SEED)
    for size in (256, 512):
        batch = [m if m.shape[0] == size else cv2.resize(m, (size, size)) for m in maps]
        for sigma in (size / 30, size / 60):  # blobby noise: tens of components, most of them small
            noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
            above = np.quantile(noise, 0.7)  # 30 % of the map above the threshold, in many blobs
            batch.append(np.clip((noise - above) / np.ptp(noise) + threshold, 0, 1).astype(np.float32))
        batch += [0.9 * m for m in _long_thin_blobs(size)]
        squares = np.zeros((size, size), np.float32)  # three blobs of one area: the first two in raster order
        for top, left in ((size // 2, size // 10), (size // 10, size // 2), (size // 2, size // 2)):
            squares[top:top + size // 8, left:left + size // 8] = 0.9
        batch += [squares, np.zeros((size, size), np.float32)]
        got = lung_blobs_batch(torch.from_numpy(np.stack(batch)), threshold, min_fraction, lung_kernel((size, size)))
        assert got is not None and got.shape == (len(batch), 2, size, size)
        counts = []
        for prob, planes in zip(batch, got.numpy()):
            want = model_blobs(prob, threshold, min_fraction)
            counts.append(len(want))
            np.testing.assert_array_equal(planes, np.stack(want + [np.zeros_like(prob)] * (2 - len(want))))
        assert counts[:3] == [2, 2, 2] and counts[5:7] == [1, 1] and counts[-1] == 0  # two lungs each; one
        # crescent, one serpentine; nothing in the empty map
        for noise in batch[3:5]:  # many components, some of them below min_fraction, which both drop
            labels, n = ndimage.label(noise > threshold, structure=np.ones((3, 3)))
            assert n > 4 and (np.bincount(labels.ravel())[1:] < min_fraction * size * size).any()


def _long_thin_blobs(size: int) -> list[np.ndarray]:
    """A crescent and a serpentine, as ``bench/label_rounds.py`` counts their rounds: blobs whose far ends a
    3 x 3 minimum alone joins only after hundreds of rounds at 512 px (about 240 and 430; over
    MAX_LABEL_ROUNDS, the serpentine went to the host)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from label_rounds import shapes

    maps = shapes(size)
    return [maps["crescent"].astype(np.float32), maps["serpentine"].astype(np.float32)]


def test_lung_blobs_on_the_device_keep_a_blob_of_exactly_the_smallest_area_as_the_host_does() -> None:
    """min_fraction at a blob's exact area: the host keeps it (area >= min_fraction * pixels) and drops the
    smaller one; so does the device, comparing whole pixels."""
    size = 256
    prob = np.zeros((size, size), np.float32)
    for top, left, side in ((20, 20, 30), (120, 30, 12), (60, 150, 11)):
        prob[top:top + side, left:left + side] = 0.9
    kernel = lung_kernel(prob.shape)
    mask = cv2.morphologyEx(cv2.morphologyEx((prob > 0.5).astype(np.uint8), cv2.MORPH_OPEN, kernel),
                            cv2.MORPH_CLOSE, kernel)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    areas = sorted(np.bincount(labels.ravel())[1:])
    assert len(areas) == 3 and areas[0] < areas[1] < areas[2]
    fraction = areas[1] / prob.size  # the middle blob exactly at the limit
    want = model_blobs(prob, 0.5, fraction)
    assert [int(np.count_nonzero(b)) for b in want] == [areas[2], areas[1]]  # kept; the smallest dropped
    got = lung_blobs_batch(torch.from_numpy(prob)[None], 0.5, fraction, kernel)
    assert got is not None
    np.testing.assert_array_equal(got[0].numpy(), np.stack(want))


def test_the_device_stages_find_blobs_on_the_device_or_on_the_host_with_the_same_outputs(
    crs: list[Path], worker_here: None, fake_cuda: _FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device engine with its blobs found on the device gives the outputs of one that finds them on host
    threads; a labelling that does not settle in MAX_LABEL_ROUNDS goes to the host's threads."""
    from cxrtriage.inference import device_ops
    from cxrtriage.inference.engine import DeviceStages, _run_batch

    device = DeviceStages(SETTINGS.model_copy(update={"precision": "fp32"}), torch.device("cpu"))
    assert not device.switches.blobs_on_device  # inference.lung_blobs_on_device: off by default
    prepared = [engine_jobs.prepare(path, f"uid-{i}", False, True) for i, path in enumerate(crs)]
    blocks = [(i, p.block) for i, p in enumerate(prepared) if isinstance(p, Prepared)]
    runs: dict[str, list[EngineReply]] = {}
    try:
        for name, on_device, rounds in (("host", False, device_ops.MAX_LABEL_ROUNDS),
                                        ("device", True, device_ops.MAX_LABEL_ROUNDS), ("unsettled", True, 4)):
            device.switches.blobs_on_device = on_device
            monkeypatch.setattr(device_ops, "MAX_LABEL_ROUNDS", rounds)
            runs[name] = _run_batch(device, blocks, 1)
        for name, step in (("host", "blobs"), ("device", "blobs_device"), ("unsettled", "blobs")):
            assert all(r.output is not None and step in r.output.steps_ms for r in runs[name]), name
        for host, *others in zip(runs["host"], runs["device"], runs["unsettled"]):
            for other in others:
                assert host.output is not None and other.output is not None
                assert other.output.box == host.output.box and other.output.p_disease == host.output.p_disease
                with open_block(host.output.block) as a, open_block(other.output.block) as b:
                    np.testing.assert_array_equal(b["prob"], a["prob"])
                    np.testing.assert_array_equal(b["seg"], a["seg"])
    finally:
        for replies in runs.values():
            for reply in replies:
                if reply.output is not None:
                    unlink(reply.output.block)
        for _, block in blocks:
            unlink(block)


def test_a_failed_device_batch_waits_for_its_streams_before_the_error_goes_on(
    crs: list[Path], worker_here: None, fake_cuda: _FakeCuda, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage II failing (out of device memory, say) after Stage I's wait: the lane waits, asleep, for its compute
    and copy streams before the error leaves, so its next batch cannot refill buffers a copy still reads."""
    from cxrtriage.inference.engine import DeviceStages

    device = DeviceStages(SETTINGS.model_copy(update={"precision": "fp32"}), torch.device("cpu"))
    run = device._run

    def out_of_memory_in_stage2(model: object, x: torch.Tensor) -> tuple[object, object]:
        if model is device.models[1]:
            raise RuntimeError("CUDA out of memory (in this test)")
        return run(model, x)

    monkeypatch.setattr(device, "_run", out_of_memory_in_stage2)
    prepared = engine_jobs.prepare(crs[0], "uid-0", False, True)
    assert isinstance(prepared, Prepared)
    try:
        with open_block(prepared.block) as arrays:
            fake_cuda.waits.clear()
            with pytest.raises(RuntimeError, match="out of memory"):
                device([arrays])
        assert fake_cuda.waits == [True, True, True]  # after Stage I; then the compute and the copy streams
    finally:
        unlink(prepared.block)


def test_jobs_submitted_together_share_a_batch_and_score_like_the_pipeline(
    pool: EnginePool, crs: list[Path], lateral: Path, reference: list[InstanceScored | InstanceRefused]
) -> None:
    """On the CPU each worker scores a whole job as the pool does, its two network calls batched in the engine
    with other jobs' calls (engine_link); the same scores and SEG UIDs as the in-process pipeline."""
    scorer = EngineScorer(SETTINGS, pool=pool)
    assert pool.networks_only and pool.processes == engine_jobs.JOBS_PER_CORE * pool.workers
    before_batches, before_segments = pool.engine.batch_sizes.copy(), _segments(_pool_pids(pool))
    jobs = [*crs, lateral]
    with ThreadPoolExecutor(len(jobs)) as threads:
        outcomes = list(threads.map(lambda i: scorer(jobs[i], f"uid-{i}", None), range(len(jobs))))
    sizes = pool.engine.batch_sizes - before_batches
    assert max(sizes) > 1, f"no batch formed across jobs: {dict(sizes)}"
    # on the CPU one lane per core, each running its batches (at most CPU_MAX_BATCH) at one torch thread
    assert (pool.engine.lanes, pool.engine.threads) == (os.cpu_count(), 1) and max(sizes) <= CPU_MAX_BATCH
    # each scored image went through each network once; the lateral never reached the engine
    assert sum(size * count for size, count in sizes.items()) == 2 * len(crs)

    refused = outcomes[-1]
    assert isinstance(refused, InstanceRefused) and refused.reason == "lateral_view"
    for got, want in zip(outcomes[:-1], reference):
        assert isinstance(got, InstanceScored) and isinstance(want, InstanceScored)
        assert (got.total, got.brixia_total) == (want.total, want.brixia_total)
        assert got.details["zones"] == want.details["zones"]
        assert got.p_disease == pytest.approx(want.p_disease, abs=1e-3)
        assert got.seg.sop_instance_uid == want.seg.sop_instance_uid  # same source, same models: same UIDs
        assert got.seconds["inference"] > 0 and got.seconds["dicom_results"] > 0
        assert {"stage1", "crop", "stage2", "scoring"} <= set(got.details["timings_ms"])
    # the bundled models' scores, non-empty masks included: the truths 2, 0, 4 (docs/model-card.md, disease round
    # 13 at T = 0.30; with round 11 at T = 0.45 they were 1, 0, 3)
    assert [o.total for o in outcomes[:-1]] == [2, 0, 4]  # type: ignore[union-attr]
    assert _segments(_pool_pids(pool)) <= before_segments  # every block of these jobs was unlinked


def test_lanes_parked_by_the_client_take_no_batches_until_let_go(
    pool: EnginePool, crs: list[Path], worker_here: None
) -> None:
    """EngineSwitches.lanes: a started engine's lanes beyond it take no more batches (a benchmark so compares
    one lane with all on one warm engine); a lane waiting for work when parked takes at most that one batch."""
    engine, switches = pool.engine, pool.engine.switches
    if switches.started_lanes < 2:
        pytest.skip("one core: the CPU engine started one lane")
    prepared = [p for p in (engine_jobs.prepare(path, f"uid-{i}", False, True) for i, path in enumerate(crs))
                if isinstance(p, Prepared)]

    def lanes_of(blocks: list[Block]) -> list[int]:
        outputs = [f.result(timeout=120) for f in [engine.submit(block) for block in blocks]]
        for output in outputs:
            unlink(output.block)
        return [output.lane for output in outputs]

    try:
        with pytest.raises(ValueError, match="lanes must be 1 to"):
            switches.lanes = switches.started_lanes + 1
        switches.lanes = 1
        lanes_of([prepared[0].block])  # the one batch a lane already waiting for work may still take
        assert set(lanes_of([p.block for p in prepared] * 3)) == {0}
        switches.lanes = switches.started_lanes  # let go: the parked lanes take batches again
        seen: set[int] = set()
        for _ in range(20):
            seen.update(lanes_of([p.block for p in prepared] * 2))
            if len(seen) == switches.started_lanes:
                break
        assert seen == set(range(switches.started_lanes))
    finally:
        switches.lanes = switches.started_lanes
        for p in prepared:
            unlink(p.block)


def test_network_calls_reach_only_an_engine_that_knows_the_workers_key(pool: EnginePool) -> None:
    """The engine's socket is in a directory of its own, mode 0700; a peer without the multiprocessing key is
    refused before anything it sends is unpickled, and the engine goes on serving."""
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    address = pool.engine.worker_address()
    assert os.stat(os.path.dirname(address)).st_mode & 0o777 == 0o700
    with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
        Client(address, family="AF_UNIX", authkey=b"not the key").send("hello")
    assert pool.engine.worker_address() == address  # the same engine, still up


def test_each_cpu_worker_runs_torch_and_opencv_at_its_share_of_the_cores(pool: EnginePool) -> None:
    """One worker process per core wants one thread in each library, not a pool per core in every worker."""
    import cv2

    share = max(1, (os.cpu_count() or 1) // pool.workers)
    assert pool.executor.submit(cv2.getNumThreads).result(timeout=60) == share
    assert pool.executor.submit(torch.get_num_threads).result(timeout=60) == share


@pytest.mark.parametrize("stage1_on_device", [False, True])
def test_stored_values_handed_to_the_engine_give_the_pipelines_result_overlay_and_secondary_capture(
    pool: EnginePool, crs: list[Path], pipeline: Pipeline, worker_here: None, tmp_path: Path, stage1_on_device: bool
) -> None:
    """The hand-off an engine on a GPU gets: Stage II's image as stored values + table (half the bytes of
    its float32 copy), the pixels for the overlay and SC beside them, and Stage I's input unless the engine
    makes it (inference.stage1_on_device); same scores and pictures."""
    prepared = engine_jobs.prepare(crs[2], "uid-2", keep_pixels=True, stored_values=True,
                                   stage1_on_device=stage1_on_device)
    assert isinstance(prepared, Prepared)
    assert {(slot.key, slot.dtype) for slot in prepared.block.slots} == {
        ("codes", "<u2"), ("table", "<f4"), ("pixels", "<f4")} | (set() if stage1_on_device else {("stage1", "<f4")})
    output = pool.engine.submit(prepared.block).result(timeout=120)
    try:
        got = engine_jobs.finish(prepared, output, tmp_path / "engine.png", False, True)
    finally:
        unlink(prepared.block)
        unlink(output.block)
    want = score_instance(pipeline, crs[2], "uid-2", tmp_path / "pipeline.png", secondary_capture=True)
    assert isinstance(want, InstanceScored) and got.details["zones"] == want.details["zones"]
    assert got.sc is not None and want.sc is not None
    got_sc, want_sc = (pydicom.dcmread(io.BytesIO(x.data)) for x in (got.sc, want.sc))  # UIDs and times differ
    assert got_sc.PixelData == want_sc.PixelData
    assert (tmp_path / "engine.png").read_bytes() == (tmp_path / "pipeline.png").read_bytes()


def test_the_hand_off_messages_carry_names_not_pixels(
    pool: EnginePool, crs: list[Path], worker_here: None
) -> None:
    prepared = [engine_jobs.prepare(path, f"uid-{i}") for i, path in enumerate(crs)]
    assert all(isinstance(p, Prepared) for p in prepared)
    blocks = [p.block for p in prepared if isinstance(p, Prepared)]
    gone = Block("psm_cxrtriage_gone", blocks[0].slots)  # its segment does not exist: this job alone fails
    futures = [pool.engine.submit(b) for b in [blocks[0], gone, *blocks[1:]]]
    outputs: list[EngineOutput] = []
    try:
        with pytest.raises(EngineError, match="input not readable"):
            futures[1].result(timeout=120)
        outputs = [f.result(timeout=120) for f in (futures[0], *futures[2:])]
        for message in [*((0, b) for b in blocks), *outputs, *prepared]:
            assert not _arrays_inside(message)
            assert len(pickle.dumps(message)) < 2000
        # the bad input shared the first image's batch (on the CPU at most CPU_MAX_BATCH); the others scored
        assert outputs[0].batch_size == min(4, CPU_MAX_BATCH)
        if pool.engine.lanes > 1 and CPU_MAX_BATCH == 2:  # the next batch went to the lane that was free
            assert outputs[1].batch == outputs[2].batch != outputs[0].batch
            assert outputs[1].lane == outputs[2].lane != outputs[0].lane
        with open_block(outputs[0].block) as arrays:
            assert set(arrays) == {"prob", "seg"}  # model resolution only: no 5-megapixel mask leaves the engine
            assert arrays["prob"].shape == (256, 256) and arrays["seg"].shape == (256, 256)
            assert 0.0 <= arrays["prob"].min() and arrays["prob"].max() <= 1.0 and arrays["prob"].max() > 0.5
    finally:
        for block in [*blocks, *(o.block for o in outputs)]:
            unlink(block)


def test_a_dead_engine_fails_its_jobs_with_the_reason_and_the_next_job_restarts_it(
    pool: EnginePool, crs: list[Path], worker_here: None
) -> None:
    prepared = engine_jobs.prepare(crs[1], "uid-1")
    assert isinstance(prepared, Prepared)
    pid = pool.engine.pid
    assert pid is not None
    try:
        os.kill(pid, signal.SIGSTOP)  # the job surely reaches a live engine that has not answered yet
        future = pool.engine.submit(prepared.block)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineError, match=r"exited \(code -9\)"):
            future.result(timeout=30)
        output = pool.engine.submit(prepared.block).result(timeout=120)
        assert pool.engine.pid not in (None, pid)
        unlink(output.block)
    finally:
        unlink(prepared.block)


def test_a_killed_nodes_engine_socket_directory_goes_when_the_next_engine_starts(tmp_path: Path) -> None:
    """A node killed with SIGKILL leaves its engine's socket directory behind; the next one removes it, and
    never a live process's."""
    import subprocess
    import tempfile

    from cxrtriage.inference.engine_link import SOCKET_DIR_PREFIX, socket_dir

    dead_pid = subprocess.Popen(["true"])  # a process that has ended: its pid is free
    dead_pid.wait()
    left = Path(tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{dead_pid.pid}-"))
    (left / "engine.sock").write_bytes(b"")
    live = Path(tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-"))
    made = Path(socket_dir())
    try:
        assert not left.exists() and live.is_dir() and made.is_dir()
        assert made.name.startswith(f"{SOCKET_DIR_PREFIX}{os.getpid()}-") and made.stat().st_mode & 0o777 == 0o700
    finally:
        for path in (left, live, made):
            if path.exists():
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()


def test_an_engine_that_dies_under_a_workers_job_fails_it_with_the_reason_and_the_next_job_restarts_it(
    pool: EnginePool, crs: list[Path]
) -> None:
    pid = pool.engine.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the job's network call waits on a live engine that does not answer
    with ThreadPoolExecutor(1) as thread:
        job = thread.submit(pool.score, crs[0], "uid-dies")
        try:
            job.result(timeout=3)
        except TimeoutError:
            pass
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="scoring engine is gone"):
            job.result(timeout=60)
    again = pool.score(crs[0], "uid-again")
    assert isinstance(again, InstanceScored) and again.total == 2
    assert pool.engine.pid not in (None, pid)


def test_a_node_scores_through_the_engine(crs: list[Path], tmp_path: Path) -> None:
    """workers.scoring_engine wires the engine into the node: images received over DICOM are scored once each."""
    from sqlalchemy import select

    from cxrtriage.storage.models import ScoreResult

    from .harness import NodeProcess, wait_for
    from .test_node import dcmtk

    node = NodeProcess(tmp_path / "node", f"sqlite:///{tmp_path / 'node.db'}",
                       workers={"scoring_engine": True, "scoring_processes": 1}, web={"enabled": False},
                       inference={"max_batch": 4, "max_wait_ms": 200}).start()
    db = node.db()
    try:
        sent = dcmtk("storescu", "-aet", "MODALITY", "-aec", "CXRTRIAGE", "127.0.0.1", str(node.port),
                     *map(str, crs))
        assert sent.returncode == 0, sent.stderr

        def results() -> list[tuple[str, bool]] | None:
            with db.session() as session:
                rows = [(r.status, bool(r.seg_instance_id and r.sr_instance_id))
                        for r in session.scalars(select(ScoreResult))]
            return rows if len(rows) == len(crs) else None

        rows = wait_for(results, 240, "the engine to score every image")
        assert rows == [("scored", True)] * len(crs)  # each with its SEG and SR archived
        assert "scoring ready" in node.log
    finally:
        node.stop()
        db.dispose()


def test_results_of_a_batch_go_back_to_their_images_around_the_failed_ones() -> None:
    """Stage II's batch holds only the images whose Stage I post-processing worked; each result goes back
    to its own image and each failure stays in its place."""
    from cxrtriage.inference.engine import in_batch_order

    failed = [ValueError("first"), ValueError("third")]
    crops: list[object] = [failed[0], "b", failed[1], "d", "e"]
    assert in_batch_order(crops, lambda crop, i: (crop, i)) == [failed[0], ("b", 0), failed[1], ("d", 1), ("e", 2)]
    assert in_batch_order([], lambda crop, i: i) == []
