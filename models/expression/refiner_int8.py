"""The region refiner as one ONNX graph (what the receiver's region stage runs), and an int8 variant.

``export_refiner``: the graph ``receiver.regions`` runs through ONNX Runtime on one thread.

The int8 variant (static QDQ, uint8 activations and per-channel int8 weights, as the render graph's:
``models.fomm.fastgraph``; activation ranges measured on training patches, never on the validation persons,
named by a fingerprint of the weights) runs the convolutions, ReLUs, concatenations and upsamplings in int8
(``OP_TYPES``): the graph ~1.6 -> ~0.9 ms a frame, ~0.4 grey levels from float32; the shipped refiner's
closed-eye bench read as float32's (docs/RESULTS.md, the stage in int8). With only the convolutions in int8
it closed 0.76 of a closed eye's gap against 0.82. ``train_refiner --qat`` (``models.expression.qat``)
fine-tunes a refiner with the int8 graph simulated, for one that loses more. The receiver runs a refiner in
int8 when its ranges file lies beside it (``WEIGHTS.int8.json``, measured on exactly those weights:
``load_ranges``):

    python -m models.expression.refiner_int8 --weights W.pt --all-convs --samples 512   # writes W.int8.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.expression.openings import EYE_PATCH, MOUTH_PATCH
from models.expression.region_refiner import DEFAULT_WEIGHTS, FEATHER, RegionRefiner, blend, load_refiner, window
from models.fomm.fastgraph import ranges_path

log = logging.getLogger(__name__)

# The stage's graph takes each U-Net's input planes as the receiver builds them (``feed_template`` once per
# source image, ``frame_feed`` per frame) and gives the change it draws, in grey levels, the paste window
# applied, channels last: what ``paste_changes`` adds to the frame. The refiner's own input normalisation and
# output conversion in the graph were ~20 small nodes and numpy passes a frame (ONNX Runtime's per-node cost is
# most of their time).
INPUTS = ["eye_x", "mouth_x", "rendered_eyes", "rendered_mouth"]
OUTPUTS = ["eye_change", "mouth_change"]
EYE_PLANES, MOUTH_PLANES = 2, 4  # opening planes after the 6 image channels: this eye's target and source; the
# mouth's open and width, target and source (``RegionRefiner.forward``)


class StageGraph(torch.nn.Module):
    """The refiner as the region stage runs it: (eye_x (2, 8, 32, 32), mouth_x (1, 10, 32, 48): ``frame_feed``,
    rendered_eyes (2, 3, 32, 32), rendered_mouth (1, 3, 32, 48) in [0, 1]) -> (eye_change (2, 32, 32, 3),
    mouth_change (1, 32, 48, 3)): 255 x window x (refined - rendered)."""

    def __init__(self, refiner: RegionRefiner, feather: float = FEATHER) -> None:
        super().__init__()
        self.eye, self.mouth = refiner.eye, refiner.mouth  # nodes named /eye/..., /mouth/... (FLOAT_CONVS)
        mw, mh = MOUTH_PATCH
        self.register_buffer("eye_window", 255 * torch.from_numpy(window(EYE_PATCH, EYE_PATCH, feather).copy()))
        self.register_buffer("mouth_window", 255 * torch.from_numpy(window(mw, mh, feather).copy()))

    def forward(self, eye_x: torch.Tensor, mouth_x: torch.Tensor, rendered_eyes: torch.Tensor,
                rendered_mouth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eyes, _ = blend(self.eye, eye_x, rendered_eyes)
        mouth, _ = blend(self.mouth, mouth_x, rendered_mouth)
        return (((eyes - rendered_eyes) * self.eye_window).permute(0, 2, 3, 1),
                ((mouth - rendered_mouth) * self.mouth_window).permute(0, 2, 3, 1))


def export_refiner(refiner: RegionRefiner) -> bytes:
    """The stage's ONNX graph (``StageGraph``: inputs ``INPUTS``, outputs ``OUTPUTS``)."""
    from models.fomm.export import EXPORT_LOCK

    mw, mh = MOUTH_PATCH
    example = (torch.zeros(2, 6 + EYE_PLANES, EYE_PATCH, EYE_PATCH), torch.zeros(1, 6 + MOUTH_PLANES, mh, mw),
               torch.zeros(2, 3, EYE_PATCH, EYE_PATCH), torch.zeros(1, 3, mh, mw))
    buf = io.BytesIO()
    with EXPORT_LOCK, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(StageGraph(refiner.eval()), example, buf, opset_version=17, dynamo=False,
                          input_names=INPUTS, output_names=OUTPUTS)
    return buf.getvalue()


