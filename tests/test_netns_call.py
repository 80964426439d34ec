"""Real calls across network namespaces: a clean veth link, then a lossy, jittery one, and the
README's two-machine commands as written.

The receiver listens on its own veth address in host ``a``; the sender runs in host ``b``
and restricts ICE to its own address, so every packet crosses the (impaired) link. The README
call passes no ``--ice-address`` at all: the defaults must find the path by themselves.
Skipped only when namespaces cannot be built (not root, or ip/nft missing).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.netns import impaired_link, two_hosts
from bench.playout import kp_error
from tests.harness import ROOT, poll
from tests.procs import run_sender, start_receiver, stop
from tests.utils import needs_netns

pytestmark = [needs_netns, pytest.mark.call]  # real calls through network namespaces

PORT = 8080  # fresh namespaces: nothing else listens there
FPS = 30


def _sender_args(addr_a: str, addr_b: str, weights: Path, clip: Path, frames: int, tmp: Path) -> list[str]:
    # every frame as Q8: these tests count what the link delivered frame by frame (the predictive
    # default's own loss behaviour is tests/test_playout.py's and bench.playout's)
    return ["--receiver", f"http://{addr_a}:{PORT}", "--ice-address", addr_b, "--video", str(clip), "--loop",
            "--weights", str(weights), "--max-frames", str(frames), "--fps", str(FPS),
            "--stats-json", str(tmp / "sender.json"), "--codec", "q8"]


def test_call_between_two_namespaces(tmp_path: Path, tiny_weights: Path, demo_clip: Path) -> None:
    frames = 60
    t0 = time.monotonic()
    with two_hosts() as h:
        recv = start_receiver(["--host", h.addr_a, "--port", str(PORT), "--weights", str(tiny_weights),
                               "--playout", "clock", "--stats-dir", str(tmp_path), "--stop-after-calls", "1",
                               "--frames-log", str(tmp_path / "frames.npz")],
                              netns=h.a, log_path=tmp_path / "receiver.log")
        try:
            res = run_sender(_sender_args(h.addr_a, h.addr_b, tiny_weights, demo_clip, frames, tmp_path),
                             netns=h.b, timeout_s=45)
            assert res.returncode == 0, res.stderr[-2000:]
        finally:
            assert stop(recv) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    sent = json.loads((tmp_path / "sender.json").read_text())
    got = json.loads((tmp_path / "call_1.json").read_text())
    # the call really went over the veth pair, not loopback
    assert "10.77." in (tmp_path / "receiver.log").read_text()
    assert got["source_sha256"] and got["source_sha256"] == sent["source_sha256"]
    assert got["source_image_bytes"] == sent["source_image_bytes"]
    assert sent["frames_sent"] == frames
    assert got["frames_received"] >= 0.95 * frames
    # a clean link rejects nothing but late frames: a busy machine holds frames past their playout
    # time (4 of 60 in a loaded two-worker suite), which is this CPU's timing, not the link's. The
    # margin holds at half speed (the playout waits at most 40 ms, --max-delay-ms); a playout clock that
    # rejected every frame would still fail it.
    assert set(got["rejected_by_reason"]) <= {"late"} and got["frames_rejected"] <= 0.5 * frames
    # a clean link: what was received is exactly what was sent (bytes and messages)
    assert got["keypoint_payload_bytes"] == got["frames_received"] * 80
    assert got["keypoint_message_bytes"] <= sent["keypoint_message_bytes"]
    assert got["keypoint_messages"] <= sent["messages_sent"]
    _check_counts(got, tmp_path / "frames.npz")
    # the clock skips frames when this shared CPU renders slowly, so only a loose floor here; the
    # lossy test below holds rendering to the call's duration x fps (scaled by render capacity)
    assert got["frames_rendered"] >= 0.5 * frames
    assert got["end_reason"].startswith("bye")
    assert time.monotonic() - t0 < 60


def _readme_command(module: str, marker: str) -> list[str]:
    """The arguments of the README's ``.venv/bin/python -m MODULE ...`` line that contains ``marker``."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f".venv/bin/python -m {module} ") and marker in line:
            return shlex.split(line)[3:]
    raise AssertionError(f"README.md has no `python -m {module}` command with {marker}")


