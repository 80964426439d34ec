"""kpcast sender: stream keypoints of a camera or video file to a receiver.

Usage:
  python -m sender --receiver http://127.0.0.1:8080 --video clip.mp4
  python -m sender --receiver http://HOST:8080 --camera 0 --token SECRET
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np

from models.checkpoint import CheckpointError
from models.fomm.io import DEFAULT_WEIGHTS, detector_id, load_motion_model
from sender.capture import CaptureConfig, CaptureError, FrameSource
from sender.extract import DETECTOR_CACHE_DIR, KeypointExtractor
from sender.framing import FRAMING_MODES, Framer, FramingConfig
from sender.inputs import format_cameras, list_cameras, read_source_image
from sender.kpsend import PredictiveSender
from sender.pacing import PacingConfig, choose_stride, measure_work_ms
from sender.peer import SenderPeer
from sender.rate import RateConfig, RateController
from sender.refresh import REFRESH_MODES, RefreshConfig, RefreshMonitor
from shared import kpvector as V
from shared import protocol as P
from shared.ice import addresses_for_receiver, restrict_host_addresses
from shared.ice_servers import IceServerError, IceServerOptions, add_ice_server_arguments, rtc_configuration
from shared.kpcodec import DEFAULT_STREAM, SKIP_RULES, PredictiveConfig
from shared.signaling import SignalingError

log = logging.getLogger("sender")

# Per-message transport overhead (IPv4 + UDP + DTLS + SCTP headers), as measured by receiver.stats.
# --target-kbps may batch frames, but never so many that batching alone delays a frame by more.
TARGET_MAX_BATCH_DELAY_MS = 100.0
HEARTBEAT_S = 0.5  # a heartbeat goes out only when no keypoint message did for this long
# A refreshed source image frames the face exactly as the one it replaces, so the keypoints fit
# both: they go on naming the old image this long, while the new one travels and the receiver
# decodes and encodes it, so the switch never waits for it (a re-frame switches at once).
REFRESH_SWITCH_S = 0.3
# How long the first frame waits for the receiver's SourceReady (an older receiver never sends one):
# under the receiver's 1.5 s silence timeout, since the sender sends nothing while it waits.
SOURCE_READY_WAIT_S = 1.0


@dataclass
class SenderConfig:
    receiver: str = "http://127.0.0.1:8080"
    camera: int | None = None
    video: str | None = None
    fps: float | None = None
    loop: bool = False
    max_frames: int | None = None
    mirror: bool = False
    token: str | None = None
    weights: str = str(DEFAULT_WEIGHTS)
    # Captured frames and the source image are this size; keypoints are detected at the
    # detector's 64x64 whatever it is, so it only sets the sharpest output a receiver can show.
    size: int = 256
    # pred: closed-loop predictive coding (shared.kpcodec): only frames the receiver cannot
    # predict are sent, no added delay. q8 (80 B/frame) / f16 (120 B/frame): every (k-th) frame.
    codec: str = "pred"
    # pred: skip a frame predicted this close (the starting value with --target-kbps); the defaults
    # are shared.kpcodec.DEFAULT_STREAM's
    tolerance: float = DEFAULT_STREAM.tolerance
    skip_rule: str = DEFAULT_STREAM.skip_rule  # pred: mean (capped) or max error within the tolerance
    predictor: str = DEFAULT_STREAM.predictor  # pred: last | linear
    max_gap: int = DEFAULT_STREAM.max_gap  # pred: at most this many frames skipped in a row
    keyframe_interval: int = DEFAULT_STREAM.keyframe_interval  # pred: an absolute frame at least this often
    kp_every: int = 1  # q8/f16: send every k-th frame's keypoints; the receiver fills the rest
    batch: int = 1  # q8/f16: keypoint frames per message (fewer messages, more latency)
    target_kbps: float | None = None  # pred: adjust the tolerance to this rate; q8/f16: pick kp_every and batch
    ice_address: list[str] | None = None  # restrict ICE host candidates (default: 127.0.0.1 for a loopback receiver)
    ice_server: list[str] | None = None  # STUN/TURN server URLs (shared.ice_servers)
    ice_username: str | None = None
    ice_credential: str | None = None
    ice_relay_only: bool = False
    # "face": the training clips' square around the face (sender.framing), re-framed when the face
    # leaves it; "centre": the frame's centre square (input that is already a face crop). Face is the
    # default for files too: on a pre-cropped clip the face square covers the whole frame anyway.
    framing: str = "face"
    # render: rebuild the receiver's picture at 64x64 once a second and send a new source image when
    # it has drifted (sender.refresh); keypoints: the cheaper keypoint-distance estimate; off: never.
    # Always off with --source-image (the picture is not the camera's).
    refresh: str = "render"
    refresh_min_interval: float = RefreshConfig.min_interval_s
    # ICE + DTLS + both data channels open within this; over a lossy path the DTLS and SCTP
    # handshakes back off (1, 2, 4, 8 s) on every lost flight, so benches of lossy links give more
    connect_timeout: float = 15.0
    stats_json: str | None = None
    truth_out: str | None = None  # save every frame's true keypoints (npz) for evaluation
    source_quality: int = 90
    source_image: str | None = None  # send this file as the source image instead of the first frame
    list_cameras: bool = False
    # auto: time the extraction before the call and keep every k-th frame when one frame's does not
    # fit this machine (sender.pacing), announced in the Hello; off: always the asked rate.
    pacing: str = "auto"
    threads: int = 1
    replay_keypoints: str | None = None  # send keypoints from a --truth-out file instead of detecting them

    def ice_options(self) -> IceServerOptions:
        return IceServerOptions(self.ice_server, self.ice_username, self.ice_credential, self.ice_relay_only)

    def pred_config(self) -> PredictiveConfig:
        """The predictive codec's parameters (ValueError when out of range)."""
        return PredictiveConfig(predictor=self.predictor, tolerance=self.tolerance, max_gap=self.max_gap,
                                keyframe_interval=self.keyframe_interval, skip_rule=self.skip_rule)


