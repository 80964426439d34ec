"""Clip readers and the group split."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.data import ClipInfo, PairSampler, center_square, load_clips, read_clip, split_by_group


def test_png_stack_is_split_into_frames(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), np.concatenate(list(frames), axis=1)[..., ::-1])
    out = read_clip(tmp_path / "c.png")
    assert out.shape == (4, 16, 16, 3) and np.array_equal(out, frames)


def test_mp4_reads(demo_clip: Path) -> None:
    out = read_clip(demo_clip, max_frames=5)
    assert out.shape == (5, 256, 256, 3) and out.dtype == np.uint8


def test_missing_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_clip(tmp_path / "nope.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"junk")
    with pytest.raises(ValueError):
        read_clip(tmp_path / "bad.mp4")


def test_center_square() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 50:150] = 255
    out = center_square(img, 50)
    assert out.shape == (50, 50, 3) and out.min() == 255


def test_split_by_group_never_shares_a_source_video() -> None:
    clips = [ClipInfo(Path(f"{g}_{i}.mp4"), kind, "mp4", f"{kind}/{g}") for kind in ("face", "body")
             for g in range(20) for i in range(3)]
    train, val = split_by_group(clips, 0.15)
    assert {c.group for c in train}.isdisjoint({c.group for c in val})
    assert len(train) + len(val) == len(clips)
    for kind in ("face", "body"):
        assert len({c.group for c in val if c.kind == kind}) == 3
    assert split_by_group(clips, 0.15) == (train, val)  # deterministic


def test_folder_without_manifest(tmp_path: Path, demo_clip: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(demo_clip.read_bytes())
    clips = load_clips(tmp_path)
    assert [c.group for c in clips] == ["a/x"]


def test_pair_sampler_keeps_pairs_from_one_clip() -> None:
    a = np.zeros((5, 8, 8, 3), np.uint8)
    b = np.full((5, 8, 8, 3), 255, np.uint8)
    s = PairSampler([a, b], augment=False)
    src, drv = s.sample(16)
    assert src.shape == (16, 3, 8, 8)
    assert np.array_equal(src.mean(axis=(1, 2, 3)), drv.mean(axis=(1, 2, 3)))


def test_split_keeps_every_take_of_one_actor_on_one_side() -> None:
    # MEAD takes: one actor, many source videos (groups); they must not straddle the split
    clips = [ClipInfo(Path(f"{a}_{e}.mp4"), "face", "mp4", f"mead/{a}_front_{e}_001")
             for a in ("M030", "W009", "W011", "M003") for e in ("angry", "happy", "sad")]
    clips += [ClipInfo(Path(f"v{g}.mp4"), "face", "mp4", f"other/v{g}") for g in range(20)]
    train, val = split_by_group(clips, 0.15)
    assert {c.person for c in train}.isdisjoint({c.person for c in val})
    assert clips[0].person == "mead/M030" and clips[-1].person == "other/v19"
    assert len({c.person for c in val}) == 4  # ceil(0.15 * 24 persons)
