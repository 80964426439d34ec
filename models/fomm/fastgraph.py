"""The render graph for CPUs: ONNX Runtime for everything but ``grid_sample``, the source's share once.

``MotionModel.render_tensors`` exported to ONNX and run whole by ONNX Runtime spent 27 % of a
256x256 frame in its 7 GridSample nodes: ONNX Runtime's GridSample kernel is 5-7x slower than
PyTorch's (2.2 vs 0.37 ms for the refiner's 256x256 warp, 1.6 vs 0.22 ms for dense motion's 11
warps, 2 CPU cores). So the exported graph is cut at its GridSample nodes:

* the **source stage**: every node that does not depend on the frame's keypoints (the source
  downsampled for dense motion, its keypoints' heatmaps, broadcasts) runs once per source image
  (``bind``), not once per frame;
* the **frame segments**: the remaining nodes grouped by how many GridSamples lie before them
  (3 segments for the 256 model: dense motion's prelude, its hourglass up to the flow, then the
  generator and the refiner); each segment is one ONNX Runtime session, and the GridSamples
  between two segments run in PyTorch (all 6 warps of the flow sit at one level);
* with calibration ranges (``models.fomm.quantize``) the convolutions of each segment run in
  **int8** (static QDQ quantisation, per-channel weights, uint8 activations), ranges measured on
  training clips and shipped beside the weights, so building needs no data.

The graph's values are those of the whole exported graph to float precision (fp32) or within the
int8 error that ``bench.quality`` / ``bench.expression`` report (int8).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.fomm.export import EXPORT_LOCK, code_id, onnx_session
from models.fomm.model import MotionModel

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
# where built graphs are kept (``cached_graph``): the receiver's tiers and the sender's refresh estimate
CACHE_DIR = Path(__file__).resolve().parents[2] / "cache" / "render"
FRAME_INPUT = "in0"  # the keypoint vector; every other input is the source's (SourceCache)
_GRID_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest", "cubic": "bicubic",
               "bicubic": "bicubic"}


class RenderGraph(torch.nn.Module):
    """``render_tensors`` as a module, the form ``torch.onnx.export`` takes."""

    def __init__(self, model: MotionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model.render_tensors(*args)


def export_render(model: MotionModel, example: tuple[torch.Tensor, ...]) -> bytes:
    """``render_tensors`` at batch 1 as ONNX; inputs ``in0`` (keypoints), ``in1``... (the source's)."""
    names = [f"in{i}" for i in range(len(example))]
    buf = io.BytesIO()
    with EXPORT_LOCK, torch.no_grad(), warnings.catch_warnings():
        # Shape checks become constants in the graph: right, since a model's shapes never change.
        warnings.simplefilter("ignore")
        torch.onnx.export(RenderGraph(model).eval(), example, buf, opset_version=17, dynamo=False,
                          input_names=names, output_names=["frame"])
    return buf.getvalue()


@dataclass
class _GridSample:
    """One GridSample node, run by PyTorch between two segments."""

    x: str
    grid: str
    out: str
    mode: str
    padding: str
    align_corners: bool

    def __call__(self, env: dict[str, np.ndarray]) -> None:
        y = F.grid_sample(torch.from_numpy(env[self.x]), torch.from_numpy(env[self.grid]), mode=self.mode,
                          padding_mode=self.padding, align_corners=self.align_corners)
        env[self.out] = y.numpy()


@dataclass
class Segment:
    """A subgraph run as one session: ``inputs`` -> ``outputs``, then the GridSamples fed by it."""

    name: str
    model: Any  # onnx.ModelProto (fp32); None for a graph loaded from the disk cache
    inputs: list[str]
    outputs: list[str]
    grid_samples: list[_GridSample] = field(default_factory=list)
    session: Any = None
    quantised: bool = False
    data: bytes = b""  # what the session runs (fp32 or int8)
    has_conv: bool = False

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": self.inputs, "outputs": self.outputs, "quantised": self.quantised,
                "has_conv": self.has_conv, "grid_samples": [dataclasses.asdict(g) for g in self.grid_samples]}


