"""STUN/TURN options (shared.ice_servers): parsing and checking, that they reach both ends'
RTCPeerConnection, and a real call relayed through a coturn server started by the test."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from shared.ice import restrict_host_addresses
from shared.ice_servers import (
    IceServerError,
    IceServerOptions,
    check_relay,
    ice_servers,
    rtc_configuration,
)
from tests.harness import ROOT, free_udp_port, poll, wait_for
from tests.procs import env, run_sender, start_receiver, stop

pytestmark = pytest.mark.call  # aiortc peers, coturn and a real relayed call

USER, PASSWORD = "kp", "s3cret"


@pytest.fixture(autouse=True)
def _restore_ice() -> Iterator[None]:
    yield
    restrict_host_addresses(None)


# --------------------------------------------------------------------------- parsing


def test_urls_and_credentials_are_parsed() -> None:
    servers = ice_servers(IceServerOptions(["stun:stun.example.org", "turn:turn.example.org:3479?transport=tcp"],
                                           username="u", credential="p"))
    assert [(s.urls, s.username, s.credential) for s in servers] == [
        ("stun:stun.example.org", None, None), ("turn:turn.example.org:3479?transport=tcp", "u", "p")]
    # credentials in the URL win over the flags; a password may contain "@" and ":"
    (s,) = ice_servers(IceServerOptions(["turn:alice:pa:ss@word@10.0.0.1:3478"], username="u", credential="p"))
    assert (s.urls, s.username, s.credential) == ("turn:10.0.0.1:3478", "alice", "pa:ss@word")
    (s,) = ice_servers(IceServerOptions(["turns:turn.example.org"], "u", "p"))
    assert s.urls == "turns:turn.example.org"


@pytest.mark.parametrize("options,message", [
    (IceServerOptions(["http://turn.example.org"]), "invalid scheme"),
    (IceServerOptions(["stun:"]), "malformed uri"),
    (IceServerOptions(["turn:turn.example.org"]), "needs a username and a credential"),
    (IceServerOptions(["turn:justauser@turn.example.org"]), "USER:PASSWORD@HOST"),
    (IceServerOptions(["turn:a:b@h1", "turn:a:b@h2"]), "only one TURN server"),
    (IceServerOptions(["stun:h1", "stun:h2"]), "only one STUN server"),
    (IceServerOptions(["turn:a:b@h?transport=sctp"]), "transport must be udp or tcp"),
    (IceServerOptions(["turns:a:b@h?transport=udp"]), "transport must be udp or tcp"),
    (IceServerOptions(["stun:h1"], relay_only=True), "--ice-relay-only needs a TURN server"),
])
def test_bad_options_are_clear_errors(options: IceServerOptions, message: str) -> None:
    with pytest.raises(IceServerError, match=re.escape(message)):
        ice_servers(options)


def test_passwords_are_not_echoed_in_errors() -> None:
    with pytest.raises(IceServerError) as e:
        ice_servers(IceServerOptions(["turn:a:hunter2@h1", "turn:a:hunter2@h2"]))
    assert "hunter2" not in str(e.value)


def test_configuration_and_relay_policy() -> None:
    cfg = rtc_configuration(IceServerOptions(["turn:a:b@h"], relay_only=True))
    assert cfg.iceTransportPolicy == RTCIceTransportPolicy.RELAY and cfg.iceServers[0].username == "a"
    assert rtc_configuration(None).iceServers == []
    # no relay candidate gathered: an error when the call may only be relayed, a warning otherwise
    relay_sdp = "a=candidate:1 1 udp 1 127.0.0.1 5000 typ relay"
    host_sdp = "a=candidate:1 1 udp 1 127.0.0.1 5000 typ host"
    check_relay(relay_sdp, cfg, "sender")
    with pytest.raises(IceServerError, match="sender's TURN server turn:h gave no relay address"):
        check_relay(host_sdp, cfg, "sender")
    check_relay(host_sdp, rtc_configuration(IceServerOptions(["turn:a:b@h"])), "sender")  # only a warning
    check_relay(host_sdp, rtc_configuration(None), "sender")


# --------------------------------------------------------------------------- the options reach both peers


class _Recording:
    """Stands in for RTCPeerConnection: records each configuration, returns a real peer without servers
    (so gathering does not wait on servers that do not exist)."""

    def __init__(self) -> None:
        self.configs: list[RTCConfiguration] = []

    def __call__(self, configuration: RTCConfiguration | None = None) -> RTCPeerConnection:
        self.configs.append(configuration)
        return RTCPeerConnection()


async def test_sender_option_reaches_its_peer_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    # async: the peer builds asyncio objects, which need a running loop (after other asyncio tests
    # the main thread has no implicit one)
    import sender.peer
    from sender.__main__ import parse_args

    rec = _Recording()
    monkeypatch.setattr(sender.peer, "RTCPeerConnection", rec)
    cfg = parse_args(["--video", "x.mp4", "--ice-server", "stun:127.0.0.1:3478", "--ice-server",
                      "turn:127.0.0.1:3479", "--ice-username", "u", "--ice-credential", "p"])
    sender.peer.SenderPeer(None, rtc_configuration(cfg.ice_options()))
    (conf,) = rec.configs
    assert [(s.urls, s.username, s.credential) for s in conf.iceServers] == [
        ("stun:127.0.0.1:3478", None, None), ("turn:127.0.0.1:3479", "u", "p")]
    assert conf.iceTransportPolicy == RTCIceTransportPolicy.ALL


async def test_receiver_option_reaches_each_calls_peer_connection(monkeypatch: pytest.MonkeyPatch,
                                                                  free_port: int) -> None:
    import receiver.server
    from models.fomm import FommConfig, MotionModel
    from receiver.__main__ import parse_args
    from shared.signaling import send_offer

    rec = _Recording()
    monkeypatch.setattr(receiver.server, "RTCPeerConnection", rec)
    cfg, _ = parse_args(["--port", str(free_port), "--eager-render",
                         "--ice-server", f"turn:{USER}:{PASSWORD}@127.0.0.1:3479"])
    restrict_host_addresses(["127.0.0.1"])
    server = receiver.server.ReceiverServer(MotionModel(FommConfig.tiny(64)), cfg)
    await server.start()
    caller = RTCPeerConnection()
    try:
        caller.createDataChannel("control")
        await caller.setLocalDescription(await caller.createOffer())
        await send_offer(f"http://127.0.0.1:{free_port}", caller.localDescription)
    finally:
        await caller.close()
        await server.stop()
    (conf,) = rec.configs
    assert [(s.urls, s.username, s.credential) for s in conf.iceServers] == [
        ("turn:127.0.0.1:3479", USER, PASSWORD)]


def test_receiver_bad_ice_server_is_a_clear_error(free_port: int) -> None:
    res = subprocess.run([sys.executable, "-m", "receiver", "--port", str(free_port), "--ice-server", "turn:h"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "needs a username and a credential" in res.stderr


# --------------------------------------------------------------------------- a call through coturn


def _stun_answers(port: int) -> bool:
    """One STUN Binding request to 127.0.0.1:port; True if anything answers."""
    req = struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, os.urandom(12))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(req, ("127.0.0.1", port))
        try:
            return len(s.recv(2048)) >= 20
        except OSError:
            return False


@pytest.fixture
def turn_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """coturn on 127.0.0.1 (long-term credentials, loopback peers allowed): (port, log path)."""
    exe = shutil.which("turnserver")
    if exe is None:
        pytest.skip("coturn's turnserver is not installed (apt-get install coturn; .ci/setup.sh does as root)")
    port = free_udp_port()
    relay_lo = 40000 + (os.getpid() % 200) * 100  # a relay port range of its own per test process
    log = tmp_path / "turn.log"
    proc = subprocess.Popen(
        [exe, "-n", "--verbose", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
         f"--min-port={relay_lo}", f"--max-port={relay_lo + 99}", "--lt-cred-mech", f"--user={USER}:{PASSWORD}",
         "--realm=kpcast", "--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls", "--fingerprint",
         f"--log-file={log}", "--simple-log", f"--pidfile={tmp_path / 'turn.pid'}", f"--db={tmp_path / 'turndb'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def answers() -> bool:
            if _stun_answers(port):
                return True
            assert proc.poll() is None, f"turnserver exited: {log.read_text()[-2000:] if log.exists() else ''}"
            return False

        wait_for(answers, 20, "turnserver to answer STUN", interval_s=0)
        yield port, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_call_relayed_through_turn(tmp_path: Path, tiny_weights: Path, demo_clip: Path, free_port: int,
                                   turn_server: tuple[int, Path]) -> None:
    """Both ends offer only relayed candidates, so every packet goes through coturn; the two
    credential forms (in the URL, and the flags) are both used."""
    turn_port, turn_log = turn_server
    frames, fps = 60, 15
    recv = start_receiver(["--port", str(free_port), "--weights", str(tiny_weights), "--playout", "immediate",
                           "--stats-dir", str(tmp_path), "--stop-after-calls", "1",
                           "--ice-server", f"turn:{USER}:{PASSWORD}@127.0.0.1:{turn_port}", "--ice-relay-only"],
                          log_path=tmp_path / "receiver.log")
    try:
        res = run_sender(["--receiver", f"http://127.0.0.1:{free_port}", "--video", str(demo_clip), "--weights",
                          str(tiny_weights), "--max-frames", str(frames), "--fps", str(fps), "--framing", "centre",
                          "--ice-server", f"turn:127.0.0.1:{turn_port}", "--ice-username", USER,
                          "--ice-credential", PASSWORD, "--ice-relay-only", "--stats-json", str(tmp_path / "s.json")])
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        assert stop(recv) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    got = json.loads((tmp_path / "call_1.json").read_text())
    assert got["frames_received"] >= 0.95 * frames
    # a skipped frame predicted as the picture already shown is shown again without a render (the
    # immediate playout drops what a busy CPU could not render in time: a margin, not delivery)
    shown = got["frames_rendered"] + got["frames_repeated"]
    assert shown >= 0.75 * frames and shown + got["frames_dropped"] <= got["frames_received"], got
    # coturn allocated a relay for each end and carried the call: its per-allocation "peer usage"
    # (logged when an allocation closes, which the peers ask for as they hang up) counts the bytes
    # relayed to and from the other end, at least the keypoints and the source image
    text = turn_log.read_text()
    assert len(re.findall(r"ALLOCATE processed, success", text)) >= 2, text[-3000:]
    poll(lambda: len(_peer_usage(turn_log)) >= 2, 15, interval_s=0.2)  # logged as each end hangs up
    usage = _peer_usage(turn_log)
    assert len(usage) >= 2, turn_log.read_text()[-3000:]
    print(f"relayed (bytes from peer, to peer) per allocation: {usage}; rendered {got['frames_rendered']}/{frames}")
    assert sum(received for received, _ in usage) > got["keypoint_payload_bytes"] + got["source_image_bytes"]


def _peer_usage(log: Path) -> list[tuple[int, int]]:
    """(bytes received from, bytes sent to) the peer, per closed allocation, from coturn's log."""
    return [(int(rb), int(sb)) for rb, sb in re.findall(r"peer usage: .*?rb=(\d+), sp=\d+, sb=(\d+)", log.read_text())]


def test_wrong_turn_credential_is_a_clear_error_not_a_hang(tmp_path: Path, tiny_weights: Path, demo_clip: Path,
                                                           free_port: int, turn_server: tuple[int, Path]) -> None:
    turn_port, _ = turn_server
    recv = start_receiver(["--port", str(free_port), "--weights", str(tiny_weights)], log_path=tmp_path / "r.log")
    try:
        t0 = time.monotonic()
        res = run_sender(["--receiver", f"http://127.0.0.1:{free_port}", "--video", str(demo_clip), "--weights",
                          str(tiny_weights), "--max-frames", "5", "--framing", "centre", "--ice-relay-only",
                          "--ice-server", f"turn:{USER}:badpass123@127.0.0.1:{turn_port}"], timeout_s=60)
        elapsed = time.monotonic() - t0
    finally:
        recv.terminate()
        stop(recv)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"sender's TURN server turn:127.0.0.1:{turn_port} gave no relay address" in res.stderr
    assert "badpass123" not in res.stderr  # the password is not printed
    assert elapsed < 50  # it fails after the allocation is refused, not after a long ICE timeout
