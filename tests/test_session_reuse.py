"""The clock playout shows a frame whose keypoints are those of the picture on screen without rendering it
again (``CallSession._reuse``): the same picture, on time, for no render."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.fuzz import make_session, tiny_detector_id
from shared import protocol as P
from tests.test_session_limits import _jpeg, _send_source

RENDER_S = 0.03  # a slow render (sleeping: no CPU, so a busy machine cannot blur the difference)
FPS = 10.0
FRAMES = 30


@pytest.fixture
async def executor() -> AsyncIterator[ThreadPoolExecutor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as test_session_early_render: a second OpenMP thread stalls on a busy machine
    ex = ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=True)
    torch.set_num_threads(threads)


async def test_a_frame_with_the_keypoints_on_screen_is_shown_without_a_render(executor: ThreadPoolExecutor,
                                                                            tmp_path: Path) -> None:
    log = tmp_path / "frames.npz"
    s = make_session(executor, playout="clock", max_delay_ms=1000.0, frames_log=str(log))
    job = s.renderer.job
    renders: list[np.ndarray] = []

    def slow(frame: np.ndarray) -> np.ndarray:
        time.sleep(RENDER_S)
        renders.append(frame)
        return frame

    s.renderer.job = lambda vector: job(vector).then(slow)
    pictures: list[np.ndarray] = []
    s.on_frame = pictures.append
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, FPS)))
    await _send_source(s, _jpeg(64, 64))
    s.start()
    t0, wall0 = time.monotonic(), time.time_ns() // 1000
    for seq in range(FRAMES):  # the face holds still for two frames at a time
        await asyncio.sleep(max(0.0, t0 + seq / FPS - time.monotonic()))
        vec = np.array([0.02 * (seq // 2), -0.1] * 10 + [1.0, 0.0, 0.0, 1.0] * 10, np.float32)
        s.on_message("kp", P.encode(P.KeypointBatch.build(seq, wall0 + int(seq * 1e6 / FPS), [vec])))
    await asyncio.sleep(0.3)
    stats = s.stats.to_dict()
    await s.close("done")
    with np.load(log) as f:
        cols = {k: f[k] for k in f.files}
    shown = ~cols["repeated"]
    reused = cols["reused"] & shown
    # every new frame shown, about half of them without a render
    assert stats["frames_rendered"] == shown.sum() >= FRAMES - 3
    assert stats["frames_reused"] == reused.sum() >= FRAMES // 2 - 3
    assert len(renders) == stats["frames_rendered"] - stats["frames_reused"]
    # a reused frame shows the keypoints of the frame before it, and the same picture
    idx = np.flatnonzero(reused)
    assert all(i > 0 and np.array_equal(cols["vector"][i], cols["vector"][i - 1]) for i in idx)
    assert all(cols["render_ms"][i] == 0 for i in idx)
    # the frames the sink got: one per frame shown, each a reused one the same object as the one before
    assert len(pictures) == len(cols["seq"])
    assert all(pictures[i] is pictures[i - 1] for i in idx)
    # and no frame of a new pose was reused: of those shown as they arrived (one that came after its time is
    # concealed, as the last pose with the default forecaster, and is then rightly reused; a busy core did that)
    real = cols["kinds"][cols["kind"]] == "real"
    moved = np.flatnonzero(shown & real & (cols["seq"] % 2 == 0) & (cols["seq"] > 0) & (cols["seq"] < FRAMES))
    assert len(moved) >= FRAMES // 4
    assert not reused[moved].any()
    assert len(stats["rejected_by_reason"]) == 0


async def test_a_new_image_or_tier_ends_the_reuse_even_of_a_render_under_way(executor: ThreadPoolExecutor) -> None:
    s = make_session(executor, playout="clock", max_delay_ms=1000.0)
    job = s.renderer.job
    s.renderer.job = lambda vector: job(vector).then(lambda f: (time.sleep(RENDER_S), f)[1])
    s.on_message("control", P.encode(P.Hello(tiny_detector_id(), 64, FPS)))
    await _send_source(s, _jpeg(64, 64))
    vec = np.array([0.1, -0.1] * 10 + [1.0, 0.0, 0.0, 1.0] * 10, np.float32)
    await s._render(1, 0, vec)
    assert s._shows(vec)  # rendered: the next frame with these keypoints may reuse the picture
    s._new_picture()  # e.g. a tier switch
    assert not s._shows(vec)
    # a switch while a render is under way: that render's picture is the old renderer's, so it is not reused
    switch = asyncio.get_running_loop().call_later(RENDER_S / 3, s._new_picture)
    await s._render(2, 0, vec)
    switch.cancel()
    assert s._last_image is not None and not s._shows(vec)
    await s._render(3, 0, vec)
    assert s._shows(vec)
    await s.close("done")