@dataclass(frozen=True)
class FeedTemplate:
    """The stage graph's inputs as far as one source image fixes them (``feed_template``): its patches' half of
    each U-Net's input and its opening planes. ``frame_feed`` copies them and writes a frame's part."""

    eye_x: np.ndarray  # (2, 8, 32, 32) float32: planes 3-5 the source's eye in [-1, 1], 7 its opening
    mouth_x: np.ndarray  # (1, 10, 32, 48) float32: planes 3-5 the source's mouth, 8-9 its openings
    open_mean: np.ndarray  # (4,) the refiner's opening statistics (its planes hold (opening - mean) / std)
    open_std: np.ndarray


def feed_template(refiner: RegionRefiner, source_eyes: np.ndarray, source_mouth: np.ndarray,
                  source_open: np.ndarray) -> FeedTemplate:
    """Once per source image: its patches (2, 32, 32, 3) and (32, 48, 3) uint8 and its (4,) openings."""
    mean, std = refiner.open_mean.numpy().astype(np.float32), refiner.open_std.numpy().astype(np.float32)
    so = (np.asarray(source_open, np.float32) - mean) / std
    eye_x = np.zeros((2, 6 + EYE_PLANES, EYE_PATCH, EYE_PATCH), np.float32)
    eye_x[:, 3:6] = planar(source_eyes) * np.float32(2) - np.float32(1)
    eye_x[:, 7] = so[:2, None, None]
    mw, mh = MOUTH_PATCH
    mouth_x = np.zeros((1, 6 + MOUTH_PLANES, mh, mw), np.float32)
    mouth_x[0, 3:6] = planar(source_mouth) * np.float32(2) - np.float32(1)
    mouth_x[0, 8:] = so[2:, None, None]
    return FeedTemplate(eye_x, mouth_x, mean, std)


def frame_feed(tpl: FeedTemplate, rendered_eyes: np.ndarray, rendered_mouth: np.ndarray,
               target: np.ndarray) -> dict[str, np.ndarray]:
    """One frame's graph inputs: its rendered patches (2, 32, 32, 3) and (32, 48, 3) uint8 and (4,) target
    openings, on the source's ``tpl``. What ``RegionRefiner.forward`` builds in torch."""
    t = (np.asarray(target, np.float32) - tpl.open_mean) / tpl.open_std
    eyes, mouth = planar(rendered_eyes), planar(rendered_mouth[None])
    eye_x, mouth_x = tpl.eye_x.copy(), tpl.mouth_x.copy()
    np.subtract(eyes * np.float32(2), np.float32(1), out=eye_x[:, :3])
    np.subtract(mouth * np.float32(2), np.float32(1), out=mouth_x[:, :3])
    eye_x[:, 6] = t[:2, None, None]
    mouth_x[0, 6:8] = t[2:, None, None]
    return {"eye_x": eye_x, "mouth_x": mouth_x, "rendered_eyes": eyes, "rendered_mouth": mouth}


def graph_feed(refiner: RegionRefiner, rendered_eyes: np.ndarray, source_eyes: np.ndarray, rendered_mouth: np.ndarray,
               source_mouth: np.ndarray, target: np.ndarray, source_open: np.ndarray) -> dict[str, np.ndarray]:
    """One frame's graph inputs from its rendered and the source's patches (uint8) and their (4,) openings."""
    return frame_feed(feed_template(refiner, source_eyes, source_mouth, source_open), rendered_eyes, rendered_mouth,
                      target)


