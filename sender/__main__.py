"""kpcast sender: stream keypoints of a camera or video file to a receiver.

Usage:
  python -m sender --receiver http://127.0.0.1:8080 --video clip.mp4
  python -m sender --receiver http://HOST:8080 --camera 0 --token SECRET
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

from models.checkpoint import CheckpointError
from sender.call import SenderCall
from sender.capture import CaptureError
from sender.config import SenderConfig
from sender.framing import FRAMING_MODES
from sender.inputs import format_cameras, list_cameras
from sender.refresh import REFRESH_MODES
from shared import protocol as P
from shared.ice_servers import IceServerError, add_ice_server_arguments, rtc_configuration
from shared.kpcodec import SKIP_RULES
from shared.signaling import SignalingError

log = logging.getLogger("sender")


def parse_args(argv: list[str] | None = None) -> SenderConfig:
    p = argparse.ArgumentParser(prog="python -m sender", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--receiver", default=SenderConfig.receiver, help="receiver base URL")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--camera", type=int, help="camera index")
    src.add_argument("--video", help="video file to stream")
    p.add_argument("--fps", type=float, help=f"frame rate, {P.MIN_FPS:g}..{P.MAX_FPS:g} (default: the file's, a "
                                             f"faster file thinned to at most {P.MAX_FPS:g}; 30 for a camera)")
    p.add_argument("--loop", action="store_true", help="loop the video file")
    p.add_argument("--max-frames", type=int)
    p.add_argument("--mirror", action="store_true", help="flip the picture horizontally")
    p.add_argument("--token", default=os.environ.get("KPCAST_TOKEN"), help="shared secret (or $KPCAST_TOKEN)")
    p.add_argument("--weights", default=SenderConfig.weights, help="motion model checkpoint")
    p.add_argument("--size", type=int, default=SenderConfig.size,
                   help="side of the captured square and of the source image sent (receivers render at their own "
                        "size; default 256)")
    p.add_argument("--codec", choices=["pred", "q8", "f16"], default=SenderConfig.codec,
                   help="pred (default): send only the frames the receiver cannot predict, as residuals; "
                        "q8/f16: every (--kp-every) frame's vector")
    p.add_argument("--tolerance", type=float, default=SenderConfig.tolerance,
                   help="pred: skip a frame when the receiver's prediction is within this of the truth ([-1, 1] "
                        "units, Jacobians x10; default %(default)s)")
    p.add_argument("--skip-rule", choices=SKIP_RULES, default=SenderConfig.skip_rule,
                   help="pred: mean: the mean error within --tolerance and none beyond 3x it; max: every value "
                        "within it (default %(default)s)")
    p.add_argument("--predictor", choices=P.PREDICTORS, default=SenderConfig.predictor,
                   help="pred: what both ends predict from the decoded history (default %(default)s)")
    p.add_argument("--max-gap", type=int, default=SenderConfig.max_gap,
                   help="pred: at most this many frames skipped in a row (default %(default)s)")
    p.add_argument("--keyframe-interval", type=int, default=SenderConfig.keyframe_interval,
                   help="pred: an absolute frame at least this often, in frames (default %(default)s)")
    p.add_argument("--bundle", action="store_true",
                   help="pred: two consecutive coded frames per message (a frame may wait one frame period): "
                        "about 0.6x the wire rate of in-the-wild faces, where most frames are sent")
    p.add_argument("--kp-every", type=int, default=1, help="q8/f16: send keypoints of every k-th frame")
    p.add_argument("--batch", type=int, default=1, help="q8/f16: keypoint frames per message")
    p.add_argument("--target-kbps", type=float,
                   help="keypoint wire budget (message bytes + 95 B/message). pred: the tolerance follows the "
                        "measured rate (sender.rate); q8/f16: overrides --kp-every/--batch with the smallest "
                        "decimation (then batch) whose estimated rate fits")
    p.add_argument("--ice-address", action="append", help="restrict ICE to this local address (repeatable)")
    add_ice_server_arguments(p)
    p.add_argument("--framing", choices=FRAMING_MODES, default=SenderConfig.framing,
                   help="face: crop the square the models were trained on around the detected face, re-framed "
                        "(with a new source image) when the face leaves it; centre: the centre square (default face)")
    p.add_argument("--refresh", choices=REFRESH_MODES, default=SenderConfig.refresh,
                   help="send a new source image when the receiver's picture drifts from the camera's: render "
                        "(default: the picture rebuilt at 64x64 every 0.5 s, by SSIM), keypoints (distance from "
                        "the source frame's keypoints), off")
    p.add_argument("--refresh-min-interval", type=float, default=SenderConfig.refresh_min_interval,
                   help="seconds between two refreshes at least (default %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=SenderConfig.connect_timeout,
                   help="seconds to connect to the receiver before giving up; a busy receiver (HTTP 503) is "
                        "offered again for up to as long (default %(default)s)")
    p.add_argument("--stats-json", help="write sender stats here at the end")
    p.add_argument("--truth-out", help="write every frame's keypoints to this .npz")
    p.add_argument("--source-quality", type=int, default=90, help="JPEG quality of the source image")
    p.add_argument("--source-image", help="send this picture (sent byte for byte) as the face to animate")
    p.add_argument("--list-cameras", action="store_true", help="print the cameras that open, then exit")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for keypoint extraction (ONNX Runtime intra-op, and torch): 2 takes ~12 ms a frame "
                        "to ~8 on a 2-core machine, 4 ms less latency (default %(default)s)")
    p.add_argument("--pacing", choices=["auto", "off"], default="auto",
                   help="auto: time keypoint extraction before the call and, when one frame's does not fit the "
                        "frame period here, send every k-th frame (the call's frame rate, announced to the "
                        "receiver); off: always the asked rate (default %(default)s)")
    p.add_argument("--replay-keypoints", help="send the keypoints saved by --truth-out (looped) instead of running "
                                              "the detector: loads a receiver without loading this machine")
    a = p.parse_args(argv)
    cfg = SenderConfig(**{k: v for k, v in vars(a).items()})
    if cfg.camera is None and cfg.video is None and not cfg.list_cameras:
        p.error("give --camera N or --video PATH")
    if not 1 <= cfg.kp_every <= 64 or not 1 <= cfg.batch <= P.MAX_FRAMES_PER_BATCH:
        p.error("--kp-every must be in 1..64 and --batch in 1..64")
    if not 32 <= cfg.size <= 1024:
        p.error("--size must be in 32..1024")
    if not 1 <= cfg.threads <= 64:
        p.error("--threads must be in 1..64")
    if cfg.fps is not None and not P.MIN_FPS <= cfg.fps <= P.MAX_FPS:  # NaN fails it too
        p.error(f"--fps must be in {P.MIN_FPS:g}..{P.MAX_FPS:g} (the frame rates a receiver accepts)")
    if cfg.target_kbps is not None and cfg.target_kbps <= 0:
        p.error("--target-kbps must be > 0")
    if cfg.refresh_min_interval <= 0:
        p.error("--refresh-min-interval must be > 0")
    if cfg.connect_timeout <= 0:
        p.error("--connect-timeout must be > 0")
    if cfg.bundle and cfg.codec != "pred":
        p.error("--bundle is for --codec pred (q8/f16 batch with --batch)")
    if cfg.codec == "pred":
        if cfg.kp_every != 1 or cfg.batch != 1:
            p.error("--kp-every and --batch are for --codec q8|f16: the predictive codec decides per frame")
        if not 0 <= cfg.max_gap <= P.MAX_PRED_GAP:
            p.error(f"--max-gap must be in 0..{P.MAX_PRED_GAP}")
        try:
            cfg.pred_config()
        except ValueError as e:
            p.error(str(e))
    try:
        rtc_configuration(cfg.ice_options())
    except IceServerError as e:
        p.error(str(e))
    return cfg


async def run(cfg: SenderConfig) -> dict:
    """One call as ``cfg`` asks; returns its stats (``SenderStats.to_dict()``)."""
    return await SenderCall(cfg).run()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = parse_args(argv)
    if cfg.list_cameras:
        print(format_cameras(list_cameras()))
        return 0
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    task = loop.create_task(run(cfg))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        stats = loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("sender: stopped", file=sys.stderr)
        return 130
    except TimeoutError:
        print(f"sender: error: timed out connecting to the receiver: ICE, DTLS and the data channels were not "
              f"all up (--connect-timeout {cfg.connect_timeout:g} s; the receiver also hangs up on a peer that "
              f"sends nothing for its --setup-timeout)", file=sys.stderr)
        return 2
    except (CaptureError, CheckpointError, SignalingError, IceServerError) as e:
        print(f"sender: error: {e}", file=sys.stderr)
        return 2
    finally:
        loop.close()
    if cfg.stats_json:
        Path(cfg.stats_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.stats_json).write_text(json.dumps({"config": asdict(cfg), **stats}, indent=1))
    log.info("sent %d/%d frames, %d keypoint bytes", stats["frames_sent"], stats["frames_captured"],
             stats["keypoint_payload_bytes"])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
