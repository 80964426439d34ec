"""Measure the int8 calibration ranges of a shipped render graph on training clips.

Usage:
  python -m models.fomm.quantize --data ../shared/data --weights models/weights/fomm_face256.pt
  # writes models/weights/fomm_face256.int8.json (a few kB), which the receiver finds by the
  # weights' fingerprint and uses to run the graph's convolutions in int8 (models.fomm.fastgraph)

Calibration frames: ``--clips`` training clips (the by-person split of ``models.data``, so no
validation person is seen), spread over the list, ``--frames`` frames of each, every frame
rendered from its clip's first frame as a call does. MinMax ranges: the renders of the validation
split (``bench.quality`` / ``bench.expression``) say what they cost.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from models.data import load_clips, load_frames, split_by_group
from models.fomm import fastgraph
from models.fomm.io import load_motion_model
from models.fomm.model import cache_tensors

log = logging.getLogger(__name__)


def measure(weights: str | Path, data: str | Path, clips: int, frames: int) -> dict:
    model, _meta = load_motion_model(weights)
    size = model.config.size
    train = split_by_group(load_clips(data, ["face"]))[0]
    picked = [train[i] for i in np.linspace(0, len(train) - 1, min(clips, len(train))).round().astype(int)]
    graph = None
    used = 0
    for clip in picked:
        loaded = load_frames([clip], size, min_frames=2, max_frames=frames * 4)
        if not loaded:
            continue
        f = torch.from_numpy(loaded[0]).permute(0, 3, 1, 2).float() / 255.0
        f = f[:: max(1, len(f) // frames)][:frames]  # spread over the clip: more pose and mouth variety
        cache = model.prepare_source(f[:1])
        args = cache_tensors(cache)
        kp = model.keypoints(f).numpy()
        if graph is None:
            graph = fastgraph.SplitGraph(fastgraph.export_render(model, (torch.from_numpy(kp[:1]), *args)),
                                         record=True)
        bound = graph.bind({f"in{i + 1}": a.numpy() for i, a in enumerate(args)})
        for v in kp:
            graph.run(bound, v[None])
        used += 1
    if graph is None:
        raise SystemExit(f"no readable training clips under {data}")
    ranges = fastgraph.calibrate(graph)
    ranges.update(weights_id=fastgraph.weights_id(model), size=size, clips=used, frames_per_clip=frames,
                  command=f"python -m models.fomm.quantize --data {data} --weights {weights} "
                          f"--clips {clips} --frames {frames}")
    return ranges


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--weights", nargs="+", default=["models/weights/fomm_face256.pt"])
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--frames", type=int, default=8)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    for w in a.weights:
        with torch.no_grad():
            ranges = measure(w, a.data, a.clips, a.frames)
        out = fastgraph.ranges_path(w)
        out.write_text(json.dumps(ranges, indent=None, sort_keys=True) + "\n")
        log.info("wrote %s (%d clips x %d frames, %d B)", out, ranges["clips"], a.frames, out.stat().st_size)


if __name__ == "__main__":
    main()
