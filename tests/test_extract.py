"""Sender keypoint extraction: any square capture size, detector input at its own size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from models.fomm import FommConfig, MotionModel
from sender.extract import KeypointExtractor


def test_any_square_size_gives_the_detectors_keypoints() -> None:
    torch.manual_seed(0)
    ex = KeypointExtractor(MotionModel(FommConfig.tiny(64)))
    big = cv2.resize((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8), (256, 256))
    small = cv2.resize(big, (64, 64), interpolation=cv2.INTER_AREA)
    v_big, v_small = ex(big), ex(small)
    assert v_big.shape == (60,) and v_big.dtype == np.float32
    np.testing.assert_array_equal(v_big, v_small)
    # a different picture gives different keypoints (the comparison above can fail)
    assert np.abs(ex(255 - big) - v_big).max() > 1e-4
    with pytest.raises(ValueError, match="square"):
        ex(np.zeros((64, 80, 3), np.uint8))


def test_onnx_runtime_extraction_matches_pytorch(demo_clip) -> None:
    from models.data import read_clip

    torch.manual_seed(1)
    model = MotionModel(FommConfig.tiny(64))
    fast, eager = KeypointExtractor(model, fast=True), KeypointExtractor(model, fast=False)
    assert fast.backend == "onnxruntime" and eager.backend == "torch"
    for f in read_clip(demo_clip, max_frames=4):
        np.testing.assert_allclose(fast(f), eager(f), atol=1e-4)


def test_export_command_checks_the_file(tmp_path, tiny_weights, capsys) -> None:
    import onnx

    from models.fomm.export import main

    out = tmp_path / "det.onnx"
    main(["--weights", str(tiny_weights), "--out", str(out)])
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["frame"] and [o.name for o in model.graph.output] == ["keypoints"]
    diff = float(capsys.readouterr().out.rsplit(":", 1)[1])
    assert diff < 1e-4


def test_extraction_falls_back_to_pytorch_when_export_fails(monkeypatch) -> None:
    import sender.extract as ex_mod

    def broken(_model):
        raise RuntimeError("no exporter here")

    monkeypatch.setattr(ex_mod, "detector_onnx", broken)
    ex = KeypointExtractor(MotionModel(FommConfig.tiny(64)), fast=True)
    assert ex.backend == "torch" and ex(np.zeros((64, 64, 3), np.uint8)).shape == (60,)


def test_detector_graph_is_cached_and_reused(tmp_path, monkeypatch, demo_clip) -> None:
    import sender.extract as ex_mod
    from models.data import read_clip
    from models.fomm.io import detector_id

    torch.manual_seed(2)
    model = MotionModel(FommConfig.tiny(64))
    first = KeypointExtractor(model, cache_dir=tmp_path)
    (path,) = tmp_path.glob("detector-*.onnx")
    assert path.name.startswith(f"detector-{detector_id(model)}-")  # the browser page serves it by that id

    def no_export(_model):
        raise AssertionError("exported again despite the cache")

    monkeypatch.setattr(ex_mod, "detector_onnx", no_export)
    second = KeypointExtractor(model, cache_dir=tmp_path)
    eager = KeypointExtractor(model, fast=False)
    assert first.backend == second.backend == "onnxruntime"
    for f in read_clip(demo_clip, max_frames=2):
        np.testing.assert_allclose(second(f), eager(f), atol=1e-4)


def test_damaged_or_unwritable_cache_still_extracts_with_onnx(tmp_path) -> None:
    from models.fomm.export import detector_cache_path

    torch.manual_seed(3)
    model = MotionModel(FommConfig.tiny(64))
    detector_cache_path(model, tmp_path).write_bytes(b"half a file")
    assert KeypointExtractor(model, cache_dir=tmp_path).backend == "onnxruntime"  # exported afresh
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("a file where the cache directory would be")
    assert KeypointExtractor(model, cache_dir=blocked).backend == "onnxruntime"
