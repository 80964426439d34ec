"""Reconstruction quality of the motion model, beside the static-source baseline.

Usage:
  python -m bench.quality --data ../shared/data --weights runs/face64/best.pt --split val \\
      --json out/quality.json --png out/quality.png
  python -m bench.quality --data ../shared/data --split val --size 64 128 256 --json out/quality_sizes.json
  python -m bench.quality --data ../shared/data --json q.json --transfer-source face.jpg \\
      --transfer-driving ../shared/data/pcavs_vox2/Input_00010_c00.mp4 --mp4 out/transfer.mp4

``--size`` picks the shipped model of each size (``models/weights/fomm_faceN.pt``) and,
with several sizes, prints them side by side; each size is scored on the clips decoded
at that size, so each static row is that size's own floor.

Reconstruction (every clip): the source is the clip's first frame; every later frame is
rendered from its own detected keypoints. Metrics are per frame, averaged per clip, then
averaged over clips: L1 (pixels in [0, 1]), PSNR, SSIM (scikit-image), and ``l1_moving``,
L1 restricted to pixels that differ between source and driving frame by more than 0.1
(channel mean) — whole-frame metrics reward a model that moves the head but leaves the
face as in the source; this one does not. The static-source baseline shows the source
frame for every frame, scored on exactly the same frames. Render fps is dense motion +
generator (+ full-resolution refiner) at batch 1 with the source encoding cached, on
``--threads`` threads, eager PyTorch and ONNX Runtime (what the receiver runs on CPU) side by side;
``stages_ms`` splits one eager render into its stages (medians).

Transfer (``--transfer-*``): FOMM's relative animation of a source image by another clip
(``kp = kp_s + scale*(kp_d - kp_d0)``, ``J = J_d J_d0^-1 J_s``, adaptive scale
``sqrt(area(hull(kp_s)) / area(hull(kp_d0)))``), written as driving | rendered.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from bench import common
from models.data import IMAGE_EXTS, center_square, read_clip
from models.fomm.io import weights_for_size
from models.fomm.model import MotionModel, cache_tensors, vector_to_kp

log = logging.getLogger(__name__)

METRICS = ("l1", "psnr", "ssim", "l1_moving")


# --------------------------------------------------------------------------- reconstruction


def keypoint_spread(vectors: np.ndarray, num_kp: int = 10) -> float:
    """Mean distance of keypoints from their per-frame centroid (collapse detector)."""
    xy = vectors[:, : 2 * num_kp].reshape(len(vectors), num_kp, 2)
    return float(np.linalg.norm(xy - xy.mean(1, keepdims=True), axis=-1).mean())


def evaluate_clip(model: MotionModel, frames: np.ndarray) -> dict[str, Any]:
    """Model and static-source metrics of one clip (uint8 (T,H,W,3), T >= 2)."""
    ref = common.to_float(frames)
    source, targets = ref[0], ref[1:]
    kp = common.detect_keypoints(model, frames[1:])
    pred = common.render_vectors(model, common.prepare(model, frames[0]), kp)
    static = np.broadcast_to(source, targets.shape)
    m = common.frame_metrics(pred, targets, source)
    s = common.frame_metrics(static, targets, source)
    return {"model": m, "static_source": s, "kp_spread": keypoint_spread(kp, model.config.num_kp),
            "win": bool(m["l1"] < s["l1"])}


def render_fps(model: MotionModel, source: np.ndarray, vectors: np.ndarray, warmup: int = 5,
               frames: int = 40, rounds: int = 4) -> tuple[float, float]:
    """Frames per second of ``render`` at batch 1 with the source cache built once: eager PyTorch
    and the receiver's CPU renderer (``receiver.render.FastRender``: ONNX Runtime, int8 where the
    weights ship calibration ranges). The two alternate in ``rounds`` blocks so machine noise hits
    both alike; ``bench.render_speed`` compares every way of rendering."""
    from receiver.render import fast_render

    cache = common.prepare(model, source)
    args = cache_tensors(cache)
    fast = fast_render(model, cache)
    if fast is None:
        raise SystemExit("cannot build the ONNX Runtime renderer")
    bound = fast.bind(args)
    v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    fns = {"eager": lambda x: model.render_tensors(x, *args), "onnx": lambda x: fast(bound, x.numpy())}
    spent = {k: 0.0 for k in fns}
    per_round = max(1, frames // rounds)
    with torch.no_grad():
        for f in fns.values():
            for i in range(warmup):
                f(v[i % len(v)][None])
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for i in range(per_round):
                    f(v[i % len(v)][None])
                spent[k] += time.perf_counter() - t0
    n = per_round * rounds
    return n / spent["eager"], n / spent["onnx"]


@torch.no_grad()
def stage_ms(model: MotionModel, source: np.ndarray, vectors: np.ndarray, frames: int = 40) -> dict[str, float]:
    """Median milliseconds of each render stage at batch 1 (the stages of ``MotionModel.render``)."""
    cache = common.prepare(model, source)
    v = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    times: dict[str, list[float]] = {"dense_motion": [], "generator": [], "refiner": []}
    for i in range(frames + 3):
        t0 = time.perf_counter()
        kp_d = vector_to_kp(v[i % len(v)][None], model.config.num_kp)
        motion = model.dense_motion(cache.image, kp_d, cache.kp)
        t1 = time.perf_counter()
        low = model.generator.decode(cache.features, motion["deformation"], motion["occlusion"])["prediction"]
        t2 = time.perf_counter()
        if model.refiner is not None:
            model.refiner(cache.image, motion["deformation"], motion["occlusion"], low, cache.static)
        t3 = time.perf_counter()
        if i >= 3:  # warm-up
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[k].append(dt * 1000)
    out = {k: float(np.median(x)) for k, x in times.items()}
    out["total"] = sum(out.values())
    return out


def run_reconstruction(model: MotionModel, clips: list[tuple[Any, np.ndarray]], fps_frames: int = 40) -> dict[str, Any]:
    per_clip = []
    for info, frames in clips:
        r = evaluate_clip(model, frames)
        per_clip.append({"clip": common.clip_name(info), "frames": int(len(frames) - 1),
                         "model": r["model"], "static_source": r["static_source"],
                         "kp_spread": r["kp_spread"], "win": r["win"]})
        log.info("%s: model L1 %.4f  static L1 %.4f", per_clip[-1]["clip"], r["model"]["l1"],
                 r["static_source"]["l1"])
    first = clips[0][1]
    first_kp = common.detect_keypoints(model, first)
    fps, fps_onnx = render_fps(model, first[0], first_kp, frames=fps_frames)
    stages = stage_ms(model, first[0], first_kp, frames=fps_frames)
    return {
        "clips": len(per_clip),
        "frames": sum(c["frames"] for c in per_clip),
        "model": common.mean_over_clips([c["model"] for c in per_clip], METRICS),
        "static_source": common.mean_over_clips([c["static_source"] for c in per_clip], METRICS),
        "kp_spread": float(np.mean([c["kp_spread"] for c in per_clip])),
        "wins_vs_static": sum(c["win"] for c in per_clip),
        "render_fps": fps,
        "render_fps_onnx": fps_onnx,
        "stages_ms": stages,
        "per_clip": per_clip,
    }


# --------------------------------------------------------------------------- transfer


def _hull_area(xy: np.ndarray) -> float:
    return float(cv2.contourArea(cv2.convexHull(xy.astype(np.float32).reshape(-1, 1, 2))))


def relative_keypoints(kp_s: np.ndarray, kp_d: np.ndarray, num_kp: int = 10,
                       adapt_scale: bool = True) -> tuple[np.ndarray, float]:
    """FOMM relative motion: drive source keypoints ``kp_s`` (60,) with driving ``kp_d`` (T,60)
    relative to the driving clip's first frame. Returns ((T,60) vectors, movement scale)."""
    n2 = 2 * num_kp
    xy_s = kp_s[:n2].reshape(num_kp, 2)
    j_s = kp_s[n2:].reshape(num_kp, 2, 2)
    xy_d = kp_d[:, :n2].reshape(-1, num_kp, 2)
    j_d = kp_d[:, n2:].reshape(-1, num_kp, 2, 2)
    scale = 1.0
    if adapt_scale:
        a_d0 = _hull_area(xy_d[0])
        scale = float(np.sqrt(_hull_area(xy_s) / a_d0)) if a_d0 > 1e-8 else 1.0
    xy = xy_s[None] + scale * (xy_d - xy_d[0:1])
    jac = np.einsum("tkij,kjl->tkil", j_d, np.linalg.inv(j_d[0]))  # J_d . J_d0^-1
    jac = np.einsum("tkij,kjl->tkil", jac, j_s)  # (...) . J_s
    out = np.concatenate([np.clip(xy, -1, 1).reshape(len(kp_d), -1), jac.reshape(len(kp_d), -1)], axis=1)
    return out.astype(np.float32), scale


