"""The render graph for browsers: two ONNX files, one run once per source image, one per frame.

The browser call page (``receiver.callpage``) renders the remote face itself with onnxruntime-web,
from the keypoints it receives. onnxruntime-web has no PyTorch to hand the warps to (unlike
``models.fomm.fastgraph``), so the graph stays whole apart from one cut:

* ``bind``: the source image -> everything of the render graph that does not depend on the frame's
  keypoints: the source keypoints and the generator's encoder features (``MotionModel.prepare_source``)
  followed by the render graph's source stage (``fastgraph.split``: the source downsampled for dense
  motion, its keypoints' heatmaps, broadcasts). Input ``image`` (1, 3, S, S) float32 RGB in [0, 1];
  its outputs are named as the frame graph's inputs, so a page feeds them across by name;
* ``frame``: input ``keypoints`` (1, 6K) float32 (the wire layout of ``models.fomm.model``) plus
  the bind outputs -> ``frame`` (1, 3, S, S) float32 in [0, 1].

Their values are those of ``MotionModel.render`` to float precision (``check``).

Usage:
  python -m models.fomm.webrender --weights models/weights/fomm_face64.pt --cache-dir cache/web
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.fomm import fastgraph
from models.fomm.export import EXPORT_LOCK, code_id, onnx_session
from models.fomm.model import MotionModel, cache_tensors, kp_to_vector

log = logging.getLogger(__name__)

IMAGE = "image"
KEYPOINTS = "keypoints"
FRAME = "frame"
_PREFIX = "prepare/"  # the prepare graph's names inside bind, apart from the render graph's


class _Prepare(nn.Module):
    """``prepare_source`` as tensors: image -> ``render_tensors``' source arguments after the image."""

    def __init__(self, model: MotionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return cache_tensors(self.model.prepare_source(image))[1:]


@dataclass(frozen=True)
class WebRender:
    """The two graphs (serialised ONNX) and the names a page needs to wire them."""

    bind: bytes
    frame: bytes
    bind_outputs: list[str]
    size: int

    def info(self) -> dict[str, object]:
        return {"size": self.size, "image": IMAGE, "keypoints": KEYPOINTS, "frame": FRAME,
                "bind_outputs": self.bind_outputs}


def _export(module: nn.Module, example: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str]) -> bytes:
    buf = io.BytesIO()
    with EXPORT_LOCK, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shape checks become constants: a model's shapes never change
        torch.onnx.export(module.eval(), example, buf, opset_version=17, dynamo=False, input_names=inputs,
                          output_names=outputs)
    return buf.getvalue()


def export_web_render(model: MotionModel) -> WebRender:
    """The model's bind and frame graphs (see the module doc); needs ``onnx``."""
    import onnx
    from onnx import compose, shape_inference, utils

    if model.refiner is not None:  # its static picture would need the render graph inside bind too
        raise ValueError("the browser render graph is for models without a refiner (the 64 tier)")
    s = model.config.size
    image = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        source_args = cache_tensors(model.prepare_source(image))
        example = (kp_to_vector(model.kp_detector(image)), *source_args)
    # shapes for every tensor: the extractor needs the value infos of the tensors it cuts at
    render = shape_inference.infer_shapes(onnx.load_from_string(fastgraph.export_render(model, example)))
    source, _ = fastgraph.split(render.SerializeToString())
    # frame: the render graph from the keypoints and the source stage's outputs to the picture
    frame = utils.Extractor(render).extract_model([fastgraph.FRAME_INPUT, *source.outputs], [FRAME])
    frame_inputs = {i.name for i in frame.graph.input}
    bind_outputs = [o for o in source.outputs if o in frame_inputs]
    # bind: prepare (image -> in2, in3...) feeding the source stage, whose own image input is in1
    n = len(source_args)
    prep = onnx.load_from_string(_export(_Prepare(model), (image,), ["in1"],
                                         [f"in{i + 2}" for i in range(n - 1)]))
    prep = compose.add_prefix(prep, _PREFIX)
    stage = source.model
    io_map = [(f"{_PREFIX}{i.name}", i.name) for i in stage.graph.input if i.name != "in1"]
    bind = compose.merge_models(prep, stage, io_map=io_map, outputs=bind_outputs)
    # one image input: the source stage's in1 and prepare's are the same picture
    for node in bind.graph.node:
        node.input[:] = [IMAGE if i in ("in1", f"{_PREFIX}in1") else i for i in node.input]
    keep = [i for i in bind.graph.input if i.name == f"{_PREFIX}in1"]
    del bind.graph.input[:]
    keep[0].name = IMAGE
    bind.graph.input.append(keep[0])
    # the frame graph's keypoint input under its page-facing name
    for node in frame.graph.node:
        node.input[:] = [KEYPOINTS if i == fastgraph.FRAME_INPUT else i for i in node.input]
    for i in frame.graph.input:
        if i.name == fastgraph.FRAME_INPUT:
            i.name = KEYPOINTS
    onnx.checker.check_model(bind)
    onnx.checker.check_model(frame)
    return WebRender(bind.SerializeToString(), frame.SerializeToString(), bind_outputs, s)