def _swap(args: list[str], option: str, replacement: list[str]) -> list[str]:
    """``args`` with ``option VALUE`` replaced (what this machine lacks: a webcam, a display)."""
    i = args.index(option)
    return args[:i] + replacement + args[i + 2:]


def test_readme_two_machine_commands(tmp_path: Path, tiny_weights: Path, demo_clip: Path) -> None:
    # Only what a CI machine lacks is swapped: the webcam for the clip, the window for a file.
    frames = 60
    recv_args = _readme_command("receiver", "--host 0.0.0.0")
    send_args = _readme_command("sender", "RECEIVER_IP")
    assert "--ice-address" not in recv_args + send_args
    recv_args = _swap(recv_args, "--sink", ["--sink", f"file:{tmp_path / 'call.mp4'}"])
    send_args = _swap(send_args, "--camera", ["--video", str(demo_clip), "--loop", "--max-frames", str(frames),
                                              "--fps", str(FPS)])
    with two_hosts() as h:
        port = int(recv_args[recv_args.index("--port") + 1])
        send_args = [a.replace("RECEIVER_IP", h.addr_a) for a in send_args]
        recv = start_receiver([*recv_args, "--weights", str(tiny_weights), "--stats-dir", str(tmp_path),
                               "--stop-after-calls", "1"], netns=h.a, log_path=tmp_path / "receiver.log")
        try:
            res = run_sender([*send_args, "--weights", str(tiny_weights),
                              "--stats-json", str(tmp_path / "sender.json")], netns=h.b, timeout_s=60)
            assert res.returncode == 0, res.stderr[-2000:]
        finally:
            assert stop(recv) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    assert port == PORT
    got = json.loads((tmp_path / "call_1.json").read_text())
    sent = json.loads((tmp_path / "sender.json").read_text())
    # the README's command: the default (predictive) stream, every frame sent or skipped and decoded
    assert sent["frames_sent"] + sent["frames_skipped"] == frames and got["frames_received"] >= 0.95 * frames
    assert got["source_sha256"] == sent["source_sha256"] and got["frames_rendered"] > 0
    assert got["end_reason"].startswith("bye") or got["end_reason"] == "connection closed", got["end_reason"]


def _check_counts(got: dict, frames_log: Path) -> dict[str, int]:
    """Every rendered frame is real, concealed or interpolated, in the stats and in the frames log."""
    log = np.load(frames_log)
    shown = ~log["repeated"]
    kinds = {k: int((log["kind"][shown] == i).sum()) for i, k in enumerate(log["kinds"])}
    assert shown.sum() == got["frames_rendered"]
    assert (~shown).sum() == got["frames_repeated"]
    assert kinds["concealed"] == got["frames_concealed"] and kinds["interpolated"] == got["frames_interpolated"]
    assert kinds["real"] + kinds["concealed"] + kinds["interpolated"] + kinds["predicted"] == got["frames_rendered"]
    # the playout also counts frames it produced before the source image was decoded (not rendered)
    pl = got["playout"]
    assert pl["real"] >= kinds["real"] and pl["new_frames"] >= got["frames_rendered"]
    assert pl["new_frames"] == pl["real"] + pl["concealed"] + pl["interpolated"] + pl["predicted"]
    return kinds


def _health(ns: str, addr: str) -> dict:
    from bench.netns import netns_exec

    code = ("import urllib.request; "
            f"print(urllib.request.urlopen('http://{addr}:{PORT}/health', timeout=5).read().decode())")
    return json.loads(netns_exec(ns, [sys.executable, "-c", code], timeout=20).stdout)


