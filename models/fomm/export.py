"""The keypoint detector as an ONNX file: for the sender's ONNX Runtime path and for browsers.

Usage:
  python -m models.fomm.export --weights models/weights/fomm_face256.pt --out out/detector.onnx
  python -m models.fomm.export --weights models/weights/fomm_face256.pt --cache-dir cache/web

``--cache-dir`` writes ``detector-<fingerprint>-<code>.onnx`` there, the file the receiver's
browser sender page (``receiver.sendpage``) serves under that name; the receiver makes it itself
on the first request when the set-up has not.

Input ``frame``: (1, 3, 64, 64) float32 RGB in [0, 1] (the detector's own size; shrink
the capture first, with an area filter as the training frames were). Output
``keypoints``: (1, 60) float32 in the wire layout of ``models.fomm.model``. The command
checks the file against PyTorch on real frames of the bundled clip and prints the largest
difference.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.fomm.model import MotionModel, kp_to_vector

# torch.onnx.export keeps process-wide state (GLOBALS.in_onnx_export): two exports at once in two
# threads break each other (the receiver builds batch graphs in the background while calls run).
EXPORT_LOCK = threading.Lock()

log = logging.getLogger(__name__)


class _Detector(nn.Module):
    def __init__(self, model: MotionModel) -> None:
        super().__init__()
        self.kp_detector = model.kp_detector

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        return kp_to_vector(self.kp_detector(frame))


def detector_onnx(model: MotionModel) -> bytes:
    """The model's detector (eval mode) exported to ONNX, batch 1 at its motion size."""
    size = model.config.motion_size
    buf = io.BytesIO()
    with EXPORT_LOCK, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shape checks become constants: a detector's shape never changes
        torch.onnx.export(_Detector(model).eval(), (torch.zeros(1, 3, size, size),), buf, opset_version=17,
                          dynamo=False, input_names=["frame"], output_names=["keypoints"])
    return buf.getvalue()


def code_id() -> str:
    """The model code and exporter an exported graph came from: a change to a network's forward
    (or to torch) must never be served a graph exported from the old code, even when the weights
    are the same."""
    h = hashlib.sha256(torch.__version__.encode())
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def detector_cache_path(model: MotionModel, cache_dir: str | Path) -> Path:
    """Where ``cached_detector_onnx`` keeps the model's detector: named by its weights and the code."""
    from models.fomm.io import detector_id

    return Path(cache_dir) / f"detector-{detector_id(model)}-{code_id()}.onnx"


def cached_detector_onnx(model: MotionModel, cache_dir: str | Path) -> Path:
    """``detector_cache_path(model, cache_dir)``, exported once.

    Named by ``models.fomm.io.detector_id`` and ``code_id``, so a file can never be served for the
    wrong detector or a graph of older code; written to a temporary name and renamed, so a reader
    never sees half a file.
    """
    path = detector_cache_path(model, cache_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(detector_onnx(model))
        tmp.replace(path)
        log.info("exported the keypoint detector to %s", path)
    return path


def onnx_session(onnx_bytes: bytes, threads: int = 1):  # returns an onnxruntime.InferenceSession
    """A CPU ONNX Runtime session that does not spin (the sender shares its cores with aiortc)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    from models.data import read_clip
    from models.fomm.io import load_motion_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="models/weights/fomm_face256.pt")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="write the ONNX file here")
    out.add_argument("--cache-dir", help="write detector-<fingerprint>-<code>.onnx here (what the receiver serves)")
    p.add_argument("--check-clip", default="assets/demo_face.mp4")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="fail when ONNX Runtime and PyTorch differ by more than this on the check frames")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, _ = load_motion_model(a.weights)
    if a.cache_dir:
        a.out = str(cached_detector_onnx(model, a.cache_dir))
        blob = Path(a.out).read_bytes()
    else:
        blob = detector_onnx(model)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_bytes(blob)
    sess = onnx_session(blob)
    size = model.config.motion_size
    frames = read_clip(a.check_clip, max_frames=60)
    import cv2

    worst = 0.0
    for f in frames:
        x = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
        t = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255
        ref = model.keypoints(t).numpy()
        got = sess.run(None, {"frame": t.numpy()})[0]
        worst = max(worst, float(np.abs(ref - got).max()))
    print(f"wrote {a.out} ({len(blob)} B); largest difference vs PyTorch on {len(frames)} frames: {worst:.2e}")
    if not worst <= a.tolerance:
        raise SystemExit(f"the ONNX detector differs from PyTorch by {worst:.2e} > {a.tolerance:.0e}")


if __name__ == "__main__":
    main()
