"""kpcast: a two-way call, each side's face both ways, one command per side.

Usage:
  python -m kpcast call --listen --host 0.0.0.0 --port 8080 --token SECRET --sink window     # one machine
  python -m kpcast call --connect http://HOST:8080 --token SECRET --sink window            # the other

Each side sends its camera's face as keypoints and shows the other's face large, its own small in a
corner (mirrored). Ctrl-C, or q in the window, hangs up both sides. Exit status: 0 when the call ended
as someone asked (either side hung up, or --video/--max-frames ended), 1 when the other side vanished,
2 when the call could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kpcast.call import ERROR, SEND_NICE, CallConfig, CallResult, connect, listen
from kpcast.view import SINKS, check_view_spec
from models.checkpoint import CheckpointError
from models.fomm.io import DEFAULT_WEIGHTS, SHIPPED_SIZES
from receiver.regions import add_refine_regions_argument
from receiver.session import SessionConfig
from receiver.sinks import SinkError
from sender.capture import CaptureError
from sender.config import SenderConfig
from sender.framing import FRAMING_MODES
from sender.refresh import REFRESH_MODES
from shared import protocol as P
from shared.ice_servers import IceServerError, add_ice_server_arguments, options_from_args
from shared.signaling import SignalingError

log = logging.getLogger("kpcast")


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The program's parser and its ``call`` subcommand's (whose usage the errors show)."""
    p = argparse.ArgumentParser(prog="python -m kpcast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="call")
    c = sub.add_parser("call", help="a two-way call (one side --listen, the other --connect)",
                       description="A two-way call: --listen on one machine, --connect on the other.")
    role = c.add_mutually_exclusive_group(required=True)
    role.add_argument("--listen", action="store_true", help="wait for the other side to call (HTTP signaling)")
    role.add_argument("--connect", metavar="URL", help="call the listening side at http://HOST:PORT")
    c.add_argument("--host", default=CallConfig.host, help="--listen: address to listen on (default %(default)s)")
    c.add_argument("--port", type=int, default=CallConfig.port, help="--listen: port (default %(default)s)")
    c.add_argument("--token", default=os.environ.get("KPCAST_TOKEN"), help="shared secret (or $KPCAST_TOKEN)")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--camera", type=int, help="camera index (default 0)")
    src.add_argument("--video", help="a video file instead of a camera")
    c.add_argument("--loop", action="store_true", help="loop the video file")
    c.add_argument("--max-frames", type=int, help="hang up after sending this many frames")
    c.add_argument("--fps", type=float, help="frame rate (default: the file's, or 30 for a camera)")
    c.add_argument("--sink", default="window" if _has_display() else "null",
                   help=f"{SINKS}: where this side's picture goes (default: window when there is a display)")
    c.add_argument("--view-size", type=int, default=CallConfig.view_size,
                   help="side of the picture shown or written, in pixels (default %(default)s)")
    c.add_argument("--stats-json", help="write both directions' stats here at the end")
    c.add_argument("--weights", help="one motion model checkpoint for both directions (overrides --size; the "
                                     "two sides' keypoint detectors must match)")
    c.add_argument("--size", default="auto", choices=["auto", *map(str, SHIPPED_SIZES)],
                   help="render size of the other side's face: auto (default) = the largest that renders in "
                        "real time here")
    c.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=None,
                   help="change the render size during the call when rendering falls behind (default: on with "
                        "--size auto on a CPU)")
    c.add_argument("--codec", choices=["pred", "q8", "f16"], default=SenderConfig.codec,
                   help="pred (default): send only the frames the other side cannot predict; q8/f16: every frame")
    c.add_argument("--tolerance", type=float, default=SenderConfig.tolerance,
                   help="pred: skip a frame predicted this closely (default %(default)s)")
    c.add_argument("--target-kbps", type=float, help="keep this side's keypoint wire rate near this")
    c.add_argument("--framing", choices=FRAMING_MODES, default=SenderConfig.framing,
                   help="face (default): the square around the detected face; centre: the centre square")
    c.add_argument("--refresh", choices=REFRESH_MODES, default=SenderConfig.refresh,
                   help="send a new source image when the other side's picture drifts (default %(default)s)")
    c.add_argument("--pacing", choices=["auto", "off"], default=SenderConfig.pacing,
                   help="auto: send every k-th frame when keypoint extraction cannot hold the frame rate")
    c.add_argument("--playout", choices=["clock", "immediate"], default=SessionConfig.playout,
                   help="clock (default): steady fps with concealment; immediate: show frames on arrival")
    c.add_argument("--connect-timeout", type=float, default=SenderConfig.connect_timeout,
                   help="seconds for the connection and both sides' channels to open (default %(default)s)")
    c.add_argument("--threads", type=int, default=CallConfig.threads, help="renderer threads (default %(default)s)")
    c.add_argument("--send-nice", type=int, default=SEND_NICE,
                   help="run this side's extraction, framing and refresh this many nice steps below its rendering "
                        "(0..19, default %(default)s: the picture shown here gets the shared cores first)")
    c.add_argument("--frames-log", help="write every frame shown of the other side (seq, kind, keypoints, times) to "
                                        "this .npz when the call ends (a bench aid, as the receiver's)")
    c.add_argument("--device", help="cpu or cuda for the renderer (default: cuda when present)")
    add_refine_regions_argument(c)
    c.add_argument("--ice-address", action="append", help="restrict ICE to this local address (repeatable)")
    add_ice_server_arguments(c)
    return p, c


