"""One render graph for several calls' frames at once: B sources, B keypoint vectors, B frames.

A receiver with several calls renders each frame at batch 1 through ``fastgraph.SplitGraph``.
Per-frame costs that do not grow with the batch (one ONNX Runtime run per segment, one
``grid_sample`` call per warp, the small element-wise ops of dense motion's prelude) are then paid
once per call and frame. ``BatchGraph`` is the same split graph exported at batch B: each call's
source stays bound once at batch 1 (``SplitGraph.bind``), and a batch render stacks the B calls'
bound tensors into the batch-B graph's frame segments.

How a bound tensor stacks is read off the graph, not assumed: the batch-B source stage is run once
on B copies of an example source, and a bound tensor whose leading dimension grew B-fold is
concatenated along it (the source image repeated per keypoint is (K+1, 3, H, W) at batch 1 and
(B(K+1), 3, H, W) at batch B); one whose shape did not change must not depend on the source
(a coordinate grid), which is checked on two different sources when the graph is built.

Calibration ranges measured at batch 1 fit: the batch-B graph has the same nodes
(``fastgraph.fingerprint``), only larger shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.fomm import fastgraph
from models.fomm.model import MotionModel

log = logging.getLogger(__name__)


def at_batch(example: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """``render_tensors``' batch-1 arguments repeated to ``batch`` (1-D placeholders stay as they are)."""
    return tuple(t.expand(batch, *t.shape[1:]).contiguous() if t.dim() > 1 else t for t in example)


def _another(v: np.ndarray) -> np.ndarray:
    """A different source's tensor of the same shape: images and features flipped, keypoints moved."""
    if v.ndim == 4:
        return np.ascontiguousarray(v[..., ::-1, :])
    return v * np.float32(0.9) if v.ndim == 2 else v


@dataclass
class BatchGraph:
    """``graph``: the split graph at batch ``batch``; ``stack``: bound tensor -> True (concatenate the
    calls' tensors) or False (one tensor shared by every source)."""

    batch: int
    graph: fastgraph.SplitGraph
    stack: dict[str, bool]

    @classmethod
    def build(cls, model: MotionModel, example: tuple[torch.Tensor, ...], single: fastgraph.SplitGraph,
              batch: int, threads: int, ranges: dict[str, Any] | None,
              cache_dir: str | Path | None) -> BatchGraph:
        """The batch-``batch`` graph of the model ``single`` renders at batch 1 (``example``: its
        batch-1 export arguments). ValueError when the graph cannot be batched this way."""
        if batch < 2:
            raise ValueError("a batch graph renders at least 2 frames")
        graph = fastgraph.cached_graph(model, at_batch(example, batch), threads, ranges, cache_dir)
        if graph.fingerprint != single.fingerprint:
            raise ValueError("the batch graph has other nodes than the batch-1 graph")
        feeds = {f"in{i + 1}": a.detach().cpu().numpy() for i, a in enumerate(example[1:])}
        one = single.bind(feeds)
        many = graph.bind({k: v for k, v in zip(feeds, (a.detach().cpu().numpy() for a in at_batch(
            example, batch)[1:]), strict=True)})
        # A second, different source: every tensor that does not stack must be the same for both.
        other = single.bind({k: _another(v) for k, v in feeds.items()})
        # what the frame segments and warps read from the bound source (the rest they compute)
        reads = {i for seg in graph.segments for i in [*seg.inputs, *(x for g in seg.grid_samples
                                                                        for x in (g.x, g.grid))]}
        needed = (reads & set(one)) - {fastgraph.FRAME_INPUT}
        stack: dict[str, bool] = {}
        for name in sorted(needed):
            a, b = one[name], many[name]
            if b.ndim and a.ndim and b.shape[0] == batch * a.shape[0] and b.shape[1:] == a.shape[1:]:
                stack[name] = True
            elif b.shape == a.shape and np.array_equal(one[name], other[name]):
                stack[name] = False
            else:
                raise ValueError(f"bound tensor {name}: {a.shape} at batch 1, {b.shape} at batch {batch}")
        return cls(batch, graph, stack)

    def run(self, bounds: list[dict[str, np.ndarray]], keypoints: np.ndarray) -> np.ndarray:
        """``batch`` calls' bound sources (``SplitGraph.bind``) and (batch, 6K) keypoints ->
        (batch, 3, H, W) float32 frames, in the same order."""
        if len(bounds) != self.batch or keypoints.shape[0] != self.batch:
            raise ValueError(f"a batch-{self.batch} graph got {len(bounds)} sources, {keypoints.shape[0]} vectors")
        env = {name: np.concatenate([b[name] for b in bounds]) if s else bounds[0][name]
               for name, s in self.stack.items()}
        return self.graph.run(env, np.ascontiguousarray(keypoints, np.float32))