def parse_args(argv: list[str] | None = None) -> SenderConfig:
    p = argparse.ArgumentParser(prog="python -m sender", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--receiver", default=SenderConfig.receiver, help="receiver base URL")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--camera", type=int, help="camera index")
    src.add_argument("--video", help="video file to stream")
    p.add_argument("--fps", type=float, help="frame rate (default: the file's, or 30 for a camera)")
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
                        "(default: the picture rebuilt at 64x64 once a second, by SSIM), keypoints (distance from "
                        "the source frame's keypoints), off")
    p.add_argument("--refresh-min-interval", type=float, default=SenderConfig.refresh_min_interval,
                   help="seconds between two refreshes at least (default %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=SenderConfig.connect_timeout,
                   help="seconds to connect to the receiver before giving up (default %(default)s)")
    p.add_argument("--stats-json", help="write sender stats here at the end")
    p.add_argument("--truth-out", help="write every frame's keypoints to this .npz")
    p.add_argument("--source-quality", type=int, default=90, help="JPEG quality of the source image")
    p.add_argument("--source-image", help="send this picture (sent byte for byte) as the face to animate")
    p.add_argument("--list-cameras", action="store_true", help="print the cameras that open, then exit")
    p.add_argument("--threads", type=int, default=1, help="torch threads for keypoint extraction")
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
    if cfg.target_kbps is not None and cfg.target_kbps <= 0:
        p.error("--target-kbps must be > 0")
    if cfg.refresh_min_interval <= 0:
        p.error("--refresh-min-interval must be > 0")
    if cfg.connect_timeout <= 0:
        p.error("--connect-timeout must be > 0")
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


