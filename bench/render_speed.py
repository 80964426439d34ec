"""Render speed of several models side by side, in one run, alternating rounds.

Usage:
  python -m bench.render_speed --weights out/old_weights/fomm_face256.pt models/weights/fomm_face256.pt \\
      --labels old256 new256 --json out/bench/render_speed.json --png out/bench/render_speed.png

Absolute times differ between machines of the same kind (1.7x seen here) and with
whatever else runs, so every model is timed in the same run, round-robin: each round
renders ``--frames`` frames with each model and each way of rendering in turn, so a burst of
other work hits all of them alike. The ways: ``int8`` (the receiver's CPU renderer,
``receiver.render.FastRender``: the graph cut at its warps, the source's share once, int8
convolutions), ``split`` (the same in float32), ``whole`` (the whole graph in one ONNX Runtime
session, the receiver's renderer before), ``eager`` (PyTorch). Batch 1, the source encoding
cached, the keypoints of real frames of the bundled clip. With ``--refine-regions [PATH]`` also
``int8+picture`` (the int8 frame made the uint8 picture a receiver shows, ``receiver.render.to_image``)
and ``int8+regions`` (that picture's eyes and mouth redrawn by the receiver's region stage,
``receiver.regions``, one thread, as ``receiver --refine-regions`` shows it); ``regions / picture`` is
the stage's speed cost, the ratio of the two in each round. ``--refine-regions OLD.pt NEW.pt``: a column
pair per refiner (``int8+regions (LABEL)``, ``regions / picture (LABEL)``), all in the same rounds.
``--ways int8``: time only these of the four ways (int8 always), so the rounds that matter come round faster.
"""

from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from models.data import center_square, read_clip
from models.fomm.model import cache_tensors

log = logging.getLogger(__name__)
CLIP = Path(__file__).resolve().parents[1] / "assets" / "demo_face.mp4"


WAYS = ("int8", "split", "whole", "eager")


def _onnx_frame(fast: Any, args: tuple[torch.Tensor, ...], vecs: torch.Tensor, i: int) -> None:
    fast(vecs[i % len(vecs)][None], *args)


def _fast_frame(fast: Any, bound: dict[str, np.ndarray], vecs: np.ndarray, i: int) -> None:
    fast(bound, vecs[i % len(vecs)][None])


def _eager_frame(model: Any, args: tuple[torch.Tensor, ...], vecs: torch.Tensor, i: int) -> None:
    model.render_tensors(vecs[i % len(vecs)][None], *args)


def _picture_frame(fast: Any, bound: dict[str, np.ndarray], vecs: np.ndarray, i: int) -> None:
    from receiver.render import to_image

    to_image(fast(bound, vecs[i % len(vecs)][None])[0])


def _regions_frame(fast: Any, bound: dict[str, np.ndarray], vecs: np.ndarray, stage: Any, source: Any,
                   i: int) -> None:
    from receiver.render import to_image

    v = vecs[i % len(vecs)]
    stage.apply(to_image(fast(bound, v[None])[0]), v, source)


