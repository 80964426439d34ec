"""Source refresh at the sender (sender.refresh): when it triggers, when it must not, and the bench."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from sender.refresh import RefreshConfig, RefreshMonitor, RenderEstimate, keypoint_distance


def _vec(dx: float) -> np.ndarray:
    v = np.array([0.1, -0.2] * 10 + [1.0, 0.0, 0.0, 1.0] * 10, np.float32)
    v[:20] += dx
    return v


def _frame(level: int) -> np.ndarray:
    return np.full((64, 64, 3), level, np.uint8)


class FakeEstimate:
    """Stands in for the 64x64 render: the SSIM it reports is whatever the test says."""

    def __init__(self) -> None:
        self.value = 0.9
        self.sources = 0
        self.threads: set[int] = set()

    def set_source(self, image: np.ndarray) -> None:
        self.sources += 1

    def __call__(self, frame: np.ndarray, vec: np.ndarray) -> float:
        self.threads.add(threading.get_ident())
        return self.value


def _render_monitor(**kw) -> tuple[RefreshMonitor, FakeEstimate]:
    kw = {"drop": 0.015, "urgent_drop": 0.06, **kw}  # the thresholds these tests are written for
    mon = RefreshMonitor(RefreshConfig(mode="keypoints", threaded=False, **kw))
    fake = FakeEstimate()
    mon.config.mode = "render"  # same decisions as the render mode, without loading a model
    mon._render = fake
    return mon, fake


def _run(mon: RefreshMonitor, seconds: float, fps: float = 10, t0: float = 0.0, dx: float = 0.0) -> list[float]:
    """Feed frames for ``seconds``; returns the times at which a refresh was due (and sends it, as the sender)."""
    fired = []
    for i in range(int(seconds * fps)):
        t = t0 + i / fps
        if mon.observe(_frame(100), _vec(dx), t):
            fired.append(t)
            mon.source_sent(_frame(100), None, t + 1 / fps)
    return fired


def test_render_estimate_drop_triggers_one_refresh_then_waits_the_minimum_interval() -> None:
    mon, fake = _render_monitor(min_interval_s=5.0, reference_s=4.0, window=2, check_every_s=1.0)
    mon.source_sent(_frame(100), None, 0.0)
    assert _run(mon, 6.0) == []  # steady quality: nothing to do
    assert mon.reference == pytest.approx(0.9)
    fake.value = 0.86  # 0.04 below the reference: the picture drifted
    fired = _run(mon, 14.0, t0=6.0)
    assert fired[0] <= 7.0  # within two checks of the drop
    # still bad after each refresh: again, but never before the minimum interval
    assert len(fired) == 3 and all(b - a >= 5.0 for a, b in zip(fired, fired[1:], strict=False))
    assert mon.refreshes == 3 and mon.stats()["refreshes"] == 3 and fake.sources == 4


def test_a_small_dip_or_one_bad_check_does_not_refresh() -> None:
    mon, fake = _render_monitor(min_interval_s=1.0, reference_s=3.0, window=3, check_every_s=1.0)
    mon.source_sent(_frame(100), None, 0.0)
    _run(mon, 4.0)
    fake.value = 0.89  # within the allowed drop
    assert _run(mon, 5.0, t0=4.0) == []
    fake.value = 0.5
    assert not mon.observe(_frame(100), _vec(0), 9.0)  # a single bad check: the median of three ignores it
    fake.value = 0.9
    assert _run(mon, 3.0, t0=9.5) == []


def test_keypoint_distance_triggers_refresh() -> None:
    mon = RefreshMonitor(RefreshConfig(mode="keypoints", threaded=False, kp_threshold=0.1, min_interval_s=2.0))
    mon.source_sent(_frame(100), None, 0.0)
    assert _run(mon, 3.0, dx=0.0) == []  # the first frame after the source sets the source's keypoints
    assert keypoint_distance(_vec(0), _vec(0.2)) == pytest.approx(0.2 * 2 ** 0.5, rel=1e-5)
    fired = _run(mon, 6.0, t0=3.0, dx=0.2)  # moved: ~0.28 away (but the new source's keypoints are the moved ones)
    assert len(fired) == 1


def test_off_and_before_the_first_source_never_refresh() -> None:
    off = RefreshMonitor(RefreshConfig(mode="off"))
    assert _run(off, 20.0, dx=0.5) == [] and off.stats()["refresh_checks"] == 0
    mon = RefreshMonitor(RefreshConfig(mode="keypoints", threaded=False, min_interval_s=0.1))
    assert not mon.observe(_frame(1), _vec(0.9), 100.0)  # no source image sent yet
    with pytest.raises(ValueError):
        RefreshMonitor(RefreshConfig(mode="sometimes"))


class SlowEstimate(FakeEstimate):
    """An estimate that takes as long as the test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.started = threading.Event()

    def __call__(self, frame: np.ndarray, vec: np.ndarray) -> float:
        self.started.set()
        self.gate.wait(10)
        return super().__call__(frame, vec)


