"""bench.concurrency: several real calls on one receiver, each with its own stats; and keypoint replay errors."""

from __future__ import annotations

import json
from pathlib import Path

from bench.concurrency import main as concurrency_main
from tests.procs import sender_main


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
