"""bench.concurrency: several real calls on one receiver, each with its own stats; and keypoint replay errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.concurrency import main as concurrency_main
from bench.concurrency import overlap, window_stats
from tests.procs import sender_main

pytestmark = pytest.mark.call  # real calls on a receiver process


def test_two_concurrent_calls(tmp_path: Path, tiny_weights: Path) -> None:
    out = tmp_path / "c.json"
    assert concurrency_main(["--calls", "2", "--frames", "45", "--fps", "15", "--weights", str(tiny_weights),
                             "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["per_call"]) == 2 and len({c["call"] for c in r["per_call"]}) == 2
    assert r["total_stalls"] == sum(c["stalls"] for c in r["per_call"])
    assert all(c["real"] + c["predicted"] + c["concealed"] + c["interpolated"] > 0.5 * 45 for c in r["per_call"])


def test_replay_file_must_hold_keypoints(tmp_path: Path, tiny_weights: Path, demo_clip: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"nope")
    rc, err = sender_main(["--receiver", "http://127.0.0.1:9", "--video", str(demo_clip), "--weights",
                           str(tiny_weights), "--replay-keypoints", str(bad)])
    assert rc == 2 and "cannot read keypoints" in err


def test_all_up_window_leaves_out_each_calls_start() -> None:
    # two calls at 20 fps; the second starts 1 s later with its playout's start-up gap (first frame held)
    a = np.arange(0.0, 5.0, 0.05)
    b = np.concatenate([[1.0], np.arange(1.15, 4.0, 0.05)])
    assert overlap([a, b]) == (1.0, b[-1])
    assert window_stats(b, overlap([a, b]))["stalls"] == 1  # the start-up gap, inside the bare window
    window = overlap([a, b], settle_s=0.5)
    assert window == (1.5, b[-1]) and window_stats(b, window)["stalls"] == 0
    assert overlap([a, b], settle_s=10.0) is None and overlap([a, a[:1]]) is None


def test_negative_settle_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        concurrency_main(["--settle-s", "-1"])
    assert e.value.code == 2 and "--settle-s must be >= 0" in capsys.readouterr().err