def test_checks_run_off_the_calling_thread_and_never_block() -> None:
    mon = RefreshMonitor(RefreshConfig(mode="keypoints", threaded=True, min_interval_s=1.0, reference_s=2.0))
    slow = SlowEstimate()
    mon.config.mode, mon._render = "render", slow
    mon.source_sent(_frame(100), None, 0.0)
    for i in range(30):  # the estimate is stuck: frames keep flowing, one check in flight at a time
        assert mon.observe(_frame(100), _vec(0), i * 0.1) is False
    assert mon.checks == 1 and slow.started.wait(10)
    slow.gate.set()
    mon.close()
    assert slow.threads and threading.get_ident() not in slow.threads


def test_render_estimate_scores_the_receivers_picture(tiny_weights: Path) -> None:
    from models.fomm.io import load_motion_model

    model, _ = load_motion_model(tiny_weights)
    est = RenderEstimate(model)
    rng = np.random.default_rng(0)
    src = (rng.random((256, 256, 3)) * 255).astype(np.uint8)
    est.set_source(src)
    import torch

    with torch.no_grad():
        vec = model.keypoints(torch.from_numpy(np.ascontiguousarray(src[::4, ::4])).permute(2, 0, 1)[None].float()
                              / 255)[0].numpy()
    same, other = est(src, vec), est(255 - src, vec)
    assert -1.0 <= other < same <= 1.0  # the picture it rebuilds is closer to its own source than to another
    # it renders as the receiver does (the CPU render graph), to eager PyTorch's values (no int8 ranges
    # ship for these weights: float32)
    assert est._graph is not None and not est._graph.int8
    eager = RenderEstimate.__new__(RenderEstimate)
    eager.model, eager._cache, eager._graph = model, None, None
    eager.set_source(src)
    assert eager(src, vec) == pytest.approx(same, abs=1e-3)


def test_bench_refresh_runs_on_the_bundled_clip(tmp_path: Path) -> None:
    from bench import refresh

    res = refresh.main(["--data", "assets", "--group", "demo_face", "--max-frames", "40", "--no-mouth",
                        "--modes", "off", "render", "per_chunk", "--json", str(tmp_path / "r.json"),
                        "--png", str(tmp_path / "r.png")])
    rows = {r["mode"]: r for r in res["rows"]}
    assert res["frames"] == 40 and len(res["clips"]) == 1
    assert rows["off"]["refreshes"] == 0 == rows["per_chunk"]["refreshes"]  # one chunk: nothing to re-take
    assert rows["render"]["estimates"] and 0 < rows["render"]["ssim_mean"] <= 1
    off = rows["off"]
    assert off["drop_below_first"] == pytest.approx(off["ssim_first"] - off["ssim_worst_window"])
    assert (tmp_path / "r.png").stat().st_size > 0
    assert json.loads((tmp_path / "r.json").read_text())["group"] == "demo_face"


def test_a_plainly_wrong_picture_is_refreshed_without_waiting_the_whole_interval() -> None:
    mon, fake = _render_monitor(min_interval_s=5.0, reference_s=3.0, window=2, urgent_interval_s=1.5,
                                check_every_s=1.0)
    mon.source_sent(_frame(100), None, 0.0)
    _run(mon, 4.0)
    fake.value = 0.87  # a mild drop: refreshed, then not again for 5 s
    fired = _run(mon, 2.0, t0=4.0)
    assert len(fired) == 1
    fake.value = 0.7  # the camera moved right after that refresh: again within ~3 s, not 5 s
    more = _run(mon, 3.0, t0=6.0)
    assert more and more[0] - fired[0] < 4.0