def estimate_kp_wire_kbps(kp_every: int, batch: int, fps: float, codec: P.Codec = P.Codec.Q8) -> float:
    """Keypoint wire rate: encoded message bytes + transport overhead per message, at ``fps``."""
    # Large seq/timestamp values so variable-length integer fields are sized as in a long call.
    msg = P.KeypointBatch.build(10_000_000, 2**62, [np.zeros(V.KP_DIM, np.float32)]
                                * batch, codec, step=kp_every, interval_us=int(1e6 * kp_every / fps))
    messages_per_s = fps / (kp_every * batch)
    return (len(P.encode(msg)) + V.TRANSPORT_OVERHEAD_B) * messages_per_s * 8 / 1000


def choose_rate(target_kbps: float, fps: float, codec: P.Codec = P.Codec.Q8,
                max_batch_delay_ms: float = TARGET_MAX_BATCH_DELAY_MS) -> tuple[int, int, float, bool]:
    """Smallest decimation k, then smallest batch, whose estimated keypoint wire rate fits the target.

    Returns ``(kp_every, batch, estimated_kbps, fits)``; when nothing fits, the cheapest candidate
    with ``fits=False``. Batches are limited so batching delays a frame by at most
    ``max_batch_delay_ms``: decimation costs accuracy, batching costs latency.
    """
    cheapest: tuple[int, int, float] | None = None
    for k in range(1, 65):
        for b in range(1, P.MAX_FRAMES_PER_BATCH + 1):
            if b > 1 and (b - 1) * k / fps * 1000 > max_batch_delay_ms:
                break
            kbps = estimate_kp_wire_kbps(k, b, fps, codec)
            if kbps <= target_kbps:
                return k, b, kbps, True
            if cheapest is None or kbps < cheapest[2]:
                cheapest = (k, b, kbps)
    assert cheapest is not None
    return (*cheapest, False)


def make_refresh(cfg: SenderConfig, model) -> RefreshMonitor:  # noqa: ANN001 - the sender's MotionModel
    """The --refresh stage: off with --source-image; the keypoint estimate when the render one cannot run."""
    mode = "off" if cfg.source_image else cfg.refresh
    rc = RefreshConfig(mode=mode, min_interval_s=cfg.refresh_min_interval)
    if mode != "render":
        return RefreshMonitor(rc)
    try:
        monitor = RefreshMonitor(rc, model)
    except Exception as e:  # noqa: BLE001 - missing weights or a broken model: refresh from keypoints instead
        log.warning("source refresh by rendering unavailable (%s): using the keypoint estimate", e)
        return RefreshMonitor(RefreshConfig(mode="keypoints", min_interval_s=cfg.refresh_min_interval))
    if detector_id(monitor._render.model) != detector_id(model):
        log.warning("the 64x64 estimate model has another keypoint detector: refresh from keypoints instead")
        monitor.close()
        return RefreshMonitor(RefreshConfig(mode="keypoints", min_interval_s=cfg.refresh_min_interval))
    return monitor


def make_framer(cfg: SenderConfig) -> Framer:
    """The --framing stage; face framing falls back to the centre square when dlib is missing."""
    try:
        return Framer(FramingConfig(mode=cfg.framing, size=cfg.size))
    except (ImportError, RuntimeError) as e:  # dlib-bin not installed (or a dlib that cannot build its detector)
        log.warning("face framing unavailable (%s): using the centre square", e)
        return Framer(FramingConfig(mode="centre", size=cfg.size))


async def wait_source_ready(ready: asyncio.Event, stats: dict, timeout_s: float = SOURCE_READY_WAIT_S) -> None:
    """Wait until the receiver can render against the first source image (``P.SourceReady``).

    Keypoints sent before that only queue behind the image: the receiver then drops them to catch
    up (the demo lost 4-5 of its first frames this way). A receiver that never says so (an older
    one) costs ``timeout_s`` once."""
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(ready.wait(), timeout_s)
        stats["source_ready_ms"] = (time.monotonic() - t0) * 1000
        log.info("receiver ready to render after %.0f ms", stats["source_ready_ms"])
    except TimeoutError:
        log.info("no word from the receiver that the source image is ready after %.1f s: starting anyway", timeout_s)