def check(model: MotionModel, web: WebRender, frames: int = 8) -> float:
    """Largest difference between the two graphs run by ONNX Runtime and ``MotionModel.render`` on
    random source images and the detector's keypoints of other random images."""
    bind, frame = onnx_session(web.bind), onnx_session(web.frame)
    g = torch.Generator().manual_seed(1)
    s = web.size
    worst = 0.0
    for _ in range(frames):
        src, drv = torch.rand(1, 3, s, s, generator=g), torch.rand(1, 3, s, s, generator=g)
        kp = model.keypoints(drv)
        ref = model.render(model.prepare_source(src), kp).numpy()
        bound = dict(zip(web.bind_outputs, bind.run(web.bind_outputs, {IMAGE: src.numpy()}), strict=True))
        got = frame.run([FRAME], {KEYPOINTS: kp.numpy(), **bound})[0]
        worst = max(worst, float(np.abs(ref - got).max()))
    return worst


def cache_name(model: MotionModel) -> str:
    """``render<S>-<weights>-<code>``: one name, one content (weights, config, model code, torch)."""
    return f"render{model.config.size}-{fastgraph.weights_id(model)[:12]}-{code_id()}"


def cached_web_render(model: MotionModel, cache_dir: str | Path) -> Path:
    """``<cache_dir>/<cache_name>.{bind,frame}.onnx`` and ``.json`` (the wiring), exported once;
    returns the ``.json`` path. Each file is written under a temporary name and renamed, the
    ``.json`` last, so a reader that finds it finds both graphs whole."""
    base = Path(cache_dir) / cache_name(model)
    info = base.with_suffix(".json")
    if info.exists():
        return info
    web = export_web_render(model)
    base.parent.mkdir(parents=True, exist_ok=True)
    for suffix, data in ((".bind.onnx", web.bind), (".frame.onnx", web.frame),
                         (".json", json.dumps({**web.info(), "bind_onnx": base.name + ".bind.onnx",
                                               "frame_onnx": base.name + ".frame.onnx",
                                               "sha256": hashlib.sha256(web.frame).hexdigest()[:16]}).encode())):
        path = base.with_name(base.name + suffix)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    log.info("exported the %dx%d browser render graph to %s.*", web.size, web.size, base)
    return info


def main(argv: list[str] | None = None) -> None:
    from models.fomm.io import load_motion_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="models/weights/fomm_face64.pt")
    p.add_argument("--cache-dir", default="cache/web")
    p.add_argument("--tolerance", type=float, default=1e-4)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, _ = load_motion_model(a.weights)
    info = cached_web_render(model, a.cache_dir)
    meta = json.loads(info.read_text())
    web = WebRender((info.parent / meta["bind_onnx"]).read_bytes(), (info.parent / meta["frame_onnx"]).read_bytes(),
                    meta["bind_outputs"], meta["size"])
    worst = check(model, web)
    print(f"wrote {info} (bind {len(web.bind)} B, frame {len(web.frame)} B); largest difference vs PyTorch: "
          f"{worst:.2e}")
    if not worst <= a.tolerance:
        raise SystemExit(f"the browser render graph differs from PyTorch by {worst:.2e} > {a.tolerance:.0e}")


if __name__ == "__main__":
    main()