def _grid_sample(node: Any) -> _GridSample:  # node: an onnx.NodeProto
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"linear")
    pad = attrs.get("padding_mode", b"zeros")
    mode, pad = (v.decode() if isinstance(v, bytes) else v for v in (mode, pad))
    return _GridSample(node.input[0], node.input[1], node.output[0], _GRID_MODES[mode], pad,
                       bool(attrs.get("align_corners", 0)))


def split(model_bytes: bytes) -> tuple[Segment, list[Segment]]:
    """The source stage and the frame segments of an exported render graph (see the module doc)."""
    import onnx
    from onnx import helper, shape_inference

    m = shape_inference.infer_shapes(onnx.load_from_string(model_bytes))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    values = {v.name: v for v in [*g.value_info, *g.input, *g.output]}
    consumers: dict[str, list[int]] = defaultdict(list)
    for k, n in enumerate(g.node):
        for i in n.input:
            consumers[i].append(k)
    # Nodes come in topological order, so one forward pass labels them.
    dynamic: dict[str, bool] = {FRAME_INPUT: True}
    level: dict[str, int] = {}  # for dynamic tensors: GridSamples on the longest path to them
    node_level: dict[int, int] = {}
    node_dynamic: dict[int, bool] = {}
    for k, n in enumerate(g.node):
        ins = [i for i in n.input if i]
        dyn = any(dynamic.get(i, False) for i in ins)
        lv = max([level.get(i, 0) for i in ins if dynamic.get(i, False)] + [0])
        node_dynamic[k], node_level[k] = dyn, lv
        for o in n.output:
            dynamic[o] = dyn
            level[o] = lv + (1 if dyn and n.op_type == "GridSample" else 0)
    graph_outputs = {o.name for o in g.output}

    def subgraph(name: str, ks: list[int]) -> Segment:
        wanted = set(ks)
        needed = {i for k in ks for i in g.node[k].input if i}
        # Constants are copied into every segment that reads them instead of crossing between segments.
        consts = [k for k, n in enumerate(g.node) if n.op_type == "Constant" and n.output[0] in needed
                  and k not in wanted]
        ks = sorted(wanted | set(consts))
        nodes = [g.node[k] for k in ks]
        produced = {o for n in nodes for o in n.output}
        inputs: list[str] = []
        for n in nodes:
            for i in n.input:
                if i and i not in produced and i not in inits and i not in inputs:
                    inputs.append(i)
        outputs = [o for k in ks for o in g.node[k].output
                   if o in graph_outputs or any(c not in set(ks) for c in consumers[o])]
        used = {i for n in nodes for i in n.input if i in inits}
        sg = helper.make_graph(nodes, name, [values[i] for i in inputs], [values[o] for o in outputs],
                               [inits[i] for i in sorted(used)])
        model = helper.make_model(sg, opset_imports=m.opset_import, ir_version=m.ir_version)
        return Segment(name, model, inputs, outputs, has_conv=any(n.op_type == "Conv" for n in nodes))

    real = [k for k, n in enumerate(g.node) if n.op_type != "Constant"]
    source = subgraph("source", [k for k in real if not node_dynamic[k]])
    frame = [k for k in real if node_dynamic[k] and g.node[k].op_type != "GridSample"]
    segments = []
    for lv in sorted({node_level[k] for k in frame}):
        seg = subgraph(f"frame{lv}", [k for k in frame if node_level[k] == lv])
        seg.grid_samples = [_grid_sample(g.node[k]) for k in real
                            if node_dynamic[k] and g.node[k].op_type == "GridSample" and node_level[k] == lv]
        segments.append(seg)
    return source, segments


def fingerprint(segments: list[Segment]) -> str:
    """Names and kinds of every node: calibration ranges only fit the graph they were measured on."""
    h = hashlib.sha256()
    for s in segments:
        for n in s.model.graph.node:
            h.update(f"{s.name}:{n.name}:{n.op_type};".encode())
    return h.hexdigest()[:16]


