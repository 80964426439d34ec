"""Do the mouth and the eyes follow? Scored by dlib's 68-point landmarks, a detector we did not train.

Usage:
  python -m bench.expression --data ../shared/data --split val --size 64 128 256 \\
      --json out/bench/expression.json --png out/bench/expression.png
  python -m bench.expression --data ../shared/data --weights old/fomm_face256.pt models/weights/fomm_face256.pt \\
      --labels old256 new256 --json out/bench/expression_old_new.json    # side by side
  python -m bench.expression --data assets --split all --stride 10        # the bundled clip, quick
  python -m bench.expression --data ../shared/data --size 256 --streams q8 pred --crf 48 45 43 40 \
      --json out/bench/expression_streams.json                              # what the wire keeps
  python -m bench.expression --data ../shared/data --size 256 --render int8 \
      --refine-regions models/weights/region_refiner.pt --json out/bench/expression_regions.json

Every ``--stride``-th frame of each clip (source = the clip's first frame) is rendered by
each model from its own keypoints, and scored against its driving frame at 256x256
(lower sizes are upscaled: what a viewer would see). Rows beside the models: the static
source (the first frame shown throughout) and libx264 (veryfast, zerolatency) at
``--crf`` rates, decoded, on the same frames.

``--streams``: rows for the first model's keypoints *as a call delivers them*: ``q8`` (every
frame, the Q8 codec) and ``pred`` (the sender's default predictive stream,
``shared.kpcodec.DEFAULT_STREAM``: skipped frames shown as the receiver predicts them; ``pred:T``
the same at tolerance T), with
their kbps on the wire (messages + 95 B each, as bench.bandwidth) and ``h264_kbps_at_mouth_corr``:
the libx264 rate that gives the same mouth-opening correlation (interpolated over the CRF
rows; H.264 here is payload only, no packet headers). Rendered as the first ``--render``; with
``--refine-regions`` also ``'<row> <stream> + regions'``: what a call shows, end to end.

``--refine-regions [PATH]``: rows for the first model's renders (each ``--render``) with the
receiver's region stage applied (``receiver.regions``: eyes and mouth redrawn by the region
refiner, its target openings computed from the keypoints alone, prepared once on the clip's
first frame, the source; after the upscale to 256, as the receiver does), named
``'<row> + regions'``, and ``regions_ms_per_frame``: the stage's own time per frame (1 thread).
``--regions-paste changes patches``: a row per way of pasting the refined patches back
(``RegionStage``'s ``paste``; the receiver's is ``changes``), named ``'<row> + regions (MODE)'``.
``--refine-regions OLD.pt NEW.pt``: a row per refiner, side by side in one run, named
``'<row> + regions (LABEL)'`` (LABEL: the file's stem, with its folder where two stems are alike; with
several paste modes too, ``'LABEL, MODE'``).

Definitions (fixed, so numbers compare from one model version to the next):
- face box: dlib's HOG detector on the *driving* frame (largest face, no upsampling),
  reused for the shape prediction on every rendered frame. A driving frame without a
  detectable face is counted (``no_face``) and not scored.
- AKD: mean distance of the 68 points, pixels at 256.
- mouth opening: mean of |p61-p67|, |p62-p66|, |p63-p65|; eye opening: mean of |p37-p41|,
  |p38-p40|, |p43-p47|, |p44-p46| (0-based); both over the distance between the eye
  centres (means of points 36-41 and 42-47) of the same 68 points.
- errors: mean |opening - driving's opening|; correlation: Pearson over a clip's scored
  frames (0 when either side is constant), averaged over clips.
- AED: L2 between dlib's 128-d face descriptors of rendered and driving frame, on every
  ``--aed-every``-th scored frame (a descriptor costs ~60 ms).
- L1 / SSIM: pixels at 256 on the scored frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import common
from bench.h264 import h264_encode
from bench.wire_sim import FPS, pred_stream_messages, receive, receive_pred, stream_messages, wire_kbps
from models.fomm.io import weights_for_size
from models.fomm.model import kp_to_vector
from models.landmarks import LANDMARK_SIZE, FaceLandmarks
from shared import protocol
from shared.kpcodec import DEFAULT_STREAM

log = logging.getLogger(__name__)

MOUTH_PAIRS = ((61, 67), (62, 66), (63, 65))
EYE_PAIRS = ((37, 41), (38, 40), (43, 47), (44, 46))
METRICS = ("akd", "mouth_err", "eye_err", "mouth_corr", "eye_corr", "aed", "l1", "ssim")
STREAMS = ("q8", "pred")


def delivered(kp: np.ndarray, stream: str) -> tuple[np.ndarray, int, int]:
    """Keypoints (T,60) as the receiver decodes them from ``stream``, with message bytes and count."""
    if stream == "q8":
        msgs = stream_messages(kp, protocol.Codec.Q8, 1, 1)
        got = receive(msgs, len(kp))
    elif stream == "pred" or stream.startswith("pred:"):
        cfg = DEFAULT_STREAM if stream == "pred" else dataclasses.replace(DEFAULT_STREAM,
                                                                          tolerance=float(stream.split(":")[1]))
        msgs, _summary = pred_stream_messages(kp, cfg)
        got = receive_pred(msgs, len(kp), cfg)
    else:
        raise ValueError(f"unknown stream {stream!r}; known: {STREAMS}")
    return got.astype(np.float32), sum(len(m) for m in msgs), len(msgs)


def kbps_at(points: list[tuple[float, float]], target: float) -> float | None:
    """Rate at which a (kbps, score) curve reaches ``target`` (log-rate interpolation), None outside it."""
    pts = sorted(points, key=lambda p: p[1])
    scores = np.array([p[1] for p in pts])
    if len(pts) < 2 or not scores[0] <= target <= scores[-1]:
        return None
    return float(np.exp(np.interp(target, scores, np.log([p[0] for p in pts]))))


def inter_ocular(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[36:42].mean(0) - lm[42:48].mean(0)))


def opening(lm: np.ndarray, pairs: tuple[tuple[int, int], ...]) -> float:
    """Mean distance of the point pairs over the inter-ocular distance of the same face."""
    d = np.mean([np.linalg.norm(lm[a] - lm[b]) for a, b in pairs])
    return float(d / max(inter_ocular(lm), 1e-6))


def mouth_opening(lm: np.ndarray) -> float:
    return opening(lm, MOUTH_PAIRS)


def eye_opening(lm: np.ndarray) -> float:
    return opening(lm, EYE_PAIRS)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (or fewer than 2 values)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def upscale(frames: np.ndarray, size: int = LANDMARK_SIZE) -> np.ndarray:
    """uint8 or float frames (N,h,w,3) -> uint8 (N,size,size,3) (bicubic, as a viewer scales)."""
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255 + 0.5).astype(np.uint8)
    if frames.shape[1] == size:
        return frames
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_CUBIC) for f in frames])


@dataclass
class Row:
    """One way of showing the call: a model, the static source or an H.264 stream."""

    name: str
    kind: str  # model | regions | stream | static | h264
    kbps: float | None = None
    weights: str | None = None
    size: int | None = None
    stream: str | None = None  # kind stream: the stream's name (q8, pred, pred:T)


def score_clip(fl: FaceLandmarks, driving: np.ndarray, shown: dict[str, np.ndarray],
               aed_every: int) -> dict[str, Any]:
    """Score frames ``shown[row]`` (uint8 (N,256,256,3)) against ``driving`` (same N)."""
    per: dict[str, dict[str, list[float]]] = {r: {"akd": [], "mouth": [], "eye": [], "aed": [], "l1": [], "ssim": []}
                                              for r in shown}
    drv_mouth, drv_eye, no_face, scored = [], [], 0, 0
    for i, d in enumerate(driving):
        box = fl.detect(d)
        if box is None:
            no_face += 1
            continue
        lm_d = fl.shape(d, box)
        do_aed = scored % aed_every == 0
        desc_d = fl.descriptor(d, box) if do_aed else None
        drv_mouth.append(mouth_opening(lm_d))
        drv_eye.append(eye_opening(lm_d))
        df = d.astype(np.float32) / 255
        for r, frames in shown.items():
            f = frames[i]
            lm = fl.shape(f, box)
            p = per[r]
            p["akd"].append(float(np.linalg.norm(lm - lm_d, axis=1).mean()))
            p["mouth"].append(mouth_opening(lm))
            p["eye"].append(eye_opening(lm))
            if do_aed:
                p["aed"].append(float(np.linalg.norm(fl.descriptor(f, box) - desc_d)))
            ff = f.astype(np.float32) / 255
            p["l1"].append(common.l1(ff, df))
            p["ssim"].append(common.ssim(ff, df))
        scored += 1
    out: dict[str, Any] = {"frames": len(driving), "scored": scored, "no_face": no_face,
                           "driving_mouth": drv_mouth, "driving_eye": drv_eye, "rows": {}}
    for r, p in per.items():
        if not scored:
            out["rows"][r] = None
            continue
        m, e = np.array(p["mouth"]), np.array(p["eye"])
        out["rows"][r] = {
            "akd": float(np.mean(p["akd"])),
            "mouth_err": float(np.abs(m - drv_mouth).mean()), "eye_err": float(np.abs(e - drv_eye).mean()),
            "mouth_corr": pearson(m, drv_mouth), "eye_corr": pearson(e, drv_eye),
            "aed": float(np.mean(p["aed"])) if p["aed"] else float("nan"),
            "l1": float(np.mean(p["l1"])), "ssim": float(np.mean(p["ssim"])),
            "mouth": p["mouth"], "eye": p["eye"],
        }
    return out


def h264_kbps(streams: list[bytes]) -> float:
    """Steady-state rate of a clip (the first frame, an IDR, excluded as in bench.bandwidth)."""
    return sum(len(s) for s in streams[1:]) * 8 / max(1, len(streams) - 1) * FPS / 1000


def run(data: str, split: str, kinds: list[str], models: list[tuple[str, str | Path]], crfs: list[int],
        stride: int, aed_every: int, max_frames: int, max_clips: int | None,
        stream_names: list[str] = (), renders: list[str] = ("eager",),
        refine_regions: str | Path | list[str | Path] | None = None,
        regions_paste: list[str] = ("changes",)) -> dict[str, Any]:
    fl = FaceLandmarks(descriptors=True)
    clips = common.select_clips(data, kinds, split)[:max_clips]
    loaded_models = []
    for label, w in models:
        model, meta, path = common.load_model(w)
        loaded_models.append((label, model, meta, path))
    def row_name(label: str, render: str) -> str:
        return label if render == "eager" else f"{label} {render}"

    rows = [Row(row_name(label, r), "model", weights=str(path), size=m.config.size)
            for label, m, _meta, path in loaded_models for r in renders]
    first = loaded_models[0]
    stages = {}  # row suffix -> RegionStage
    if refine_regions:
        from receiver.regions import RegionStage, anchor_kp_of, load_region_weights

        anchors = anchor_kp_of(first[2], first[3])
        for label, path in common.refiner_labels(refine_regions).items():
            parts = load_region_weights(path)
            for mode in regions_paste:
                tag = ", ".join(x for x in (label, mode if len(regions_paste) > 1 else "") if x)
                stages["+ regions" + (f" ({tag})" if tag else "")] = RegionStage.of(parts, anchors, paste=mode)
        rows += [Row(f"{row_name(first[0], r)} {suffix}", "regions", weights=str(first[3]),
                     size=first[1].config.size) for r in renders for suffix in stages]
    regions_s, regions_frames = 0.0, 0
    rows += [Row(f"{first[0]} {st}", "stream", weights=str(first[3]), size=first[1].config.size, stream=st)
             for st in stream_names]
    # what a call shows: the delivered keypoints rendered (the first --render) and redrawn by the region stage
    rows += [Row(f"{first[0]} {st} {suffix}", "stream", weights=str(first[3]), size=first[1].config.size, stream=st)
             for st in stream_names for suffix in stages]
    stream_bits = {st: [0, 0, 0] for st in stream_names}  # message bytes, messages, frames
    rows.append(Row("static source", "static"))
    rows += [Row(f"libx264 CRF {c}", "h264") for c in crfs]
    h264_bits = {c: [0, 0] for c in crfs}  # bytes, frames
    per_clip = []
    t0 = time.time()
    for info in clips:
        sizes = {LANDMARK_SIZE} | {m.config.size for _l, m, _meta, _p in loaded_models}
        decoded = {}
        for s in sizes:
            got = common.load_selected([info], s, max_frames)
            decoded[s] = got[0][1]
        clip256 = decoded[LANDMARK_SIZE]
        if len(clip256) <= stride:
            continue
        idx = np.arange(stride, len(clip256), stride)
        shown: dict[str, np.ndarray] = {}
        for label, model, _meta, _p in loaded_models:
            frames = decoded[model.config.size]
            kp = common.detect_keypoints(model, frames[idx])
            cache = common.prepare(model, frames[0])
            for r in renders:
                shown[row_name(label, r)] = upscale(common.render_vectors(model, cache, kp, render=r))
            for suffix, stage in stages.items() if label == first[0] else ():
                # as the receiver: prepared once on the source (at 256), applied after the upscale
                src = stage.prepare(clip256[0], kp_to_vector(cache.kp)[0].numpy())
                for r in renders:
                    t1 = time.perf_counter()
                    shown[f"{row_name(label, r)} {suffix}"] = np.stack(
                        [stage.apply(f, k, src) for f, k in zip(shown[row_name(label, r)], kp, strict=True)])
                    regions_s += time.perf_counter() - t1
                    regions_frames += len(kp)
        if stream_names:
            label, model = first[0], first[1]
            frames = decoded[model.config.size]
            kp_all = common.detect_keypoints(model, frames)  # a stream is sequential: every frame
            cache = common.prepare(model, frames[0])
            for st in stream_names:
                got, nbytes, nmsgs = delivered(kp_all, st)
                stream_bits[st][0] += nbytes
                stream_bits[st][1] += nmsgs
                stream_bits[st][2] += len(kp_all)
                shown[f"{label} {st}"] = upscale(common.render_vectors(model, cache, got[idx], render=renders[0]))
                for suffix, stage in stages.items():
                    src = stage.prepare(clip256[0], kp_to_vector(cache.kp)[0].numpy())
                    shown[f"{label} {st} {suffix}"] = np.stack(
                        [stage.apply(f, k, src) for f, k in zip(shown[f"{label} {st}"], got[idx], strict=True)])
        shown["static source"] = np.broadcast_to(clip256[0], (len(idx), *clip256.shape[1:]))
        for c in crfs:
            streams, dec, _kf = h264_encode(clip256, c)
            h264_bits[c][0] += sum(len(s) for s in streams[1:])
            h264_bits[c][1] += len(streams) - 1
            shown[f"libx264 CRF {c}"] = dec[idx]
        res = score_clip(fl, clip256[idx], shown, aed_every)
        res["clip"] = common.clip_name(info)
        res["person"] = info.person
        per_clip.append(res)
        log.info("%s: %d scored, %d no face (%.0f s)", res["clip"], res["scored"], res["no_face"], time.time() - t0)
    for r in rows:
        if r.kind == "h264":
            c = int(r.name.rsplit(" ", 1)[1])
            r.kbps = h264_bits[c][0] * 8 / max(1, h264_bits[c][1]) * FPS / 1000
        elif r.kind == "stream":
            b, n, f = stream_bits[r.stream]
            r.kbps = wire_kbps(b, n, f / FPS) if f else None
    summary = {}
    for r in rows:
        vals = [c["rows"][r.name] for c in per_clip if c["rows"].get(r.name)]
        summary[r.name] = {**common.mean_over_clips(vals, METRICS), "kind": r.kind, "kbps": r.kbps,
                           "weights": r.weights, "size": r.size, "clips": len(vals)}
    static = summary["static source"]
    for r in rows:
        s = summary[r.name]
        s["l1_vs_static"] = s["l1"] / static["l1"] if static["l1"] else float("nan")
    h264_pts = [(summary[r.name]["kbps"], summary[r.name]["mouth_corr"]) for r in rows if r.kind == "h264"]
    for r in rows:
        if r.kind == "stream":
            s = summary[r.name]
            s["h264_kbps_at_mouth_corr"] = kbps_at(h264_pts, s["mouth_corr"])
            s["ratio_equal_mouth_corr"] = (s["h264_kbps_at_mouth_corr"] / s["kbps"]
                                           if s["h264_kbps_at_mouth_corr"] and s["kbps"] else None)
    return {"data": data, "split": split, "kinds": kinds, "stride": stride, "aed_every": aed_every,
            "max_frames": max_frames, "clips": len(per_clip), "persons": len({c["person"] for c in per_clip}),
            "frames_scored": sum(c["scored"] for c in per_clip), "no_face": sum(c["no_face"] for c in per_clip),
            "models": [{"label": label, "weights": str(p), "step": meta.get("step"), "size": m.config.size}
                       for label, m, meta, p in loaded_models],
            "refine_regions": ({k or "regions": str(v) for k, v in common.refiner_labels(refine_regions).items()}
                               if refine_regions else None),
            "regions_ms_per_frame": 1000 * regions_s / regions_frames if regions_frames else None,
            "summary": summary, "per_clip": per_clip, "seconds": time.time() - t0}


def table(res: dict[str, Any]) -> str:
    headers = ["row", "kbps", "AKD px@256", "mouth err", "eye err", "mouth corr", "eye corr", "AED", "L1",
               "L1/static", "SSIM"]
    rows = [[name, s["kbps"], s["akd"], s["mouth_err"], s["eye_err"], s["mouth_corr"], s["eye_corr"], s["aed"],
             s["l1"], s["l1_vs_static"], s["ssim"]] for name, s in res["summary"].items()]
    head = (f"expression ({res['split']}): {res['clips']} clips, {res['persons']} persons, {res['frames_scored']} "
            f"frames scored (every {res['stride']}th), {res['no_face']} driving frames without a face (not scored)")
    if res.get("regions_ms_per_frame") is not None:
        head += f"; region stage {res['regions_ms_per_frame']:.1f} ms per frame (1 thread)"
    return head + "\n" + common.format_table(headers, rows)


def plot(res: dict[str, Any], path: str | Path) -> None:
    """Opening traces of the clip whose driving mouth moves most: driving / each row."""
    clips = [c for c in res["per_clip"] if c["scored"] >= 3]
    if not clips:
        return
    c = max(clips, key=lambda c: float(np.std(c["driving_mouth"])))
    fig, ax = common.new_figure(9, 6)
    import matplotlib.pyplot as plt

    plt.close(fig)
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    x = np.arange(len(c["driving_mouth"])) * res["stride"]
    for ax, key, drv in ((axes[0], "mouth", c["driving_mouth"]), (axes[1], "eye", c["driving_eye"])):
        ax.plot(x, drv, "k-", lw=2.5, label="driving")
        for name, r in c["rows"].items():
            if r is not None:
                ax.plot(x, r[key], lw=1.2, label=f"{name} (r={r[key + '_corr']:.2f})")
        ax.set_ylabel(f"{key} opening / inter-ocular")
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{c['clip']}: dlib landmarks of each rendered frame vs its driving frame")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].set_xlabel("frame")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--kinds", nargs="+", default=["face"])
    p.add_argument("--size", type=int, nargs="+", default=None, help="shipped models of these sizes")
    p.add_argument("--weights", nargs="+", default=None, help="model checkpoints instead of --size")
    p.add_argument("--labels", nargs="+", default=None, help="row names for --weights")
    p.add_argument("--crf", type=int, nargs="+", default=[45, 40], help="libx264 rows (CRF 45 ~ 23 kbps, 40 ~ 37)")
    p.add_argument("--streams", nargs="*", default=[],
                   help="rows for the first model's keypoints as a call delivers them: q8, pred (the sender's "
                        "default) or pred:TOLERANCE")
    p.add_argument("--stride", type=int, default=5, help="score every Nth frame")
    p.add_argument("--aed-every", type=int, default=2, help="identity descriptor on every Nth scored frame")
    p.add_argument("--max-frames", type=int, default=150)
    p.add_argument("--render", nargs="+", choices=common.RENDERS, default=["eager"],
                   help="how model rows are rendered: eager PyTorch, or the receiver's CPU graph in fp32 / int8 "
                        "(several: side by side, rows named '<label> <render>')")
    p.add_argument("--refine-regions", nargs="*", default=None, metavar="PATH",
                   help="also the first model's rows with the receiver's region stage applied (receiver.regions; "
                        "no PATH: models/weights/region_refiner.pt; several: a row each, side by side)")
    p.add_argument("--regions-paste", nargs="+", choices=["changes", "patches"], default=["changes"],
                   help="with --refine-regions: how the refined patches go back into the frame (several: a row "
                        "each); changes (the receiver's): only what the refiner changed; patches: the whole patch")
    p.add_argument("--max-clips", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    common.set_threads(a.threads)
    if a.size and a.weights:
        p.error("--size and --weights are alternatives")
    if a.weights:
        labels = a.labels or [Path(w).stem for w in a.weights]
        if len(labels) != len(a.weights):
            p.error("--labels needs one label per --weights")
        models = list(zip(labels, a.weights, strict=True))
    else:
        try:
            models = [(f"kpcast {s}", weights_for_size(s)) for s in (a.size or [256])]
        except ValueError as e:
            p.error(str(e))
    if a.stride < 1 or a.aed_every < 1:
        p.error("--stride and --aed-every must be >= 1")
    refiners = common.refiner_paths(p, a.refine_regions)
    res = run(a.data, a.split, a.kinds, models, a.crf, a.stride, a.aed_every, a.max_frames, a.max_clips,
              a.streams, a.render, refiners, a.regions_paste)
    print(table(res))
    if a.json:
        common.write_json(a.json, res)
    if a.png:
        plot(res, a.png)
    return res


if __name__ == "__main__":
    main()
