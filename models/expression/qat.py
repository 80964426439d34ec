"""Quantisation-aware fine-tuning of the region refiner: train it to survive the int8 graph.

The region stage's convolutions in int8 (``models.expression.refiner_int8``: static QDQ, uint8 activations,
per-channel int8 weights) run the refiner ~0.7 ms a frame faster, but the float weights, quantised after
training, drew closed eyes less open (``bench.closed_eyes``: 0.76 of the gap against 0.82). Fine-tuning with
the quantisation in the forward pass (Jacob et al. 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference") lets the weights adapt to it.

``fake_quantise(net)`` makes every ``nn.Conv2d`` of ``net`` compute what ONNX Runtime's QDQ graph will:

- its input, quantised per tensor to uint8 over a range that includes 0 (ONNX Runtime's asymmetric
  activations), the range an exponential moving average of each training batch's min and max (fixed in
  eval mode: what static calibration measures);
- its weight, quantised per output channel to symmetric int8 (-127..127);
- its output likewise per tensor to uint8; a convolution followed by a ReLU over the ReLU's range (from 0:
  ONNX Runtime drops the ReLU and clamps at the quantised zero instead).

Gradients pass the rounding straight through (``torch.fake_quantize_*``). The module's parameters and
``state_dict`` are unchanged, so the fine-tuned weights save and load as any refiner's; the int8 graph is then
calibrated and quantised from them as before (``refiner_int8``). ``skip``: names of convolutions left in float.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

MOMENTUM = 0.01  # the running ranges' EMA step per training batch


class _Range:
    """A tensor's running (min, max): EMA of per-batch extremes while training, fixed in eval."""

    def __init__(self) -> None:
        self.lo: float | None = None
        self.hi: float | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo += MOMENTUM * (lo - self.lo)
            self.hi += MOMENTUM * (hi - self.hi)

    def quantise(self, x: torch.Tensor) -> torch.Tensor:
        if self.lo is None or self.hi is None:
            return x
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)  # 0 exactly representable, as ONNX Runtime's ranges
        scale = max((hi - lo) / 255.0, 1e-8)
        zero = int(round(-lo / scale))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


def quantise_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 (-127..127), as ``quantize_static(per_channel=True)`` stores weights."""
    scale = (w.detach().abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-8)
    zero = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -127, 127)


def _forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if self.training:
        self._q_in.update(x)
    x = self._q_in.quantise(x)
    y = F.conv2d(x, quantise_weight(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)
    if self._q_relu:
        y = F.relu(y)  # the ReLU after it is then a no-op
    if self.training:
        self._q_out.update(y)
    return self._q_out.quantise(y)


def _followed_by_relu(net: nn.Module) -> set[str]:
    """Names of the convolutions an ``nn.ReLU`` follows in the same ``nn.Sequential``."""
    out = set()
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.named_children())
            for (a, m), (_, nxt) in zip(kids, kids[1:], strict=False):
                if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.ReLU):
                    out.add(f"{name}.{a}" if name else a)
    return out


def fake_quantise(net: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Make ``net``'s convolutions (but those named in ``skip``) compute in simulated int8; their names."""
    done = []
    relu = _followed_by_relu(net)
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Conv2d) and name not in skip:
            mod._q_in, mod._q_out = _Range(), _Range()  # type: ignore[assignment]
            mod._q_relu = name in relu  # type: ignore[assignment]
            mod.forward = types.MethodType(_forward, mod)  # type: ignore[method-assign]
            done.append(name)
    return done


def ranges_seen(net: nn.Module) -> dict[str, list[float]]:
    """The running ranges of the fake-quantised convolutions: module name -> [input min, max, output min, max]
    (saved in a checkpoint's meta, ``qat_ranges``, so the int8 graph quantises with exactly these)."""
    return {name: [mod._q_in.lo, mod._q_in.hi, mod._q_out.lo, mod._q_out.hi] for name, mod in net.named_modules()
            if isinstance(mod, nn.Conv2d) and hasattr(mod, "_q_in") and mod._q_in.lo is not None
            and mod._q_out.lo is not None}


def set_ranges(net: nn.Module, ranges: dict[str, list[float]]) -> None:
    """Fix the fake-quantised convolutions' ranges to ``ranges`` (``ranges_seen``' form)."""
    for name, mod in net.named_modules():
        if name in ranges and hasattr(mod, "_q_in"):
            mod._q_in.lo, mod._q_in.hi, mod._q_out.lo, mod._q_out.hi = (float(v) for v in ranges[name])


def conv_module(node: str, prefix: str = "/") -> str:
    """An exported Conv node's name -> its module's (``/eye/enc0/enc0.0/enc0.0.0/Conv``: ``eye.enc0.0.0``)."""
    parts = node.removeprefix(prefix).split("/")
    return f"{parts[0]}.{parts[-2]}"


def tensor_ranges(ranges: dict[str, list[float]],
                  conv_nodes: dict[str, tuple[str, ...]]) -> dict[str, tuple[float, float]]:
    """``ranges_seen``' form -> the ONNX graph's tensor names: ``conv_nodes`` maps each Conv node's name to its
    input tensor and its output tensors (the convolution's, and its ReLU's when one follows)."""
    out = {}
    for node, (tin, *touts) in conv_nodes.items():
        module = conv_module(node)
        if module in ranges:
            lo_in, hi_in, lo_out, hi_out = ranges[module]
            out[tin] = (lo_in, hi_in)
            out.update({t: (lo_out, hi_out) for t in touts})
    return out
