"""Benchmarks, one short script each (``python -m bench.NAME --help``).

- ``bench.quality``: reconstruction quality of the motion model on held-out clips (L1, PSNR,
  SSIM, an expression-sensitive L1 on moving pixels, keypoint spread, render fps) beside the
  static-source baseline; optional motion-transfer video (``--transfer-*``).
- ``bench.bandwidth``: bits on the wire of the keypoint stream (exact protocol bytes, per
  codec / decimation / batching) against libx264 at equal SSIM and stock aiortc H.264.
- ``bench.common``: shared helpers (clip selection, rendering, metrics, tables, JSON, plots).

Each prints a table and can write JSON (``--json``) and a PNG (``--png``).
"""

import os

# OpenMP reads this once at start-up. Importing any ``bench.*`` module runs this first, before
# torch is imported, so timings are not spoiled by busy-waiting threads on a shared 2-core box.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
