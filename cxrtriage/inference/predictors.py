"""Model runners: a batch of prepared inputs in, probabilities out.

The pipeline only sees :class:`Predictor`. :class:`TorchPredictor` runs eager
torch; :class:`OnnxPredictor` exports the same model once to ONNX (cached
beside the settings' cache folder, keyed by the weights' content) and runs it
with ONNX Runtime: CUDA or TensorRT execution providers when present, else CPU.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .models import ModelSpec, load_model, resolve_weights

log = logging.getLogger(__name__)


class Predictor(Protocol):
    spec: ModelSpec

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, C, S, S) float32 -> (N, S, S) mask probabilities, (N,) P(disease) or None."""
        ...


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def inference_model(spec: ModelSpec, device: Any, dtype: torch.dtype, fold_bn: bool = True) -> tuple[Any, int]:
    """``spec``'s model ready to run: loaded on ``device`` in eval mode, channels_last, each BatchNorm folded
    into its convolution when ``fold_bn`` (in float32, :func:`~.bn_fold.fold_batch_norm`), then cast to
    ``dtype``; and how many BatchNorms were folded.

    Folding and its check run on the CPU, in float32, before the move. On an H200 the check on the device
    refused the paper's Stage I: the outputs differed by 7.5e-4 of the largest, 7.5 times the tolerance,
    most likely from cuDNN's TF32 convolutions."""
    from .bn_fold import example_input, fold_batch_norm

    model = load_model(spec, "cpu").to(memory_format=torch.channels_last)
    folded = 0
    if fold_bn:
        model, folded = fold_batch_norm(model, example_input(spec.in_channels, "cpu"))
    return model.to(device=device, dtype=dtype).eval(), folded


def compile_for_inference(model: torch.nn.Module, device: torch.device) -> Any:
    """``torch.compile`` for inference; the first call with each input shape compiles.

    On CUDA: ``max-autotune`` (CUDA graphs per batch shape). On the CPU:
    inductor's C++ kernels with the weights frozen in (BatchNorm folded into
    the convolutions, weights prepacked for oneDNN), one graph per batch size;
    it needs a C++ compiler, about a minute per model on the first call of a
    process (inductor's cache shortens later starts).
    """
    if device.type == "cuda":
        return torch.compile(model, mode="max-autotune")
    return torch.compile(model, dynamic=False, options={"freezing": True})