def _quantise(seg: Segment, ranges: dict[str, Any]) -> bytes:
    """Static QDQ int8 of the segment's convolutions from calibration ranges (no data needed)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="kpcast-q8-") as d:
        src, out, cache = Path(d) / "fp32.onnx", Path(d) / "int8.onnx", Path(d) / "ranges.json"
        onnx.save(seg.model, src)
        cache.write_text(json.dumps(ranges))
        quiet = _DropPreprocessAdvice()
        logging.getLogger().addFilter(quiet)  # the quantizer logs its advice on the root logger
        try:
            _quantize_static(src, out, cache)
        finally:
            logging.getLogger().removeFilter(quiet)
        return out.read_bytes()


class _DropPreprocessAdvice(logging.Filter):
    """ONNX Runtime's quantizer advises shape pre-processing once per call; the segments carry their
    shapes already, and a receiver would log the advice at every tier it builds."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in str(record.msg)


def _quantize_static(src: Path, out: Path, cache: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    # uint8 activations / int8 per-channel weights: ONNX Runtime's advice for x86 CPUs
    # (with VNNI no reduce_range is needed; without it results stay right, only slower).
    quantize_static(src, out, None, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv"], calibration_cache_path=cache)


class SplitGraph:
    """An exported render graph run as source stage + frame segments (``split``).

    ``ranges``: calibration ranges per segment (``models.fomm.quantize``), or None for fp32.
    ``record``: keep every segment's inputs (for calibration).
    """

    def __init__(self, model_bytes: bytes | None, threads: int = 2, ranges: dict[str, Any] | None = None,
                 record: bool = False) -> None:
        self.recorded: dict[str, list[dict[str, np.ndarray]]] | None = defaultdict(list) if record else None
        if model_bytes is None:  # SplitGraph.load fills it in
            return
        self.source, self.segments = split(model_bytes)
        self.fingerprint = fingerprint([self.source, *self.segments])
        if ranges is not None and ranges.get("fingerprint") != self.fingerprint:
            raise ValueError("the calibration ranges were measured on another graph "
                             f"({ranges.get('fingerprint')} != {self.fingerprint})")
        for seg in [self.source, *self.segments]:
            seg.data = seg.model.SerializeToString()
            if ranges is not None and seg.has_conv and seg is not self.source:
                seg.data, seg.quantised = _quantise(seg, ranges["segments"][seg.name]), True
            seg.session = onnx_session(seg.data, threads)

    def save(self, path: str | Path) -> None:
        """Write the built graph (sessions' models and the wiring) to ``path``, atomically."""
        path = Path(path)
        parts = [self.source, *self.segments]
        manifest = {"fingerprint": self.fingerprint, "segments": [s.manifest() for s in parts]}
        arrays = {f"seg{i}": np.frombuffer(s.data, np.uint8) for i, s in enumerate(parts)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, manifest=np.frombuffer(json.dumps(manifest).encode(), np.uint8), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, threads: int = 2) -> SplitGraph:
        """A graph ``save`` wrote: no export, no ``onnx`` import, no quantisation (ValueError if damaged)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                manifest = json.loads(z["manifest"].tobytes())
                parts = []
                for i, m in enumerate(manifest["segments"]):
                    gs = [_GridSample(**g) for g in m.pop("grid_samples")]
                    parts.append(Segment(model=None, grid_samples=gs, data=z[f"seg{i}"].tobytes(), **m))
        except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"damaged render graph cache {path}: {e}") from e
        g = cls(None, threads)
        g.fingerprint = manifest["fingerprint"]
        g.source, g.segments = parts[0], parts[1:]
        try:
            for seg in parts:
                seg.session = onnx_session(seg.data, threads)
        except Exception as e:  # ONNX Runtime's own error types: a model it cannot read
            raise ValueError(f"damaged render graph cache {path}: {e}") from e
        return g

    @property
    def int8(self) -> bool:
        return any(s.quantised for s in self.segments)

    def with_threads(self, threads: int) -> SplitGraph:
        """The same built graph with sessions of ``threads`` intra-op threads (nothing exported or
        quantised again): several single-threaded graphs side by side render more frames per second
        than one graph using every core (``receiver.batching``)."""
        g = SplitGraph(None, threads)
        g.fingerprint = self.fingerprint
        parts = [dataclasses.replace(s, session=onnx_session(s.data, threads)) for s in (self.source, *self.segments)]
        g.source, g.segments = parts[0], parts[1:]
        return g

    def bind(self, source_inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the source stage once: what every frame of this source needs (inputs ``in1``...)."""
        env = {k: v for k, v in source_inputs.items() if k != FRAME_INPUT}
        feeds = {i: env[i] for i in self.source.inputs}
        env.update(zip(self.source.outputs, self.source.session.run(self.source.outputs, feeds), strict=True))
        return env

    def run(self, bound: dict[str, np.ndarray], keypoints: np.ndarray) -> np.ndarray:
        """(1, 6K) float32 keypoints -> (1, 3, H, W) float32 frame."""
        env = dict(bound)
        env[FRAME_INPUT] = keypoints
        for seg in self.segments:
            feeds = {i: env[i] for i in seg.inputs}
            if self.recorded is not None:
                self.recorded[seg.name].append(feeds)
            env.update(zip(seg.outputs, seg.session.run(seg.outputs, feeds), strict=True))
            for gs in seg.grid_samples:
                gs(env)
        return env["frame"]


def calibrate(graph: SplitGraph) -> dict[str, Any]:
    """MinMax ranges of every conv segment from the inputs ``graph`` recorded (``record=True``)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import CalibrationCacheEncoder

    if not graph.recorded or graph.source.model is None:
        raise ValueError("nothing recorded: build the graph with record=True and render frames first")

    class _Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    out: dict[str, Any] = {"fingerprint": graph.fingerprint, "method": "MinMax", "segments": {}}
    for seg in graph.segments:
        if not seg.has_conv:
            continue
        with tempfile.TemporaryDirectory(prefix="kpcast-calib-") as d:
            path = Path(d) / "seg.onnx"
            onnx.save(seg.model, path)
            cal = create_calibrator(path, ["Conv"], augmented_model_path=str(Path(d) / "aug.onnx"),
                                    calibrate_method=CalibrationMethod.MinMax)
            cal.collect_data(_Reader(graph.recorded[seg.name]))
            # ONNX Runtime's own cache format, so _quantise can hand it back to quantize_static
            out["segments"][seg.name] = json.loads(json.dumps(cal.compute_data(), cls=CalibrationCacheEncoder))
    return out


def weights_id(model: MotionModel) -> str:
    """Fingerprint of a model's config and weights: ranges measured on one model never quantise another
    (the shipped 128 model has the 256 model's weights, at another size)."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def ranges_path(weights: str | Path) -> Path:
    """Where the int8 calibration ranges of a weights file live: beside it."""
    p = Path(weights)
    return p.with_name(p.stem + ".int8.json")


def find_ranges(model: MotionModel, folder: str | Path = WEIGHTS_DIR) -> dict[str, Any] | None:
    """The shipped calibration ranges measured on exactly this model's weights, or None."""
    wid = weights_id(model)
    for path in sorted(Path(folder).glob("*.int8.json")):
        try:
            ranges = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable calibration ranges %s: %s", path, e)
            continue
        if isinstance(ranges, dict) and ranges.get("weights_id") == wid:
            return ranges
    return None


def cached_graph(model: MotionModel, example: tuple[torch.Tensor, ...], threads: int,
                 ranges: dict[str, Any] | None, cache_dir: str | Path | None) -> SplitGraph:
    """``SplitGraph`` of ``export_render(model, example)``, from ``cache_dir`` when it was built before.

    Building costs ~1-1.5 s a tier (export, ``import onnx``, cutting, quantising); a receiver with
    three tiers starts ~3 s sooner from the cache. The file is named by everything the graph depends
    on: weights and config, the calibration ranges, the input shapes, the model code, the library
    versions. A damaged or unwritable cache is logged and the graph built in memory."""
    import onnxruntime

    if cache_dir is None:
        return SplitGraph(export_render(model, example), threads, ranges)
    key = hashlib.sha256(json.dumps([
        weights_id(model), code_id(), json.dumps(ranges, sort_keys=True) if ranges else None,
        [list(t.shape) for t in example], torch.__version__, onnxruntime.__version__,
    ]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"render-{model.config.size}-{key}.npz"
    if path.exists():
        try:
            return SplitGraph.load(path, threads)
        except ValueError as e:
            log.warning("%s; building the graph again", e)
    graph = SplitGraph(export_render(model, example), threads, ranges)
    try:
        graph.save(path)
    except OSError as e:  # a read-only install renders as well, it only starts slower
        log.info("render graph not cached (%s)", e)
    return graph