def load_source_image(path: str | Path, size: int) -> np.ndarray:
    """An image file, or the first frame of a clip -> uint8 (size,size,3) RGB."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTS:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"cannot read image {path}")
        h, w = img.shape[:2]
        if w >= 2 * h:  # a png_stack clip: take its first frame
            img = img[:, :h]
        return center_square(img[..., ::-1], size)
    return center_square(read_clip(path, max_frames=1)[0], size)


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 30.0) -> None:
    """uint8 (T,H,W,3) RGB -> H.264 mp4 (near-lossless, for looking at)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames.shape[1:3]
    pad_h, pad_w = h % 2, w % 2  # yuv420p needs even sides
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=round(fps))
        st.width, st.height, st.pix_fmt = w + pad_w, h + pad_h, "yuv420p"
        st.options = {"crf": "16", "preset": "veryfast"}
        for f in frames:
            if pad_h or pad_w:
                f = np.pad(f, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)


def run_transfer(model: MotionModel, source_path: str, driving_path: str, mp4: str | None,
                 max_frames: int | None) -> dict[str, Any]:
    size = model.config.size
    src = load_source_image(source_path, size)
    drv = np.stack([center_square(f, size) for f in read_clip(driving_path, max_frames=max_frames)])
    kp_s = common.detect_keypoints(model, src[None])[0]
    kp_d = common.detect_keypoints(model, drv)
    vecs, scale = relative_keypoints(kp_s, kp_d, model.config.num_kp)
    pred = common.render_vectors(model, common.prepare(model, src), vecs)
    if mp4:
        side = np.concatenate([drv, (pred * 255 + 0.5).astype(np.uint8)], axis=2)
        write_mp4(mp4, side)
    return {"source": str(source_path), "driving": str(driving_path), "frames": len(drv),
            "movement_scale": scale, "mp4": mp4}


