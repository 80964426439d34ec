"""The region refiner as one ONNX graph (what the receiver's region stage runs), and an int8 variant.

``export_refiner``: the graph ``receiver.regions`` runs through ONNX Runtime on one thread.

The int8 variant (static QDQ, uint8 activations and per-channel int8 weights, as the render graph's:
``models.fomm.fastgraph``; activation ranges measured on training patches, never on the validation persons,
named by a fingerprint of the weights) took the graph from ~1.5 to ~0.8 ms a frame here (1.0 ms with
``FLOAT_CONVS`` left in float32) but drew closed eyes less open: ``bench.closed_eyes`` closed 0.76 of the gap
(0.81 with ``FLOAT_CONVS`` in float32) against 0.82 in float32. It is not shipped (no ranges file in
``models/weights``); this module keeps the tools to measure it again:

    python -m models.expression.refiner_int8 --samples 512 --out out/region_refiner.int8.json
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.expression.openings import EYE_PATCH, MOUTH_PATCH
from models.expression.region_refiner import DEFAULT_WEIGHTS, RegionRefiner, load_refiner
from models.fomm.fastgraph import ranges_path

log = logging.getLogger(__name__)

INPUTS = ["rendered_eyes", "source_eyes", "rendered_mouth", "source_mouth", "target", "source_open"]
OUTPUTS = ["eyes", "mouth"]


class _Patches(torch.nn.Module):
    """The refiner with only the refined patches as outputs: the graph ONNX Runtime runs."""

    def __init__(self, refiner: RegionRefiner) -> None:
        super().__init__()
        self.refiner = refiner

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.refiner(*args)
        return out["eyes"], out["mouth"]


def export_refiner(refiner: RegionRefiner) -> bytes:
    """The refiner's ONNX graph at batch 1 (inputs ``INPUTS``, outputs ``OUTPUTS``)."""
    from models.fomm.export import EXPORT_LOCK

    mw, mh = MOUTH_PATCH
    example = (torch.zeros(1, 2, 3, EYE_PATCH, EYE_PATCH), torch.zeros(1, 2, 3, EYE_PATCH, EYE_PATCH),
               torch.zeros(1, 3, mh, mw), torch.zeros(1, 3, mh, mw), torch.zeros(1, 4), torch.zeros(1, 4))
    buf = io.BytesIO()
    with EXPORT_LOCK, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Patches(refiner.eval()), example, buf, opset_version=17, dynamo=False,
                          input_names=INPUTS, output_names=OUTPUTS)
    return buf.getvalue()


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
FLOAT_CONVS = [f"/refiner/{b}/{n}/Conv" for b in ("eye", "mouth") for n in ("enc0/enc0.0/enc0.0.0", "out")]


def _quantize_static(src: Path, out: Path, cache: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(src, out, None, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv"], nodes_to_exclude=FLOAT_CONVS, calibration_cache_path=cache)


def quantise(onnx_bytes: bytes, ranges: dict[str, Any]) -> bytes:
    """Static QDQ int8 of the graph's convolutions (but ``FLOAT_CONVS``) from calibration ranges (no data needed)."""
    from models.fomm.fastgraph import _DropPreprocessAdvice

    with tempfile.TemporaryDirectory(prefix="kpcast-refiner-q8-") as d:
        src, out, cache = Path(d) / "fp32.onnx", Path(d) / "int8.onnx", Path(d) / "ranges.json"
        src.write_bytes(onnx_bytes)
        cache.write_text(json.dumps(ranges["ranges"]))
        quiet = _DropPreprocessAdvice()
        logging.getLogger().addFilter(quiet)
        try:
            _quantize_static(src, out, cache)
        finally:
            logging.getLogger().removeFilter(quiet)
        return out.read_bytes()


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
        cal = create_calibrator(path, ["Conv"], augmented_model_path=str(Path(d) / "aug.onnx"),
                                calibrate_method=CalibrationMethod.MinMax)
        cal.collect_data(_Reader())
        ranges = json.loads(json.dumps(cal.compute_data(), cls=CalibrationCacheEncoder))
    return {"refiner_id": refiner_id(refiner), "method": "MinMax", "samples": len(feeds), "ranges": ranges}


def training_feeds(path: str | Path, samples: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Batch-1 refiner inputs from the training samples (``models.expression.region_data``): rendered and
    source patches, and the wire target the refiner was trained on (source openings + gain x scale change)."""
    from models.expression.region_data import load_samples

    s = load_samples(path)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(s.rendered_eyes), size=min(samples, len(s.rendered_eyes)), replace=False))
    feeds = []
    for i in idx:
        si = s.source[i]
        target = s.target[i] if s.target.ndim == 2 else s.source_open[si]
        arrays = [planar(s.rendered_eyes[i][None]), planar(s.source_eyes[si][None]),
                  planar(s.rendered_mouth[i][None]), planar(s.source_mouth[si][None]),
                  np.asarray(target, np.float32)[None], np.asarray(s.source_open[si], np.float32)[None]]
        feeds.append(dict(zip(INPUTS, arrays, strict=True)))
    return feeds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--train", default="cache/region_train.npz", help="training samples (models.expression.region_data)")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--out", help="default: beside the weights, WEIGHTS.int8.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    net, _ = load_refiner(a.weights)
    ranges = calibrate(net, training_feeds(a.train, a.samples))
    ranges["data"] = str(a.train)
    out = Path(a.out) if a.out else ranges_path(a.weights)
    out.write_text(json.dumps(ranges, indent=1, sort_keys=True))
    log.info("wrote %s (%d tensors' ranges from %d training samples)", out, len(ranges["ranges"]), ranges["samples"])


if __name__ == "__main__":
    main()