def _has_display() -> bool:
    return not sys.platform.startswith("linux") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def parse_args(argv: list[str] | None = None) -> CallConfig:
    p, c = _parser()
    a = p.parse_args(argv)
    if a.connect is not None:
        url = urlparse(a.connect)
        if url.scheme not in ("http", "https") or not url.hostname:
            c.error(f"--connect needs the listening side's URL, http://HOST:PORT (got {a.connect!r})")
    if not 0 < a.port < 65536:
        c.error("--port must be in 1..65535")
    if a.fps is not None and not P.MIN_FPS <= a.fps <= P.MAX_FPS:  # what a Hello may announce
        c.error(f"--fps must be in {P.MIN_FPS:g}..{P.MAX_FPS:g}")
    if a.max_frames is not None and a.max_frames < 1:
        c.error("--max-frames must be >= 1")
    if not 64 <= a.view_size <= 2048:
        c.error("--view-size must be in 64..2048")
    if a.connect_timeout <= 0:
        c.error("--connect-timeout must be > 0")
    if a.threads < 1:
        c.error("--threads must be >= 1")
    if not 0 <= a.send_nice <= 19:
        c.error("--send-nice must be in 0..19")
    if a.target_kbps is not None and a.target_kbps <= 0:
        c.error("--target-kbps must be > 0")
    if a.token is not None and not a.token.strip():
        c.error("--token must not be empty (leave it out for no token)")
    try:
        check_view_spec(a.sink)
        ice = options_from_args(a)
    except (SinkError, IceServerError) as e:
        c.error(str(e))
    camera = a.camera if a.camera is not None or a.video is not None else 0  # a call's default input: camera 0
    sender = SenderConfig(
        receiver=a.connect or SenderConfig.receiver, camera=camera, video=a.video, fps=a.fps, loop=a.loop,
        max_frames=a.max_frames, token=a.token, weights=a.weights or str(DEFAULT_WEIGHTS), codec=a.codec,
        tolerance=a.tolerance, target_kbps=a.target_kbps, framing=a.framing, refresh=a.refresh, pacing=a.pacing,
        connect_timeout=a.connect_timeout, ice_address=a.ice_address, ice_server=a.ice_server,
        ice_username=a.ice_username, ice_credential=a.ice_credential, ice_relay_only=a.ice_relay_only,
        nice=a.send_nice)
    if sender.codec == "pred":
        try:
            sender.pred_config()
        except ValueError as e:
            c.error(str(e))
    # the session's own sink stays null: this side composes both faces itself (kpcast.view)
    session = SessionConfig(playout=a.playout, setup_timeout_s=max(
        SessionConfig.setup_timeout_s, a.connect_timeout), frames_log=a.frames_log)
    return CallConfig(listen=a.listen, connect=a.connect, host=a.host, port=a.port, token=a.token, sender=sender,
                      session=session, size=a.size, weights=a.weights, adapt=a.adapt, device=a.device,
                      threads=a.threads, sink=a.sink, view_size=a.view_size, stats_json=a.stats_json, ice=ice,
                      ice_address=a.ice_address, refine_regions=a.refine_regions)


async def _run(cfg: CallConfig) -> CallResult | None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # during the call: hang up (a Bye goes out); before it: stop waiting
        loop.add_signal_handler(sig, stop.set)
    return await (listen(cfg, stop) if cfg.listen else connect(cfg, stop))


def _public_config(cfg: CallConfig) -> dict[str, Any]:
    """The config for the stats file, without secrets."""
    d = asdict(cfg)
    d["token"] = d["sender"]["token"] = None
    d["ice"]["credential"] = d["sender"]["ice_credential"] = None
    return d


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = parse_args(argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        result = runner(_run(cfg))
    except (CaptureError, CheckpointError, SignalingError, IceServerError, SinkError) as e:
        print(f"kpcast: error: {e}", file=sys.stderr)
        return ERROR
    except OSError as e:  # the listening port is taken, or not an address of this machine
        where = f"cannot listen on {cfg.host}:{cfg.port}" if cfg.listen else "cannot start the call"
        print(f"kpcast: error: {where}: {e}", file=sys.stderr)
        return ERROR
    if result is None:
        print("kpcast: stopped before a call", file=sys.stderr)
        return 0
    if cfg.stats_json:
        Path(cfg.stats_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.stats_json).write_text(json.dumps({"role": "listen" if cfg.listen else "connect",
                                                    "config": _public_config(cfg), **result.to_dict()}, indent=1))
    sent, got = result.sent, result.received
    print(f"kpcast: call ended after {result.duration_s:.1f} s: {result.reason}; sent {sent.get('frames_captured', 0)} "
          f"frames, showed {got.get('frames_rendered', 0)} of the other side's", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