# --------------------------------------------------------------------------- output


def table(res: dict[str, Any]) -> str:
    rows = []
    for name, key in (("model", "model"), ("static source", "static_source")):
        r = res[key]
        rows.append([name, r["l1"], r["psnr"], r["ssim"], r["l1_moving"]])
    head = common.format_table(["", "L1", "PSNR dB", "SSIM", "L1 moving"], rows)
    st = res["stages_ms"]
    return (f"{head}\nclips {res['clips']} ({res['frames']} frames) at {res['size']}px, "
            f"model wins {res['wins_vs_static']}/{res['clips']} clips on L1, "
            f"keypoint spread {res['kp_spread']:.3f}, render {res['render_fps']:.1f} fps eager, "
            f"{res['render_fps_onnx']:.1f} ONNX Runtime (batch 1, {res['threads']} threads; "
            f"eager dense motion {st['dense_motion']:.1f} ms, "
            f"generator {st['generator']:.1f} ms, refiner {st['refiner']:.1f} ms)")


def sizes_table(by_size: dict[int, dict[str, Any]]) -> str:
    """Every size side by side: model and static rows, L1 ratio, fps and the stage split."""
    rows = []
    for size, r in sorted(by_size.items()):
        m, s = r["model"], r["static_source"]
        st = r["stages_ms"]
        rows.append([f"{size} model", m["l1"], m["psnr"], m["ssim"], m["l1_moving"], m["l1"] / s["l1"],
                     f"{r['wins_vs_static']}/{r['clips']}", r["render_fps"], r["render_fps_onnx"],
                     f"{st['dense_motion']:.1f}/{st['generator']:.1f}/{st['refiner']:.1f}"])
        rows.append([f"{size} static", s["l1"], s["psnr"], s["ssim"], s["l1_moving"], 1.0, "", "", "", ""])
    return common.format_table(["size", "L1", "PSNR dB", "SSIM", "L1 moving", "L1/static", "wins", "fps eager",
                                "fps onnx", "eager ms dm/gen/ref"], rows)


