"""Fold inference-mode BatchNorm layers into the convolutions that feed them.

In eval mode a BatchNorm2d is an affine map per channel, so a Conv2d whose
output goes only into it can absorb it: ``W' = W * g / sqrt(v + eps)``,
``b' = (b - m) * g / sqrt(v + eps) + beta``
(:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`). The network then makes one
pass over each activation where it made two: eager BatchNorm was about 9 % of
the bundled networks' CPU time. ``torch.compile`` with freezing does the same
inside its graphs; this gives it to the eager model, which the node runs by
default, on any device.

The pairs are found by running the model once with hooks: a BatchNorm2d
(torch's, or timm's BatchNormAct2d, whose activation stays) whose input is the
very tensor the Conv2d called just before it returned, no other layer
between. Whether that tensor also went elsewhere (a residual, say) hooks cannot see, so the
folded model is checked against the original on the same input and kept only
if their outputs agree; otherwise the original is returned unchanged.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

#: Largest difference allowed between the folded and the original model's outputs (logits), relative to the
#: largest output: float32 rounding of the folded weights is about 1e-6 of it.
TOLERANCE = 1e-4


def _pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) for each BatchNorm2d fed straight by the Conv2d that ran just before it."""
    names = {module: name for name, module in model.named_modules()}
    last: dict[str, Any] = {}
    found: list[tuple[str, str]] = []

    def after_conv(module: nn.Module, _: Any, output: torch.Tensor) -> None:
        last["conv"], last["output"] = module, output

    def before_bn(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        conv = last.get("conv")
        if conv is not None and inputs and inputs[0] is last.get("output"):
            found.append((names[conv], names[module]))
        last.clear()

    def other(*_: Any) -> None:  # any other layer in between (an in-place ReLU returns the very same tensor)
        last.clear()

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif _foldable(module):
            handles.append(module.register_forward_pre_hook(before_bn))
        elif not any(True for _ in module.children()):
            handles.append(module.register_forward_pre_hook(other))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    counts: dict[str, int] = {}
    for conv, bn in found:  # a module called twice (shared weights) must be folded at most once
        counts[conv] = counts.get(conv, 0) + 1
        counts[bn] = counts.get(bn, 0) + 1
    return [(conv, bn) for conv, bn in dict.fromkeys(found) if counts[conv] == 1 and counts[bn] == 1]


def _foldable(module: nn.Module) -> bool:
    """A BatchNorm2d with running statistics: torch's own, or timm's BatchNormAct2d (BatchNorm, then its
    ``drop`` and ``act`` modules: the regnet encoders are built of them)."""
    if not isinstance(module, nn.BatchNorm2d) or not module.track_running_stats or module.running_var is None:
        return False
    return type(module) is nn.BatchNorm2d or _after_norm(module) is not None


def _after_norm(module: nn.Module) -> nn.Module | None:
    """What a timm BatchNormAct2d does after its BatchNorm (its ``drop``, then its ``act``), or None."""
    if type(module).__name__ != "BatchNormAct2d":
        return None
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    return nn.Sequential(drop, act) if isinstance(drop, nn.Module) and isinstance(act, nn.Module) else None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _outputs(model: nn.Module, example: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = model(example)
    return [t.float() for t in (out if isinstance(out, tuple) else (out,))]


def example_input(in_channels: int, device: Any, size: int = 64) -> torch.Tensor:
    """A small input to find and check the pairs with: folding does not depend on the image size (64: a
    multiple of every encoder's 32)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(1, in_channels, size, size, generator=generator)
    return x.to(device).contiguous(memory_format=torch.channels_last)


def fold_batch_norm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """``model`` (eval mode) with its conv -> BatchNorm pairs folded, and how many; on any doubt, ``model``
    itself and 0. ``example`` is one input on the model's device, of any size its encoder takes
    (:func:`example_input`). Fold a float32 model before casting it to bf16, so that the folded weights are
    rounded once. The original is copied, not changed: loading briefly holds both."""
    if model.training:
        raise ValueError("fold_batch_norm needs a model in eval mode")
    try:
        pairs = _pairs(model, example)
        if not pairs:
            return model, 0
        folded = copy.deepcopy(model)
        for conv_name, bn_name in pairs:
            conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
            assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            _set(folded, conv_name, fuse_conv_bn_eval(conv, bn))
            _set(folded, bn_name, _after_norm(bn) or nn.Identity())
        want, got = _outputs(model, example), _outputs(folded, example)
        scale = max(float(w.abs().max()) for w in want) or 1.0
        worst = max(float((w - g).abs().max()) for w, g in zip(want, got))
    except Exception as exc:  # an optimisation only: the model runs as it was
        log.warning("BatchNorm not folded (%s: %s); the model runs as it was", type(exc).__name__, exc)
        return model, 0
    if len(want) != len(got) or not worst <= TOLERANCE * scale:
        log.warning("BatchNorm not folded: the folded model's outputs differ by %.3g (largest output %.3g); "
                    "the model runs as it was", worst, scale)
        return model, 0
    return folded, len(pairs)
