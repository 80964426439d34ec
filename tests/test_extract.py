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
