"""Receiver hardening with real processes: concurrent calls, dead peers, HTTP limits, shutdown, port in use."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest

from tests.harness import ROOT, free_port, wait_for
from tests.live import active_calls, get, kill, post, start_sender
from tests.procs import env, start_receiver, stop

pytestmark = pytest.mark.call  # real receiver and sender processes


def _receiver(tmp: Path, weights: Path, port: int, *extra: str) -> subprocess.Popen:
    return start_receiver(["--port", str(port), "--weights", str(weights), *extra], log_path=tmp / "receiver.log")


def _log(tmp: Path) -> str:
    return (tmp / "receiver.log").read_text()[-3000:]


def test_concurrent_calls_each_get_a_session_and_a_fourth_is_refused(tmp_path: Path, tiny_weights: Path,
                                                                       demo_clip: Path) -> None:
    port = free_port()
    recv = _receiver(tmp_path, tiny_weights, port, "--max-calls", "3", "--playout", "immediate",
                     "--stats-dir", str(tmp_path), "--stop-after-calls", "3")
    senders = [start_sender(port, tiny_weights, demo_clip, log_path=tmp_path / f"sender_{i}.log") for i in range(3)]
    try:
        calls = wait_for(lambda: (c := active_calls(port)) and len(c) == 3 and all(x["frames_rendered"] > 5 for x in c)
                         and c, 50, "three calls rendering at once")
        assert len({c["call_id"] for c in calls}) == 3
        # each call keeps its own counters moving
        # (polled: one call's counter stood still for 1 s in a fresh-clone suite while its sender was busy)
        before = {c["call_id"]: c["frames_received"] for c in calls}
        moved = wait_for(lambda: (a := {c["call_id"]: c["frames_received"] for c in active_calls(port)})
                         and all(a.get(k, 0) > before[k] for k in before) and a, 20, "every call's counter moving")
        assert all(moved[k] > before[k] for k in before), (before, moved)
        # a fourth offer is refused before its body is even parsed
        assert post(f"http://127.0.0.1:{port}/offer", b'{"sdp": "v=0", "type": "offer"}') == 503
    finally:
        for s in senders:
            s.send_signal(signal.SIGINT)  # the sender hangs up politely (Bye)
        for s in senders:
            try:
                s.wait(20)
            except subprocess.TimeoutExpired:
                kill(s)
        assert stop(recv, 30) == 0, _log(tmp_path)
    stats = [json.loads((tmp_path / f"call_{i}.json").read_text()) for i in (1, 2, 3)]
    assert len({s["call_id"] for s in stats}) == 3
    for s in stats:
        assert s["frames_received"] > 5 and s["frames_rendered"] > 5 and s["frames_rejected"] == 0, s
        # each ended on its own sender's hang-up (Bye, or the DTLS close that follows it), not a timeout
        assert s["end_reason"].startswith("bye") or s["end_reason"] == "connection closed", s["end_reason"]
    assert len({s["source_sha256"] for s in stats}) == 1  # same clip, same first frame, separate sessions


def test_killed_sender_is_detected_and_its_session_freed_by_the_heartbeat_watch(tmp_path: Path, tiny_weights: Path,
                                                                     demo_clip: Path) -> None:
    # the watch gives up on a silent peer after SessionConfig.heartbeat_timeout_s (1.5 s; aiortc alone would
    # take ~30 s): freed within 2 s on a quiet machine; 3 s leaves room for a busy one (2.003 s was seen)
    port = free_port()
    recv = _receiver(tmp_path, tiny_weights, port)
    sender = start_sender(port, tiny_weights, demo_clip)
    try:
        wait_for(lambda: any(c["frames_rendered"] > 5 for c in active_calls(port)), 40, "the call to render")
        sender.send_signal(signal.SIGKILL)  # no Bye, no DTLS close: the peer just vanishes
        t0 = time.monotonic()
        wait_for(lambda: get(f"http://127.0.0.1:{port}/health")[1]["calls"] == 0, 5, "the session to be freed",
                 interval_s=0.05)
        elapsed = time.monotonic() - t0
        print(f"dead sender's session freed after {elapsed:.2f}s")
        assert elapsed <= 3.0, f"dead peer took {elapsed:.2f}s to free"
        finished = get(f"http://127.0.0.1:{port}/stats")[1]["finished"]
        assert [f["end_reason"] for f in finished] == ["peer timeout"]
        # the receiver is still healthy and takes the next call
        sender = start_sender(port, tiny_weights, demo_clip)
        wait_for(lambda: any(c["frames_rendered"] > 0 for c in active_calls(port)), 40, "a second call")
    finally:
        kill(sender)
        recv.terminate()
        assert stop(recv) == 0, _log(tmp_path)


def test_http_limits_reject_bad_requests(tmp_path: Path, tiny_weights: Path) -> None:
    port = free_port()
    recv = _receiver(tmp_path, tiny_weights, port, "--token", "tok")
    url = f"http://127.0.0.1:{port}/offer"
    auth = {"Authorization": "Bearer tok"}
    try:
        assert post(url, b'{"sdp": "v=0", "type": "offer"}', {"Authorization": "Bearer wrong"}) == 401
        assert post(url, b'{"sdp": "v=0", "type": "offer"}') == 401  # no token at all
        assert post(url, b"{not json", auth) == 400
        assert post(url, b'["a list"]', auth) == 400
        assert post(url, b'{"sdp": "hello", "type": "offer"}', auth) == 400  # not SDP
        assert post(url, b'{"sdp": "v=0\\r\\n", "type": "answer"}', auth) == 400  # wrong type
        big = json.dumps({"sdp": "v=0" + "a" * 200_000, "type": "offer"}).encode()
        assert post(url, big, auth) == 413
        assert get(f"http://127.0.0.1:{port}/stats")[0] == 401
        assert get(f"http://127.0.0.1:{port}/health") == (200, {"ok": True, "calls": 0})
        assert recv.poll() is None  # none of that hurt the receiver
    finally:
        recv.terminate()
        assert stop(recv) == 0, _log(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_shuts_down_gracefully_and_finalises_the_video(tmp_path: Path, tiny_weights: Path,
                                                              demo_clip: Path, sig: signal.Signals) -> None:
    port = free_port()
    out = tmp_path / "call.mp4"
    recv = _receiver(tmp_path, tiny_weights, port, "--sink", f"file:{out}", "--stats-dir", str(tmp_path))
    sender = start_sender(port, tiny_weights, demo_clip)
    try:
        wait_for(lambda: any(c["frames_rendered"] > 20 for c in active_calls(port)), 40, "20 rendered frames")
        recv.send_signal(sig)
        assert recv.wait(20) == 0, _log(tmp_path)
    finally:
        kill(sender)
        if recv.poll() is None:
            kill(recv)
    stats = json.loads((tmp_path / "call_1.json").read_text())
    assert stats["end_reason"] == "receiver shutting down"
    seqs = json.loads(Path(str(out) + ".seq.json").read_text())
    with av.open(str(out)) as c:  # a killed muxer leaves an mp4 without its index: this would raise
        n = sum(1 for _ in c.decode(video=0))
    assert n == len(seqs) == stats["frames_rendered"] + stats["frames_repeated"] > 20


def test_port_in_use_is_a_clear_error(tiny_weights: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "receiver", "--port", str(port), "--weights", str(tiny_weights)],
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr
