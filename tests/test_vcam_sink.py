"""Virtual-camera sink: wiring checked against a stand-in pyvirtualcam (no v4l2loopback device here)
in-process and in a real call; without pyvirtualcam the receiver refuses --sink vcam clearly."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from receiver.sinks import SinkError, VirtualCamSink, check_sink_spec, make_sink
from tests.harness import ROOT, free_port
from tests.procs import env, run_sender, stop

pytestmark = pytest.mark.call  # real receiver and sender processes

FAKE_PYVIRTUALCAM = '''
"""Stand-in for pyvirtualcam: records what a real virtual camera would have been sent."""
import json, os
import numpy as np

class Camera:
    def __init__(self, width, height, fps, device=None, **kw):
        self.width, self.height, self.fps, self.device = width, height, fps, device or "/dev/video-fake"
        self.frames, self.shapes, self.means = 0, set(), []

    def send(self, frame):
        assert frame.dtype == np.uint8 and frame.shape == (self.height, self.width, 3), frame.shape
        self.frames += 1
        self.means.append(float(frame.mean()))

    def close(self):
        out = os.environ.get("FAKE_VCAM_OUT")
        if out:
            with open(out, "w") as f:
                json.dump({"frames": self.frames, "fps": self.fps, "size": [self.width, self.height],
                           "distinct_means": len(set(self.means))}, f)
'''


@pytest.fixture
def fake_vcam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pyvirtualcam.py").write_text(FAKE_PYVIRTUALCAM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pyvirtualcam", raising=False)
    return tmp_path


def test_vcam_sink_sends_upscaled_rgb_frames(fake_vcam: Path) -> None:
    check_sink_spec("vcam")
    sink = make_sink("vcam:/dev/video7", 25.0, 64)
    assert isinstance(sink, VirtualCamSink) and sink.cam.device == "/dev/video7" and sink.cam.fps == 25.0
    for i in range(3):
        sink.write(np.full((64, 64, 3), 40 * i, np.uint8), i)
    assert sink.cam.frames == 3 and sink.cam.means == [0.0, 40.0, 80.0]
    sink.close()


def test_vcam_without_a_device_is_a_sink_error(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("pyvirtualcam")
    mod.__spec__ = importlib.machinery.ModuleSpec("pyvirtualcam", None)

    def no_device(**kw):
        raise RuntimeError("'v4l2loopback' backend: no device found")

    mod.Camera = no_device
    monkeypatch.setitem(sys.modules, "pyvirtualcam", mod)
    with pytest.raises(SinkError, match="modprobe v4l2loopback"):
        make_sink("vcam", 30.0, 64)


@pytest.mark.skipif(importlib.util.find_spec("pyvirtualcam") is not None, reason="pyvirtualcam is installed")
def test_receiver_refuses_vcam_without_pyvirtualcam(tiny_weights: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "receiver", "--sink", "vcam", "--weights", str(tiny_weights),
                          "--port", str(free_port())], cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    assert "pip install pyvirtualcam" in res.stderr


def test_call_renders_into_the_virtual_camera(fake_vcam: Path, tiny_weights: Path, demo_clip: Path) -> None:
    port = free_port()
    e = {**env(), "PYTHONPATH": f"{fake_vcam}:{ROOT}", "FAKE_VCAM_OUT": str(fake_vcam / "vcam.json")}
    recv = subprocess.Popen([sys.executable, "-m", "receiver", "--port", str(port), "--weights", str(tiny_weights),
                             "--sink", "vcam", "--stats-dir", str(fake_vcam), "--stop-after-calls", "1"],
                            cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "receiver ready" in recv.stdout.readline()
        res = run_sender(["--receiver", f"http://127.0.0.1:{port}", "--video", str(demo_clip), "--weights",
                          str(tiny_weights), "--max-frames", "30"])
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        assert stop(recv) == 0
    got = json.loads((fake_vcam / "call_1.json").read_text())
    cam = json.loads((fake_vcam / "vcam.json").read_text())
    assert cam["size"] == [512, 512] and cam["fps"] == got["hello"]["fps"]
    assert cam["frames"] == got["frames_rendered"] + got["frames_repeated"] > 10
    assert cam["distinct_means"] > 1
