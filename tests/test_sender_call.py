"""The sender's call (sender.call): its stats record and the keypoint-file replay input."""

from pathlib import Path

import numpy as np
import pytest

from sender.call import SenderStats, load_replay
from sender.capture import CaptureError


def test_stats_dict_flattens_the_stages_and_summarises_extraction() -> None:
    st = SenderStats(frames_captured=3, extract_ms=[10.0, 20.0, 30.0])
    st.parts.update({"framing_changes": 2, "kp_messages": 7})
    d = st.to_dict()
    assert d["frames_captured"] == 3 and d["framing_changes"] == 2 and d["kp_messages"] == 7
    assert d["extract_ms_p50"] == pytest.approx(20.0) and d["extract_ms_p95"] == pytest.approx(29.0)
    assert "extract_ms" not in d and "parts" not in d
    assert "source_sha256" not in d  # no image sent: no digest to compare
    st.source_sha256 = "ab"
    assert st.to_dict()["source_sha256"] == "ab"


def test_stats_of_a_call_that_extracted_nothing() -> None:
    d = SenderStats().to_dict()
    assert d["extract_ms_p50"] == 0.0 and d["frames_sent"] == 0


def test_replay_file_must_hold_keypoint_vectors(tmp_path: Path) -> None:
    good = tmp_path / "truth.npz"
    np.savez(good, vectors=np.zeros((5, 60)))
    assert load_replay(str(good)).shape == (5, 60) and load_replay(str(good)).dtype == np.float32
    bad = tmp_path / "bad.npz"
    np.savez(bad, vectors=np.zeros((5, 59)))
    with pytest.raises(CaptureError, match="keypoint vectors"):
        load_replay(str(bad))
    with pytest.raises(CaptureError, match="cannot read"):
        load_replay(str(tmp_path / "missing.npz"))


def _clip(path: Path, fps: float, frames: int) -> Path:
    """A tiny 64x64 MJPG file of ``frames`` grey frames at ``fps``."""
    import cv2

    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 64))
    for i in range(frames):
        out.write(np.full((64, 64, 3), 10 * i, np.uint8))
    out.release()
    return path


def test_a_file_faster_than_a_receiver_takes_is_thinned_to_60_fps(tmp_path: Path, tiny_weights: Path) -> None:
    """A Hello over 60 fps is refused (shared.protocol.MAX_FPS): a 120 fps file is sent at 60 fps."""

    from sender.call import SenderCall
    from sender.config import SenderConfig
    from shared import protocol as P

    clip = _clip(tmp_path / "fast.avi", 120.0, 12)
    call = SenderCall(SenderConfig(video=str(clip), weights=str(tiny_weights), size=64, pacing="off",
                                   framing="centre", refresh="off"))
    call.prepare()
    try:
        assert call.stats.fps_asked == 120.0
        assert call.source.fps == P.MAX_FPS and call.stats.fps_stride == 2
    finally:
        call.source.close()


def test_threads_reach_the_detectors_onnx_session(tmp_path: Path, tiny_weights: Path) -> None:
    """``--threads`` sets ONNX Runtime's intra-op threads of the extraction, not only torch's."""

    from sender.call import SenderCall
    from sender.config import SenderConfig

    clip = _clip(tmp_path / "clip.avi", 30.0, 4)
    for threads in (1, 2):
        call = SenderCall(SenderConfig(video=str(clip), weights=str(tiny_weights), size=64, pacing="off",
                                       framing="centre", refresh="off", threads=threads))
        call.prepare()
        try:
            assert call.extractor.backend == "onnxruntime"
            assert call.extractor.session.get_session_options().intra_op_num_threads == threads
        finally:
            call.source.close()


def test_nice_lowers_the_sending_workers_only(tmp_path: Path, tiny_weights: Path) -> None:
    """``SenderConfig.nice`` (kpcast call --send-nice): extraction and framing run below the caller."""
    import os
    import threading

    from sender.call import SenderCall
    from sender.config import SenderConfig

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = nice()
    clip = _clip(tmp_path / "clip.avi", 30.0, 4)
    call = SenderCall(SenderConfig(video=str(clip), weights=str(tiny_weights), size=64, pacing="off",
                                   framing="face", refresh="keypoints", nice=4))
    call.prepare()
    try:
        assert call.extract_pool.submit(nice).result() == min(19, base + 4)
        framer = call.source.framer
        if framer._pool is not None:  # dlib present: face framing has its worker
            assert framer._pool.submit(nice).result() == min(19, base + 4)
        assert nice() == base
    finally:
        call.source.close()
        call.extract_pool.shutdown()