def test_call_through_impaired_link(tmp_path: Path, tiny_weights: Path, demo_clip: Path) -> None:
    frames = 150  # 5 s: ~15 lost keypoint messages at 10 % loss
    t0 = time.monotonic()
    with impaired_link(loss=0.1, delay_ms=40, jitter_ms=50, seed=1) as link:
        # no --stop-after-calls: the receiver must still be serving after the lossy call
        recv = start_receiver(["--host", link.addr_a, "--port", str(PORT), "--weights", str(tiny_weights),
                               "--playout", "clock", "--forecaster", "linear", "--stats-dir", str(tmp_path),
                               "--frames-log", str(tmp_path / "frames.npz"), "--setup-timeout", "60"],
                              netns=link.a, log_path=tmp_path / "receiver.log")
        try:
            # 60 s to connect, on both sides (the receiver's --setup-timeout above), as bench.playout
            # gives: with 10 % loss both ways the SCTP handshake and the data channels' opening
            # retransmit with backoff (loaded fresh-clone runs were through DTLS after 2-3 s and their
            # channels still not open 15 s after the offer, when first the sender, then the receiver
            # gave up)
            res = run_sender(_sender_args(link.addr_a, link.addr_b, tiny_weights, demo_clip, frames, tmp_path)
                             + ["--truth-out", str(tmp_path / "truth.npz"), "--connect-timeout", "60"],
                             netns=link.b, timeout_s=105)
            assert res.returncode == 0, res.stderr[-2000:]
            poll((tmp_path / "call_1.json").exists, 10)
            assert recv.poll() is None, "the receiver died during a lossy call"
            assert _health(link.a, link.addr_a)["ok"] is True
        finally:
            recv.terminate()
            assert stop(recv) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    sent = json.loads((tmp_path / "sender.json").read_text())
    got = json.loads((tmp_path / "call_1.json").read_text())
    assert sent["frames_sent"] == frames
    # A normal end. The sender tears its transport down ~0.1 s after queueing the Bye, so on a
    # lossy link the Bye may never be retransmitted: then the DTLS close ends the call, or, when
    # that is lost too, the receiver's liveness timeout. Any of the three, never an error.
    assert got["end_reason"] in ("bye: done", "connection closed", "peer timeout"), got["end_reason"]
    assert got["source_sha256"] == sent["source_sha256"]
    # the link really lost keypoints, and the playout filled the holes: concealment proper
    # (forecast) when the next frame had not arrived yet, interpolation when it had
    assert got["frames_received"] < frames
    assert got["frames_concealed"] + got["frames_interpolated"] > 0
    # call duration x fps = frames. The link is under test, not this shared 2-core CPU: when
    # rendering itself cannot keep up with the clock, the playout skips frames whatever the network
    # does, so the bar scales with the renderer's measured capacity (1 when it keeps up). On a busy
    # machine a CPU stall delays a burst of packets, and the playout's resync after it drops 15-30
    # of the 150 frames (seen in two fresh-clone runs with a core kept busy), once 74 (a third
    # fresh-clone run with a busy core: sender, receiver and the spinning core on two cores; the
    # median render time, the capacity above, does not see such stalls). So the bar is that the
    # playout goes on through the loss (a playout that waited on lost frames would show a handful),
    # at 40 % of the renderable frames; the rate itself is bench.playout's to measure.
    # Nor can any playout show the frames sent before the source image arrived: through 10 % loss
    # SCTP's retransmission backoff once took 11 s to deliver it (a loaded fresh-clone run), so the
    # bar counts from the first frame shown.
    log = np.load(tmp_path / "frames.npz")
    shown = ~log["repeated"]
    renderable = frames - int(log["seq"][shown].min())
    capacity = min(1.0, 1000.0 / (got["render_ms_p50"] * FPS))
    assert got["frames_rendered"] >= 0.4 * renderable * capacity, (got["frames_rendered"], renderable, capacity,
                                                                   got["playout"], sent["frames_late"],
                                                                   sent["extract_ms_p95"])
    _check_counts(got, tmp_path / "frames.npz")
    # the frames log lines up with the sender's truth: unblended real frames are the truth (8-bit codec)
    truth = np.load(tmp_path / "truth.npz")
    assert list(truth["seq"]) == list(range(frames))
    assert shown.sum() == got["frames_rendered"]
    real = shown & (log["kind"] == 0) & (log["blend"] == 0)
    # the playout waits at most 40 ms (--max-delay-ms): through 50 ms of jitter a quarter of the frames come
    # after their time and are concealed, and the 5 real frames after each concealment are blended, so few
    # real frames are unblended (12-25 of 150 seen): enough to check that they are the truth
    assert real.sum() >= 5
    err = kp_error(log["vector"][real], truth["vectors"][log["seq"][real]])
    assert err.max() < 1e-3
    assert time.monotonic() - t0 < 60
