"""Checkpoint files: round trip, and a clear CheckpointError for every way a file can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from models.fomm import FommConfig, MotionModel
from models.fomm.io import load_motion_model, save_motion_model


def test_round_trip_keeps_weights_and_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = MotionModel(FommConfig.tiny(64))
    save_motion_model(tmp_path / "m.pt", m, {"step": 3}, half=False)
    m2, meta = load_motion_model(tmp_path / "m.pt")
    assert meta["step"] == 3 and m2.config == m.config
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=False):
        assert torch.equal(a, b), k


def test_half_precision_file_is_smaller_and_close(tmp_path: Path) -> None:
    m = MotionModel(FommConfig.tiny(64))
    full = save_motion_model(tmp_path / "f.pt", m, half=False)
    half = save_motion_model(tmp_path / "h.pt", m, half=True)
    assert half < 0.6 * full
    m2, _ = load_motion_model(tmp_path / "h.pt")
    w = "generator.final.weight"
    assert torch.allclose(m.state_dict()[w], m2.state_dict()[w], atol=1e-3)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_motion_model(tmp_path / "nope.pt")


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"PK\x03\x04" + b"\x00" * 100])
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_motion_model(p)


def test_truncated_file(tmp_path: Path) -> None:
    save_motion_model(tmp_path / "m.pt", MotionModel(FommConfig.tiny(64)))
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_motion_model(tmp_path / "t.pt")


def test_not_a_kpcast_checkpoint(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a kpcast checkpoint"):
        load_motion_model(tmp_path / "other.pt")


def test_wrong_kind(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "g.pt", torch.nn.Linear(2, 2), "gru", {})
    with pytest.raises(CheckpointError, match="'gru' model"):
        load_motion_model(tmp_path / "g.pt")


def test_shape_mismatch(tmp_path: Path) -> None:
    m = MotionModel(FommConfig.tiny(64))
    save_motion_model(tmp_path / "m.pt", m)
    blob = read_checkpoint(tmp_path / "m.pt")
    blob["state_dict"]["generator.final.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(blob, tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="shape"):
        load_motion_model(tmp_path / "s.pt")


def test_nan_weights_refused(tmp_path: Path) -> None:
    m = MotionModel(FommConfig.tiny(64))
    with torch.no_grad():
        m.generator.final.weight.fill_(float("nan"))
    save_motion_model(tmp_path / "n.pt", m)
    with pytest.raises(CheckpointError, match="NaN"):
        load_motion_model(tmp_path / "n.pt")


def test_bad_config(tmp_path: Path) -> None:
    m = MotionModel(FommConfig.tiny(64))
    save_checkpoint(tmp_path / "c.pt", m, "fomm", {**m.config.to_dict(), "size": 99})
    with pytest.raises(CheckpointError, match="config"):
        load_motion_model(tmp_path / "c.pt")
