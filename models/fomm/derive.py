"""Smaller tiers from one trained 256x256 checkpoint, so every tier shares its detector.

Usage:
  python -m models.fomm.derive --src runs/expr256/last.pt --size 64 --out models/weights/fomm_face64.pt
  python -m models.fomm.derive --src runs/expr256/last.pt --size 128 --out models/weights/fomm_face128.pt

The 256 model is the 64 model (keypoint detector, dense motion and U-Net generator, all at
64x64, trained with an L1 anchor on their own 64x64 output) plus the full-resolution
Refiner. So the 64 tier is the 256 checkpoint without its refiner, and the 128 tier is the
same motion model with the refiner run at 128 (its convolutions do not depend on the
output size; its gate counts displacement in output pixels, so it opens a little less).
Fine-tune a derived 128 with ``models.fomm.train --size 128 --init OUT --freeze kp_detector
dense_motion generator`` when time allows; the card says whether that was done.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from models.checkpoint import read_checkpoint
from models.fomm.config import FommConfig
from models.fomm.io import KIND, detector_id, save_motion_model
from models.fomm.model import MotionModel

log = logging.getLogger(__name__)


def derive(src: str | Path, size: int) -> tuple[MotionModel, dict]:
    """The ``size`` tier of a 256 checkpoint whose generator runs at 64 (gen_size=64)."""
    blob = read_checkpoint(src, KIND)
    cfg = FommConfig.from_dict(blob["config"])
    if cfg.generator_size != cfg.motion_size or cfg.size < size:
        raise ValueError(f"{src}: needs a checkpoint whose generator runs at the motion size "
                         f"(got size {cfg.size}, gen_size {cfg.gen_size})")
    new_cfg = replace(cfg, size=size, gen_size=0 if size == cfg.motion_size else cfg.generator_size)
    model = MotionModel(new_cfg)
    own = model.state_dict()
    state = {k: v.float() for k, v in blob["state_dict"].items() if k in own}
    missing = set(own) - set(state)
    if missing:
        raise ValueError(f"{src} lacks {sorted(missing)[:5]}")
    model.load_state_dict(state)
    meta = dict(blob["meta"])
    meta.update(derived_from=str(src), derived_from_size=cfg.size, derived_from_step=meta.get("step"))
    return model.eval(), meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="a 256 checkpoint (gen_size 64)")
    p.add_argument("--size", type=int, required=True, choices=[64, 128])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, meta = derive(a.src, a.size)
    n = save_motion_model(a.out, model, meta)
    log.info("wrote %s (%d bytes, size %d, detector %s)", a.out, n, a.size, detector_id(model))


if __name__ == "__main__":
    main()