def run(weights: list[str], labels: list[str], rounds: int, frames: int, threads: int,
        refine_regions: str | list[str] | None = None, ways: tuple[str, ...] = WAYS) -> dict[str, Any]:
    from models.fomm.model import kp_to_vector
    from receiver.regions import RegionStage, anchor_kp_of, load_region_weights
    from receiver.render import fast_render, onnx_render

    clip = read_clip(CLIP, max_frames=frames + 1)
    fns: dict[tuple[str, str], Any] = {}
    sizes = {}
    refiners = {(f"int8+regions ({k})" if k else "int8+regions"): load_region_weights(v)
                for k, v in common.refiner_labels(refine_regions).items()}
    timed = tuple(w for w in WAYS if w == "int8" or w in ways)
    ways = timed + (("int8+picture", *refiners) if refiners else ())
    for label, w in zip(labels, weights, strict=True):
        model, meta, path = common.load_model(w)
        size = model.config.size
        sizes[label] = size
        f = np.stack([center_square(x, size) for x in clip])
        cache = common.prepare(model, f[0])
        args = cache_tensors(cache)
        vecs = torch.from_numpy(common.detect_keypoints(model, f[1:]))
        whole = onnx_render(model, cache)
        split, int8 = fast_render(model, cache, int8=False), fast_render(model, cache, int8=True)
        if whole is None or split is None or int8 is None:
            raise SystemExit(f"cannot build the ONNX Runtime renderers for {w}")
        if not int8.int8:
            log.warning("%s: no int8 calibration ranges, the int8 column is float32", w)
        every = {"int8": partial(_fast_frame, int8, int8.bind(args), vecs.numpy()),
                 "split": partial(_fast_frame, split, split.bind(args), vecs.numpy()),
                 "whole": partial(_onnx_frame, whole, args, vecs), "eager": partial(_eager_frame, model, args, vecs)}
        fns.update({(label, w): every[w] for w in timed})
        if refiners:
            fns[(label, "int8+picture")] = partial(_picture_frame, int8, int8.bind(args), vecs.numpy())
        for way, parts in refiners.items():
            stage = RegionStage.of(parts, anchor_kp_of(meta, path))
            src = stage.prepare(f[0], kp_to_vector(cache.kp)[0].numpy())
            if src is None:
                raise SystemExit(f"the region stage cannot place the eyes and mouth on {CLIP}'s first frame")
            fns[(label, way)] = partial(_regions_frame, int8, int8.bind(args), vecs.numpy(), stage, src)
    spent = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            for i in range(3):
                f(i)
        for _ in range(rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                for i in range(frames):
                    f(i)
                spent[k].append(frames / (time.perf_counter() - t0))
    rows = {}
    for label in labels:
        rows[label] = {"size": sizes[label], "weights": weights[labels.index(label)]}
        for way in ways:
            rows[label][f"fps_{way}"] = float(np.median(spent[(label, way)]))
            rows[label][f"rounds_{way}"] = spent[(label, way)]
        # per round, so a slow round slows both sides of the ratio alike
        def ratio(a: str, b: str, lab: str = label) -> float:
            return float(np.median(np.divide(spent[(lab, a)], spent[(lab, b)])))

        if "whole" in timed:
            rows[label]["int8_vs_whole"] = ratio("int8", "whole")
            if "split" in timed:
                rows[label]["split_vs_whole"] = ratio("split", "whole")
        for way in refiners:
            tag = way[len("int8+regions"):]  # "" or " (LABEL)"
            rows[label][f"regions_vs_int8{tag}"] = ratio(way, "int8")
            rows[label][f"regions_vs_picture{tag}"] = ratio(way, "int8+picture")
    base = rows[labels[0]]
    for r in rows.values():
        r["int8_vs_first"] = r["fps_int8"] / base["fps_int8"]
    return {"rounds": rounds, "frames_per_round": frames, "threads": threads, "models": rows, "ways": list(ways),
            "refine_regions": ({k or "regions": str(v) for k, v in common.refiner_labels(refine_regions).items()}
                               if refine_regions else None)}


def table(res: dict[str, Any]) -> str:
    ways = res.get("ways", [*WAYS, *(("int8+picture", "int8+regions") if res.get("refine_regions") else ())])
    cols = [(f"fps {w}", f"fps_{w}") for w in ways]
    cols += [(name, key) for name, key in (("int8 / whole", "int8_vs_whole"), ("split / whole", "split_vs_whole"),
                                           ("int8 vs first", "int8_vs_first"))]
    for w in ways:
        if w.startswith("int8+regions"):
            tag = w[len("int8+regions"):]
            cols += [(f"regions / int8{tag}", f"regions_vs_int8{tag}"), (f"regions / picture{tag}",
                                                                         f"regions_vs_picture{tag}")]
    cols = [(n, k) for n, k in cols if any(k in r for r in res["models"].values())]
    rows = [[name, r["size"], *(r.get(k, "-") for _n, k in cols)] for name, r in res["models"].items()]
    return (f"render fps, median of {res['rounds']} alternating rounds of {res['frames_per_round']} frames, "
            f"{res['threads']} threads\n" + common.format_table(["model", "size", *(n for n, _k in cols)], rows))


def plot(res: dict[str, Any], path: str | Path) -> None:
    fig, ax = common.new_figure(7, 4)
    names = list(res["models"])
    x = np.arange(len(names))
    labels = {"int8": "int8 split graph (receiver)", "split": "float32 split graph", "whole": "whole ONNX graph",
              "eager": "eager PyTorch"}
    labels["int8+picture"] = "int8 + picture"
    for w in res.get("ways", []):
        if w.startswith("int8+regions"):
            labels[w] = "int8 + picture + region stage" + w[len("int8+regions"):]
    ways = [w for w in labels if all(f"fps_{w}" in res["models"][n] for n in names)]
    width = 0.8 / len(ways)
    for k, way in enumerate(ways):
        ax.bar(x + (k - (len(ways) - 1) / 2) * width, [res["models"][n][f"fps_{way}"] for n in names], width,
               label=labels[way])
    ax.axhline(30, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, names)
    ax.set_ylabel("frames per second (batch 1)")
    ax.set_title("render speed, side by side in one run")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", required=True)
    p.add_argument("--labels", nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--refine-regions", nargs="*", default=None, metavar="PATH",
                   help="also time int8 + the receiver's region stage (256 models; no PATH: the shipped refiner; "
                        "several: a column each)")
    p.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS),
                   help="which renderers to time (int8 always: the baseline of every ratio)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    labels = a.labels or [Path(w).stem for w in a.weights]
    if len(labels) != len(a.weights) or len(set(labels)) != len(labels):
        p.error("--labels needs one distinct label per --weights")
    refiners = common.refiner_paths(p, a.refine_regions)
    common.set_threads(a.threads)
    res = run(a.weights, labels, a.rounds, a.frames, a.threads, refiners, tuple(a.ways))
    print(table(res))
    if a.json:
        common.write_json(a.json, res)
    if a.png:
        plot(res, a.png)
    return res


if __name__ == "__main__":
    main()
