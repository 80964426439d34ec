"""bench.latency: the per-stage join is arithmetic on the two logs, and a real short call yields consistent stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.latency import STAGES, stage_times
from bench.latency import main as latency_main

pytestmark = pytest.mark.call  # a real call


def test_stage_times_join_by_seq() -> None:
    truth = {"seq": np.array([0, 1, 2]), "read_ms": np.array([1.0, 2.0, 3.0]), "extract_ms": np.array([10.0] * 3),
             "encode_ms": np.array([0.5] * 3), "capture_us": np.array([0, 33_000, 66_000]),
             "sent_us": np.array([12_000, 45_000, 78_000])}
    shown = {"seq": np.array([2, 0, 1, 1]), "kind": np.array([0, 0, 1, 0]), "repeated": np.array([0, 0, 0, 1], bool),
             "arrival_us": np.array([79_000, 13_000, 0, 0]), "render_start_us": np.array([90_000, 20_000, 0, 0]),
             "rendered_us": np.array([100_000, 30_000, 0, 0]), "tick_ms": np.array([0.1, 0.2, 0, 0], np.float32),
             "render_ms": np.array([9.0, 8.0, 0, 0], np.float32), "sink_ms": np.array([0.5, 0.5, 0, 0], np.float32)}
    t = stage_times(truth, shown)
    # only the two real, non-repeated frames (seq 2 and 0), in the order shown
    assert list(t["capture"]) == [3.0, 1.0]
    assert list(t["network"]) == [1.0, 1.0]
    assert list(t["buffer"]) == [11.0, 7.0]
    assert list(t["glass_to_glass"]) == [34.0, 30.0]
    assert set(t) == set(STAGES)


def test_short_real_call(tmp_path: Path, tiny_weights: Path) -> None:
    out = tmp_path / "lat.json"
    assert latency_main(["--frames", "40", "--modes", "immediate", "--weights", str(tiny_weights),
                         "--json", str(out), "--png", str(tmp_path / "lat.png")]) == 0
    r = json.loads(out.read_text())
    (call,) = r["calls"]
    st = call["stages_ms"]
    n = st["render"]["n"]
    assert n == call["frames_real_timed"] > 0.5 * call["frames_sent"] and call["frames_sent"] >= 1
    assert all(st[s]["n"] == n for s in STAGES)
    # glass-to-glass spans every stage after capture, so it can't be shorter than their sum's parts
    assert st["glass_to_glass"]["p50"] >= st["render"]["p50"]
    assert st["glass_to_glass"]["p50"] >= st["network"]["p50"]
    assert st["network"]["p50"] >= 0 and st["buffer"]["p50"] >= 0
    assert r["offline"]["cpu"]["render_fps"] > 0 and (tmp_path / "lat.png").stat().st_size > 0
