"""bench.two_way: a real two-way call between two namespaces, reported per direction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import two_way
from tests.utils import needs_netns

pytestmark = pytest.mark.call


@needs_netns
def test_both_directions_reported(tmp_path: Path, tiny_weights: Path, capsys) -> None:
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    rc = two_way.main(["--frames", "20", "--fps", "10", "--weights", str(tiny_weights), "--codec", "q8",
                       "--workdir", str(tmp_path / "work"), "--json", str(out), "--png", str(png),
                       "--views", str(tmp_path / "views.jpg")])
    res = json.loads(out.read_text())
    assert rc == 0 and res["exit_codes"] == {"listener": 0, "connector": 0}
    rows = {r["direction"]: r for r in res["directions"]}
    assert set(rows) == {"listener -> connector", "connector -> listener"}
    for r in rows.values():
        # each side showed the other's face (a loaded machine shows fewer: half of what was sent is the bar)
        assert r["source_match"] and r["shown"] >= 0.5 * r["frames_sent"] > 0, r
        assert r["kbps"] > 0 and r["latency_ms_p50"] > 0
        assert isinstance(r["stalls_over_200ms"], int) and r["stalls_over_200ms"] >= 0  # the frames logs were written
    assert png.stat().st_size > 5000 and "listener -> connector" in capsys.readouterr().out
    # what each side saw: its window's picture (the other side large, itself small), one frame of each
    import cv2

    grab = cv2.imread(str(tmp_path / "views.jpg"))
    assert grab is not None and grab.shape[1] > grab.shape[0] and 20 < grab.mean() < 235
