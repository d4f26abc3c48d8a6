"""Model runners: a batch of prepared inputs in, probabilities out.

The pipeline only sees :class:`Predictor`; the torch runner is the default,
and another backend (ONNX Runtime) can stand in without touching the rest.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from .models import ModelSpec, load_model


class Predictor(Protocol):
    spec: ModelSpec

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, C, S, S) float32 -> (N, S, S) mask probabilities, (N,) P(disease) or None."""
        ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TorchPredictor:
    """Eager torch in inference mode, channels_last (1.2-1.5x faster on CPU here)."""

    def __init__(self, spec: ModelSpec, device: str = "auto") -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.model = load_model(spec, self.device).to(memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.model(x)
        seg, cls = out if isinstance(out, tuple) else (out, None)
        probs = torch.sigmoid(seg.float())[:, 0].cpu().numpy()
        p = torch.sigmoid(cls.float())[:, 0].cpu().numpy() if cls is not None else None
        return probs, p