def plot(res: dict[str, Any], path: str | Path) -> None:
    fig, ax = common.new_figure(max(6.0, 0.5 * res["clips"] + 3), 4.0)
    names = [c["clip"].split("/")[-1] for c in res["per_clip"]]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [c["model"]["l1"] for c in res["per_clip"]], 0.4, label="model")
    ax.bar(x + 0.2, [c["static_source"]["l1"] for c in res["per_clip"]], 0.4, label="static source")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("L1 (lower is better)")
    ax.set_title(f"Reconstruction L1 per clip ({res['size']}px, {res['weights']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--weights", nargs="+", default=None,
                   help="motion model(s) (default: shipped, else runs/face64/best.pt)")
    p.add_argument("--size", type=int, nargs="+", default=None,
                   help="shipped model(s) of these output sizes instead of --weights (e.g. 64 128 256)")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--kinds", nargs="+", default=["face"])
    p.add_argument("--max-frames", type=int, default=150)
    p.add_argument("--max-clips", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fps-frames", type=int, default=40, help="timed frames for render fps")
    p.add_argument("--transfer-source", default=None, help="image or clip (first frame) to animate")
    p.add_argument("--transfer-driving", default=None, help="clip whose relative motion drives it")
    p.add_argument("--mp4", default=None, help="side-by-side driving | rendered video (transfer mode)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if bool(a.transfer_source) != bool(a.transfer_driving):
        p.error("--transfer-source and --transfer-driving go together")
    common.set_threads(a.threads)
    if a.size and a.weights:
        p.error("--size and --weights are alternatives")
    try:
        weights = [weights_for_size(s) for s in a.size] if a.size else (a.weights or [None])
    except ValueError as e:
        p.error(str(e))
    clips = common.select_clips(a.data, a.kinds, a.split)[: a.max_clips]
    by_size: dict[int, dict[str, Any]] = {}
    for w in weights:
        res = evaluate_weights(w, clips, a)
        by_size[res["size"]] = res
        print(table(res))
    if len(by_size) > 1:
        res = {"split": a.split, "kinds": a.kinds, "threads": a.threads, "sizes": sorted(by_size),
               "by_size": {str(k): v for k, v in sorted(by_size.items())}}
        print("\n" + sizes_table(by_size))
    if a.json:
        common.write_json(a.json, res)
    if a.png:
        plot(res if len(by_size) == 1 else by_size[max(by_size)], a.png)
    if "transfer" in res:
        t = res["transfer"]
        print(f"transfer: {t['frames']} frames, movement scale {t['movement_scale']:.3f}"
              + (f", video {t['mp4']}" if t["mp4"] else ""))
    return res


def evaluate_weights(weights: str | Path | None, clips: list[Any], a: argparse.Namespace) -> dict[str, Any]:
    """Reconstruction (and optional transfer) of one model on ``clips`` decoded at its size."""
    model, meta, wpath = common.load_model(weights)
    size = model.config.size
    loaded = common.load_selected(clips, size, a.max_frames)
    res: dict[str, Any] = {"size": size, "weights": str(wpath), "weights_step": meta.get("step"),
                           "split": a.split, "kinds": a.kinds, "threads": a.threads,
                           "max_frames": a.max_frames, "moving_threshold": common.MOVING_THRESHOLD}
    res.update(run_reconstruction(model, loaded, a.fps_frames))
    if a.transfer_source:
        res["transfer"] = run_transfer(model, a.transfer_source, a.transfer_driving, a.mp4, a.max_frames)
    return res

if __name__ == "__main__":
    main()
