"""sender.pacing: the frame rate a sender can hold, measured before the call, lowered on purpose."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from sender.capture import CaptureConfig, FrameSource
from sender.pacing import LateFrames, PacingConfig, announceable_stride, choose_stride, measure_work_ms
from shared import protocol as P


def test_choose_stride_keeps_the_asked_rate_when_it_fits_and_the_smallest_stride_that_does() -> None:
    assert choose_stride(30.0, 10.0) == 1
    assert choose_stride(30.0, 26.0) == 1  # under 80 % of 33.3 ms
    assert choose_stride(30.0, 30.0) == 2  # over 26.7 ms, under 2 x 26.7
    assert choose_stride(30.0, 60.0) == 3
    assert choose_stride(30.0, 500.0) == 4  # never below a quarter of the asked rate
    assert choose_stride(30.0, 500.0, PacingConfig(max_stride=2)) == 2
    assert choose_stride(15.0, 30.0) == 1
    with pytest.raises(ValueError):
        choose_stride(0.0, 1.0)
    with pytest.raises(ValueError):
        PacingConfig(share=0.0)


def test_the_stride_keeps_the_announced_rate_within_what_a_receiver_accepts() -> None:
    assert announceable_stride(30.0) == 1 and announceable_stride(60.0) == 1
    assert announceable_stride(120.0) == 2  # a 120 fps file goes out at 60
    assert announceable_stride(100.0) == 2 and announceable_stride(61.0) == 2
    assert announceable_stride(120.0, 3) == 3  # pacing asked for more thinning: kept
    assert announceable_stride(2.0, 4) == 2  # never under 1 fps, whatever pacing asks
    assert announceable_stride(1.0, 4) == 1
    for fps in (1.0, 7.0, 29.97, 60.0, 61.0, 119.88, 120.0):
        for stride in (1, 2, 3, 4):
            assert P.MIN_FPS <= fps / announceable_stride(fps, stride) <= P.MAX_FPS, (fps, stride)


def test_measure_work_ms_is_the_median_of_real_runs() -> None:
    calls = []

    def work(image: np.ndarray) -> None:
        calls.append(image.shape)
        time.sleep(0.01)

    ms = measure_work_ms(work, np.zeros((8, 8, 3), np.uint8), rounds=3)
    assert len(calls) == 4  # one warm-up, three timed
    assert 9.5 <= ms < 1000


def test_a_stride_keeps_every_kth_frame_of_a_file_at_a_kth_of_the_rate(demo_clip: Path) -> None:
    cfg = CaptureConfig(video=str(demo_clip), size=64)
    full, thin = FrameSource(cfg), FrameSource(cfg)
    try:
        thin.set_stride(3)
        assert thin.fps == pytest.approx(full.fps / 3) and thin.asked_fps == full.fps
        every = [full.read() for _ in range(10)]
        kept = [thin.read() for _ in range(4)]
        for got, want in zip(kept, every[::3], strict=True):
            assert np.array_equal(got, want)
        with pytest.raises(ValueError):
            thin.set_stride(0)
    finally:
        full.close()
        thin.close()


def test_late_frames_are_counted_and_warned_about_at_most_every_few_seconds(caplog: pytest.LogCaptureFixture) -> None:
    late = LateFrames(30.0, every_s=5.0)
    with caplog.at_level(logging.WARNING, logger="sender.pacing"):
        late.observe(0.02, 0.0)  # within a period: not late
        late.observe(0.05, 1.0)
        late.observe(0.06, 2.0)
        late.observe(0.07, 7.0)
    assert late.count == 3
    assert len([r for r in caplog.records if "cannot hold 30.0 fps" in r.getMessage()]) == 2