def refiner_id(refiner: RegionRefiner) -> str:
    """Fingerprint of a refiner's config and weights (ranges measured on one never quantise another): the
    render graph's own (``fastgraph.weights_id``)."""
    from models.fomm.fastgraph import weights_id

    return weights_id(refiner)  # type: ignore[arg-type]


def load_ranges(refiner: RegionRefiner, weights: str | Path = DEFAULT_WEIGHTS) -> dict[str, Any] | None:
    """The shipped ranges beside ``weights`` when they were measured on exactly this refiner, else None."""
    path = ranges_path(weights)
    try:
        ranges = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable calibration ranges %s: %s", path, e)
        return None
    if not isinstance(ranges, dict) or ranges.get("refiner_id") != refiner_id(refiner) \
            or not isinstance(ranges.get("ranges"), dict):
        return None
    return ranges


# Convolutions kept in float32: each branch's first (it reads the target opening planes) and its output (the
# residual and mask that draw the eye). With them in int8 too the closed-eye bench opened eyes 0.76 of the way
# instead of 0.82.
FLOAT_CONVS = [f"/{b}/{n}/Conv" for b in ("eye", "mouth") for n in ("enc0/enc0.0/enc0.0.0", "out")]


# The operators run in int8. Not only the convolutions: with the ReLUs, concatenations and resizes between them
# quantised too, ONNX Runtime drops the quantise / dequantise pairs around them (the graph 1.07 -> 0.90 ms a
# frame, against 1.61 in float32) and folds each ReLU into its convolution's output range (0.55 -> 0.40 grey
# levels from float32).
OP_TYPES = ["Conv", "Relu", "Concat", "Resize"]


