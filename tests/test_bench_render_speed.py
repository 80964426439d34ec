"""bench.render_speed: models timed side by side in one run."""

from __future__ import annotations

import json
from pathlib import Path

from bench import render_speed


def test_two_models_side_by_side(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    render_speed.main(["--weights", str(tiny_weights), str(tiny_weights), "--labels", "a", "b", "--rounds", "2",
                       "--frames", "3", "--json", str(out), "--png", str(png)])
    res = json.loads(out.read_text())
    assert set(res["models"]) == {"a", "b"}
    for r in res["models"].values():
        assert r["fps_onnx"] > 0 and r["fps_eager"] > 0 and len(r["rounds_onnx"]) == 2
    assert res["models"]["a"]["onnx_vs_first"] == 1.0
    assert png.stat().st_size > 5000 and "fps ONNX RT" in capsys.readouterr().out