async def run(cfg: SenderConfig) -> dict:
    import torch

    torch.set_num_threads(cfg.threads)
    model, meta = load_motion_model(cfg.weights)
    replay = None
    if cfg.replay_keypoints:
        try:
            replay = np.load(cfg.replay_keypoints)["vectors"].astype(np.float32)
        except (OSError, KeyError, ValueError) as e:
            raise CaptureError(f"cannot read keypoints from {cfg.replay_keypoints}: {e}") from e
        if replay.ndim != 2 or replay.shape[1] != V.KP_DIM or len(replay) == 0:
            raise CaptureError(f"{cfg.replay_keypoints} does not hold (N, {V.KP_DIM}) keypoint vectors")
    chosen = read_source_image(cfg.source_image) if cfg.source_image else None
    source = FrameSource(CaptureConfig(cfg.camera, cfg.video, cfg.fps, cfg.size, cfg.loop,
                                       cfg.max_frames, cfg.mirror), make_framer(cfg))
    # after the input has opened: a missing camera or file fails before the detector is built
    extractor = KeypointExtractor(model, cache_dir=DETECTOR_CACHE_DIR)
    pacing = {"fps_asked": source.fps, "fps_stride": 1, "extract_ms_startup": None}
    if cfg.pacing == "auto" and replay is None:
        work_ms = measure_work_ms(extractor, np.zeros((cfg.size, cfg.size, 3), np.uint8), PacingConfig().rounds)
        stride = choose_stride(source.fps, work_ms)
        pacing.update(fps_stride=stride, extract_ms_startup=work_ms)
        if stride > 1:
            source.set_stride(stride)
            log.warning("keypoint extraction takes %.0f ms a frame here: %.1f fps cannot be held; sending every "
                        "%s frame, at %.1f fps", work_ms, source.asked_fps, f"{stride}th" if stride > 2 else "2nd",
                        source.fps)
    # never the receiver's address: it is not one of this host's (README's two-machine call)
    restrict_host_addresses(cfg.ice_address or addresses_for_receiver(urlparse(cfg.receiver).hostname or ""))
    codec = {"pred": P.Codec.PRED, "q8": P.Codec.Q8, "f16": P.Codec.F16}[cfg.codec]
    if cfg.target_kbps is not None and codec != P.Codec.PRED:
        k, b, est, fits = choose_rate(cfg.target_kbps, source.fps, codec)
        (log.info if fits else log.warning)(
            "target %.1f kbps at %.1f fps: kp_every=%d batch=%d (estimated %.1f kbps%s)", cfg.target_kbps,
            source.fps, k, b, est, "" if fits else ", does NOT fit: cheapest setting")
        cfg.kp_every, cfg.batch = k, b
    latest: dict[str, np.ndarray] = {}
    refresh = make_refresh(cfg, model)
    source_requests: list[str] = []
    pred: PredictiveSender | None = None

    # image_id -> the receiver can render it; only images this sender waits for, so a receiver naming
    # others (any number of them) adds nothing
    ready: dict[int, asyncio.Event] = {}

    def on_message(msg: P.Message) -> None:
        if isinstance(msg, P.SourceReady):
            if msg.image_id in ready:
                ready[msg.image_id].set()
        elif isinstance(msg, P.SourceRequest):
            source_requests.append(msg.reason)
        elif isinstance(msg, P.KeyframeRequest) and pred is not None:
            log.info("receiver asks for a keyframe (it decoded up to frame %d)", msg.last_seq)
            pred.request_keyframe()

    peer = SenderPeer(on_message, rtc_configuration(cfg.ice_options()))
    stats = {**pacing, "frames_captured": 0, "frames_sent": 0, "messages_sent": 0, "keypoint_payload_bytes": 0,
             "source_image_bytes": 0, "source_images_sent": 0, "heartbeats_sent": 0, "extract_ms": [],
             "refresh_images_sent": 0, "refresh_bytes": 0, "source_ready_ms": None}
    truth_seq, truth_vec = [], []
    timing: dict[int, list[float]] = {}
    t_start = time.monotonic()
    try:
        await peer.connect(cfg.receiver, cfg.token, timeout_s=cfg.connect_timeout)
        ts_base_us = time.time_ns() // 1000  # capture times count from here (fewer bytes per message)
        if codec == P.Codec.PRED:
            rate = None if cfg.target_kbps is None else RateController(RateConfig(cfg.target_kbps), cfg.tolerance)
            pred = PredictiveSender(peer.send_keypoints, cfg.pred_config(), ts_base_us, rate)
        peer.send_control(P.Hello(model=detector_id(model), size=cfg.size, fps=source.fps, codec=int(codec),
                                  kp_every=cfg.kp_every, ts_base_us=ts_base_us,
                                  pred=pred.hello_params() if pred is not None else None))
        pending: list[tuple[int, int, np.ndarray]] = []
        image_id = -1  # the source image sent last (SourceChunk.image_id)
        kp_image_id = -1  # the one keypoint messages name: image_id, or the previous one just after a refresh
        switch_at: float | None = None  # when keypoints start naming a refreshed image
        framing_sent = 0  # the framing generation of the source image the receiver holds
        kp_sent_at = time.monotonic()  # the last keypoint message (or heartbeat): liveness for the receiver
        last: tuple[int, int, np.ndarray] | None = None
        refresh_due = False

        def flush() -> None:
            """Send the batched frames (q8/f16), named after the image they were captured for."""
            nonlocal pending, kp_sent_at
            if not pending:
                return
            t_enc = time.perf_counter()
            batch = P.KeypointBatch.build(pending[0][0], pending[0][1], [v for _, _, v in pending], codec,
                                          step=cfg.kp_every, interval_us=int(1e6 * cfg.kp_every / source.fps),
                                          image_id=kp_image_id)
            sent = peer.send_keypoints(batch)
            if cfg.truth_out:
                enc_ms, sent_us = (time.perf_counter() - t_enc) * 1000, time.time_ns() // 1000
                for seq, _, _ in pending:
                    timing[seq][2], timing[seq][4] = enc_ms, sent_us if sent else 0
            if sent:
                stats["frames_sent"] += len(pending)
                stats["messages_sent"] += 1
                stats["keypoint_payload_bytes"] += len(batch.payload)
                kp_sent_at = time.monotonic()
            pending = []

        async for frame in source.frames():
            stats["frames_captured"] += 1
            latest["image"] = frame.image
            # a new framing moves the picture under the keypoints: the receiver needs its source image
            reframed = frame.framing != framing_sent and chosen is None
            if frame.seq == 0 or source_requests or reframed or refresh_due:
                reason = (source_requests.pop() if source_requests else "start" if frame.seq == 0
                          else "re-framed" if reframed else "refresh")
                ok, jpeg = cv2.imencode(".jpg", frame.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, cfg.source_quality])
                if chosen is not None:  # --source-image: that file instead of the frame
                    jpeg = np.frombuffer(chosen, np.uint8)
                flush()  # frames captured for the old image go out named after it
                image_id += 1
                if reason == "start":
                    ready[image_id] = asyncio.Event()  # before it is sent: the answer may come at once
                await peer.send_source(jpeg.tobytes(), image_id)
                if reason == "refresh" and kp_image_id >= 0:
                    switch_at = time.monotonic() + REFRESH_SWITCH_S
                else:
                    switch_at = time.monotonic()
                refresh.source_sent(frame.image, None, time.monotonic())
                stats["source_image_bytes"] += len(jpeg)
                stats["source_sha256"] = hashlib.sha256(jpeg.tobytes()).hexdigest()
                stats["source_images_sent"] += 1
                if reason == "refresh":
                    stats["refresh_images_sent"] += 1
                    stats["refresh_bytes"] += len(jpeg)
                log.info("sent source image %d (%d B, %s)", image_id, len(jpeg), reason)
                if reason == "start":
                    await wait_source_ready(ready[image_id], stats)
                    del ready[image_id]
                    # The stream starts now: this frame counts as captured now and the next one a period
                    # later. Stamped with its read time, the first frame would arrive as old as the wait
                    # and the receiver's jitter buffer would take that for network jitter (a 500 ms
                    # target delay through an impaired link). For a camera it understates this one
                    # frame's latency by the wait.
                    frame = replace(frame, capture_us=time.time_ns() // 1000)
                    source.resync()
                framing_sent = frame.framing
                source_requests.clear()
                refresh_due = False
            if switch_at is not None and time.monotonic() >= switch_at:
                # keypoint messages name the new image from here on; the predictive stream restarts at it
                # with a keyframe, so no residual predicts across two pictures
                flush()
                kp_image_id, switch_at = image_id, None
                if pred is not None:
                    pred.new_source(kp_image_id)
            t0 = time.perf_counter()
            if replay is not None:
                vec = replay[frame.seq % len(replay)]
            else:
                vec = await asyncio.to_thread(extractor, frame.image)
            stats["extract_ms"].append((time.perf_counter() - t0) * 1000)
            # off the hot path: a due estimate goes to a worker, the decision applies to a later frame
            refresh_due = refresh.observe(frame.image, vec, time.monotonic())
            if cfg.truth_out:
                truth_seq.append(frame.seq)
                truth_vec.append(vec)
                # per-frame stage times for bench.latency: read, extract, encode, capture and send instants
                # (send 0: never sent, e.g. skipped by the predictive codec)
                timing[frame.seq] = [frame.read_ms, stats["extract_ms"][-1], 0.0, frame.capture_us, 0]
            if pred is not None:
                t_enc = time.perf_counter()
                if pred.frame(frame.seq, frame.capture_us, vec, time.monotonic()):
                    kp_sent_at = time.monotonic()
                    if cfg.truth_out:
                        timing[frame.seq][2] = (time.perf_counter() - t_enc) * 1000
                        timing[frame.seq][4] = time.time_ns() // 1000
                last = (frame.seq, frame.capture_us, vec)
            else:
                if frame.seq % cfg.kp_every == 0:
                    pending.append((frame.seq, frame.capture_us, vec))
                if len(pending) >= cfg.batch:
                    flush()
            # heartbeats ride on keypoint messages: one goes out only after a silence (congestion,
            # or a stream with nothing to send), so the receiver never takes the sender for gone
            if time.monotonic() - kp_sent_at > HEARTBEAT_S:
                peer.send_control(P.Heartbeat(time.time_ns() // 1000))
                stats["heartbeats_sent"] += 1
                kp_sent_at = time.monotonic()
            if peer.closed.is_set():
                log.warning("receiver ended the call")
                break
        finished = pred is not None and last is not None and not peer.closed.is_set()
        if finished and pred.finish(*last, time.monotonic()) and cfg.truth_out:
            timing[last[0]][4] = time.time_ns() // 1000
    finally:
        stats["duration_s"] = time.monotonic() - t_start
        stats.update(peer.wire_stats())
        stats["keypoint_message_bytes"] = peer.bytes_sent["kp"]
        stats.update(source.framer.stats())
        stats.update(refresh.stats())
        refresh.close()
        stats["kp_dropped_congestion"] = peer.kp_dropped_congestion
        if pred is not None:
            stats.update(pred.summary())
        await peer.close()
        source.close()
    ex = np.array(stats.pop("extract_ms") or [0.0])
    stats["extract_ms_p50"] = float(np.percentile(ex, 50))
    stats["extract_ms_p95"] = float(np.percentile(ex, 95))
    stats["fps"] = source.fps
    stats["frames_late"] = source.late.count
    if cfg.truth_out:
        Path(cfg.truth_out).parent.mkdir(parents=True, exist_ok=True)
        t = np.array([timing[s] for s in truth_seq], dtype=np.float64).reshape(-1, 5)
        np.savez(cfg.truth_out, seq=np.array(truth_seq), vectors=np.array(truth_vec), read_ms=t[:, 0],
                 extract_ms=t[:, 1], encode_ms=t[:, 2], capture_us=t[:, 3].astype(np.int64),
                 sent_us=t[:, 4].astype(np.int64))
    return stats


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