def _quantize_static(src: Path, out: Path, cache: Path, float_convs: list[str]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(src, out, None, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=OP_TYPES, nodes_to_exclude=float_convs, calibration_cache_path=cache)


def quantise(onnx_bytes: bytes, ranges: dict[str, Any]) -> bytes:
    """Static QDQ int8 of the graph's convolutions from calibration ranges (no data needed), but those the ranges
    name ``float_convs`` (``FLOAT_CONVS`` when they do not say: weights trained in float32)."""
    from models.fomm.fastgraph import _DropPreprocessAdvice

    with tempfile.TemporaryDirectory(prefix="kpcast-refiner-q8-") as d:
        src, out, cache = Path(d) / "fp32.onnx", Path(d) / "int8.onnx", Path(d) / "ranges.json"
        src.write_bytes(onnx_bytes)
        cache.write_text(json.dumps(ranges["ranges"]))
        quiet = _DropPreprocessAdvice()
        logging.getLogger().addFilter(quiet)
        try:
            _quantize_static(src, out, cache, list(ranges.get("float_convs", FLOAT_CONVS)))
        finally:
            logging.getLogger().removeFilter(quiet)
        return out.read_bytes()


def with_qat_ranges(refiner: RegionRefiner, ranges: dict[str, Any], qat: dict[str, list[float]]) -> dict[str, Any]:
    """Calibrated ``ranges`` with the tensors a quantisation-aware run simulated set to the ranges it trained with
    (``qat.tensor_ranges``); its float convolutions are those it left in float."""
    import onnx

    from models.expression.qat import conv_module, tensor_ranges

    graph = onnx.load_from_string(export_refiner(refiner)).graph
    relu_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Relu"}
    convs = {n.name: (n.input[0], n.output[0], *([relu_of[n.output[0]]] if n.output[0] in relu_of else []))
             for n in graph.node if n.op_type == "Conv"}
    trained = tensor_ranges(qat, convs)
    # an upsampled tensor goes on to a concatenation that a convolution reads: quantised over that convolution's
    # input range, the concatenation's requantisation of it is none, as in the simulation (which quantises the
    # concatenation's output only)
    users: dict[str, list] = {}
    for n in graph.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    for n in graph.node:
        if n.op_type == "Resize":
            cats = [c for c in users.get(n.output[0], []) if c.op_type == "Concat"]
            reads = [u for c in cats for u in users.get(c.output[0], []) if u.op_type == "Conv"]
            if len(reads) == 1 and reads[0].input[0] in trained:
                trained[n.output[0]] = trained[reads[0].input[0]]
    out = json.loads(json.dumps(ranges))
    data = out["ranges"]["data"]
    for name, (lo, hi) in trained.items():
        data[name]["lowest"]["data"], data[name]["highest"]["data"] = [float(lo)], [float(hi)]
    out["float_convs"] = [n for n in convs if conv_module(n) not in qat]
    out["method"] = f"qat ranges for {len(trained)} tensors, MinMax for the rest"
    return out


def planar(patches: np.ndarray) -> np.ndarray:
    """(N, ..., H, W, 3) uint8 -> (N, ..., 3, H, W) float32 in [0, 1], as the refiner takes patches."""
    return np.moveaxis(patches, -1, -3).astype(np.float32) / np.float32(255.0)


def calibrate(refiner: RegionRefiner, feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """MinMax ranges of the graph's convolution inputs and outputs over ``feeds`` (batch-1 input dicts)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import CalibrationCacheEncoder

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="kpcast-refiner-calib-") as d:
        path = Path(d) / "refiner.onnx"
        path.write_bytes(export_refiner(refiner))
        cal = create_calibrator(path, OP_TYPES, augmented_model_path=str(Path(d) / "aug.onnx"),
                                calibrate_method=CalibrationMethod.MinMax)
        cal.collect_data(_Reader())
        ranges = json.loads(json.dumps(cal.compute_data(), cls=CalibrationCacheEncoder))
    return {"refiner_id": refiner_id(refiner), "method": "MinMax", "samples": len(feeds), "ranges": ranges}


def training_feeds(path: str | Path, samples: int, seed: int = 0,
                   refiner: RegionRefiner | None = None) -> list[dict[str, np.ndarray]]:
    """The stage graph's inputs (``graph_feed``) for training samples (``models.expression.region_data``):
    rendered and source patches, and the wire target the refiner was trained on (source openings + gain x scale
    change); ``refiner``'s opening statistics (default: the shipped refiner's: the same training rows)."""
    from models.expression.region_data import load_samples

    net = refiner if refiner is not None else load_refiner(DEFAULT_WEIGHTS)[0]
    s = load_samples(path)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(s.rendered_eyes), size=min(samples, len(s.rendered_eyes)), replace=False))
    feeds = []
    for i in idx:
        si = s.source[i]
        target = s.target[i] if s.target.ndim == 2 else s.source_open[si]
        feeds.append(graph_feed(net, s.rendered_eyes[i], s.source_eyes[si], s.rendered_mouth[i], s.source_mouth[si],
                                target, s.source_open[si]))
    return feeds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--train", default="cache/region_train.npz", help="training samples (models.expression.region_data)")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--out", help="default: beside the weights, WEIGHTS.int8.json")
    p.add_argument("--qat", action="store_true",
                   help="the weights were fine-tuned for int8 (train_refiner --qat): quantise every convolution "
                        "their run simulated, with the ranges it trained with (the checkpoint's meta qat_ranges)")
    p.add_argument("--all-convs", action="store_true",
                   help="every convolution in int8 (weights fine-tuned for it: train_refiner --qat all); default: "
                        "each branch's first and output convolutions stay float32 (FLOAT_CONVS)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    net, meta = load_refiner(a.weights)
    ranges = calibrate(net, training_feeds(a.train, a.samples, refiner=net))
    ranges["data"] = str(a.train)
    ranges["float_convs"] = [] if a.all_convs else FLOAT_CONVS
    if a.qat:
        if not meta.get("qat_ranges"):
            p.error(f"{a.weights} was not trained with --qat (no qat_ranges in its meta)")
        ranges = with_qat_ranges(net, ranges, meta["qat_ranges"])
    out = Path(a.out) if a.out else ranges_path(a.weights)
    out.write_text(json.dumps(ranges, indent=1, sort_keys=True))
    log.info("wrote %s (%d tensors' ranges from %d training samples)", out, len(ranges["ranges"]["data"]),
             ranges["samples"])


if __name__ == "__main__":
    main()