class TorchPredictor:
    """Eager torch in inference mode, channels_last (1.2-1.5x faster on CPU here).

    ``precision="bf16"`` converts weights and inputs to bfloat16 (oneDNN's
    bf16 kernels on CPUs with AVX512-BF16 or AMX, tensor cores on CUDA):
    1.9-2.2x faster than fp32 here, and 13 % faster than bf16 autocast, which
    re-casts every weight on every call. Outputs come back as float32.

    ``compile=True`` runs :func:`compile_for_inference`'s model. Compiling is
    an optimisation only: if it fails (no C++ compiler, an unsupported
    operator), the predictor logs why once and runs the eager model.

    ``fold_bn`` (default) folds BatchNorm into the convolutions before any cast
    (:func:`~.bn_fold.fold_batch_norm`); :attr:`folded` says how many.
    """

    def __init__(self, spec: ModelSpec, device: str = "auto", precision: str = "fp32", compile: bool = False,
                 fold_bn: bool = True) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}; use fp32 or bf16")
        self.spec = spec
        self.device = resolve_device(device)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model, self.folded = inference_model(spec, self.device, self.dtype, fold_bn)
        self.compiled: Any = compile_for_inference(self.model, self.device) if compile else None

    def _forward(self, x: torch.Tensor) -> Any:
        if self.compiled is None:
            return self.model(x)
        try:
            return self.compiled(x)
        except torch._dynamo.exc.TorchDynamoException as exc:  # compiling failed (at any new batch size)
            log.warning("%s: torch.compile failed (%s: %s); running the model uncompiled", self.spec.version,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.compiled = None
            return self.model(x)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self.dtype, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self._forward(x)
        seg, cls = out if isinstance(out, tuple) else (out, None)
        probs = torch.sigmoid(seg.float())[:, 0].cpu().numpy()
        p = torch.sigmoid(cls.float())[:, 0].cpu().numpy() if cls is not None else None
        return probs, p


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def onnx_cache_dir() -> Path:
    return Path(os.environ.get("CXRTRIAGE_CACHE", Path.home() / ".cache" / "cxrtriage")) / "onnx"


class OnnxPredictor:
    """ONNX Runtime inference of a model built from ``spec`` (same outputs as the torch one)."""

    def __init__(self, spec: ModelSpec, device: str = "auto", cache: Path | None = None) -> None:
        import onnxruntime as ort

        self.spec = spec
        path = self._export(spec, cache or onnx_cache_dir())
        available = ort.get_available_providers()
        wanted = ["CPUExecutionProvider"]
        if device != "cpu":
            wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available] + wanted
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # as many threads as torch has in this process (inference.threads, a pool worker's share of the cores,
        # an engine lane's one): ORT's own default, every core with spinning threads, oversubscribes them
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=wanted)
        self.outputs = [o.name for o in self.session.get_outputs()]

    @staticmethod
    def _export(spec: ModelSpec, cache: Path) -> Path:
        """Export once per (spec, weights content); later runs load the cached file."""
        digest = hashlib.sha256(spec.model_dump_json(exclude={"weights"}).encode())
        if spec.weights:
            digest.update(resolve_weights(spec.weights).read_bytes())
        path = cache / f"{spec.arch}-{spec.encoder}-{spec.input_size}-{digest.hexdigest()[:16]}.onnx"
        if path.exists():
            return path
        cache.mkdir(parents=True, exist_ok=True)
        model = load_model(spec, "cpu")
        example = torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size)
        names = ["mask", "label"] if spec.classification_head else ["mask"]
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with torch.inference_mode():
            torch.onnx.export(model, (example,), str(tmp), input_names=["image"], output_names=names,
                              dynamic_axes={"image": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                              opset_version=17, dynamo=False)
        os.replace(tmp, path)
        return path

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.session.run(self.outputs, {"image": np.ascontiguousarray(batch, dtype=np.float32)})
        probs = _sigmoid(out[0][:, 0])
        p = _sigmoid(out[1][:, 0]) if len(out) > 1 else None
        return probs, p


def resolve_backend(backend: str, device: str, precision: str = "fp32", compile: bool = False) -> str:
    """``auto``: ONNX Runtime for fp32 on the CPU, uncompiled, and torch everywhere else; otherwise ``backend``.

    On the CPU ONNX Runtime fuses what eager torch runs op by op: per image at one thread, 25 against 33 CPU-ms
    for each bundled network (BatchNorm folded), 170 against 283 for the paper's Stage I
    (``bench/engine_cpu.py --networks``), and the same 0-6 scores (``bench/pipeline.py``). bf16,
    ``torch.compile`` and a GPU engine (:mod:`.engine`) are torch's.
    """
    if backend != "auto":
        return backend
    on_cpu = resolve_device(device).type == "cpu"
    return "onnx" if on_cpu and precision == "fp32" and not compile else "torch"


def make_predictor(
    spec: ModelSpec, backend: str, device: str, precision: str = "fp32", compile: bool = False, fold_bn: bool = True
) -> Predictor:
    """``spec``'s model run by ``backend`` (``torch``, ``onnx``, or ``auto``: :func:`resolve_backend`).

    ``auto`` falls back to torch, with a warning that says why, when ONNX Runtime cannot take the model (no
    writable export cache, an operator the exporter lacks); an explicit ``onnx`` fails instead.
    """
    chosen = resolve_backend(backend, device, precision, compile)
    if chosen == "torch":
        return TorchPredictor(spec, device, precision, compile, fold_bn)
    if chosen == "onnx":
        if precision != "fp32":
            raise ValueError(f"precision {precision!r} needs the torch backend; ONNX Runtime runs fp32 here")
        if compile:
            raise ValueError("inference.compile needs the torch backend; ONNX Runtime optimises its own graph")
        if backend == "onnx":
            return OnnxPredictor(spec, device)
        try:
            return OnnxPredictor(spec, "cpu")
        except Exception as exc:  # auto: the model still runs, on torch
            log.warning("%s: ONNX Runtime unavailable (%s: %s); running it with torch", spec.version,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return TorchPredictor(spec, device, precision, compile, fold_bn)
    raise ValueError(f"unknown inference backend {backend!r}; use auto, torch or onnx")
