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
        for way in render_speed.WAYS:
            assert r[f"fps_{way}"] > 0 and len(r[f"rounds_{way}"]) == 2
        assert r["int8_vs_whole"] > 0 and r["split_vs_whole"] > 0
    assert res["models"]["a"]["int8_vs_first"] == 1.0
    assert png.stat().st_size > 5000 and "int8 / whole" in capsys.readouterr().out

