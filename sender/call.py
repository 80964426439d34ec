"""One sender call: capture -> framing -> keypoints -> (predictive) coding -> data channels.

:class:`SenderCall` runs the call a ``SenderConfig`` describes, frame by frame: it sends the
source image first (and again when the face is re-framed, the receiver asks, or the picture
drifts: ``sender.refresh``), waits for the receiver's ``SourceReady``, then streams each frame's
keypoints, either through the closed-loop predictive codec (``sender.kpsend``: only what the
receiver cannot predict) or as q8/f16 vectors in batches of every k-th frame. Its counters are
a :class:`SenderStats`, as the receiver's are a ``receiver.stats.CallStats``.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import cv2
import numpy as np

from models.fomm.io import detector_id, load_motion_model
from sender.capture import CaptureConfig, CapturedFrame, CaptureError, FrameSource
from sender.config import SenderConfig
from sender.extract import DETECTOR_CACHE_DIR, KeypointExtractor
from sender.framing import Framer, FramingConfig
from sender.inputs import read_source_image
from sender.kpsend import PredictiveSender
from sender.pacing import PacingConfig, announceable_stride, choose_stride, measure_work_ms
from sender.peer import SenderPeer
from sender.priority import worker_pool
from sender.rate import RateConfig, RateController, choose_rate
from sender.refresh import RefreshConfig, RefreshMonitor
from shared import protocol as P
from shared.ice import addresses_for_receiver, restrict_host_addresses
from shared.ice_servers import rtc_configuration
from shared.kpvector import KP_DIM

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5  # a heartbeat goes out only when no keypoint message did for this long
# A refreshed source image frames the face exactly as the one it replaces, so the keypoints fit
# both: they go on naming the old image this long, while the new one travels and the receiver
# decodes and encodes it, so the switch never waits for it (a re-frame switches at once).
REFRESH_SWITCH_S = 0.3
# How long the first frame waits for the receiver's SourceReady (an older receiver never sends one):
# under the receiver's 1.5 s silence timeout, since the sender sends nothing while it waits.
SOURCE_READY_WAIT_S = 1.0
CODECS = {"pred": P.Codec.PRED, "q8": P.Codec.Q8, "f16": P.Codec.F16}
KEYFRAME_COPY_S = 0.1  # a KeyframeRequest naming the same frame within this long is the other channel's copy


@dataclass
class SenderStats:
    """What one call sent; ``to_dict`` is the sender's ``--stats-json`` (with its config)."""

    fps_asked: float = 0.0  # the capture rate asked for
    fps_stride: int = 1  # every k-th frame kept (sender.pacing)
    extract_ms_startup: float | None = None  # the extraction time pacing measured before the call
    frames_captured: int = 0
    frames_sent: int = 0  # frames whose keypoints went out (q8/f16; pred counts in its summary too)
    messages_sent: int = 0  # q8/f16 keypoint messages
    keypoint_payload_bytes: int = 0
    source_image_bytes: int = 0
    source_images_sent: int = 0
    source_sha256: str | None = None  # of the last source image sent
    heartbeats_sent: int = 0
    refresh_images_sent: int = 0
    refresh_bytes: int = 0
    source_ready_ms: float | None = None  # how long the receiver took to say the first image was ready
    duration_s: float = 0.0
    keypoint_message_bytes: int = 0
    kp_dropped_congestion: int = 0
    fps: float = 0.0  # the rate actually captured (after pacing)
    frames_late: int = 0
    extract_ms: list[float] = field(default_factory=list)
    parts: dict[str, Any] = field(default_factory=dict)  # the stages' own stats (peer, framer, refresh, codec)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        ex = np.array(d.pop("extract_ms") or [0.0])
        d["extract_ms_p50"] = float(np.percentile(ex, 50))
        d["extract_ms_p95"] = float(np.percentile(ex, 95))
        d.update(d.pop("parts"))
        if d["source_sha256"] is None:
            del d["source_sha256"]
        return d


def make_refresh(cfg: SenderConfig, model: Any) -> RefreshMonitor:
    """The --refresh stage: off with --source-image; the keypoint estimate when the render one cannot run."""
    mode = "off" if cfg.source_image else cfg.refresh
    rc = RefreshConfig(mode=mode, min_interval_s=cfg.refresh_min_interval, nice=cfg.nice)
    if mode != "render":
        return RefreshMonitor(rc)
    try:
        monitor = RefreshMonitor(rc, model)
    except Exception as e:  # missing weights or a broken model: refresh from keypoints instead
        log.warning("source refresh by rendering unavailable (%s): using the keypoint estimate", e)
        return RefreshMonitor(replace(rc, mode="keypoints"))
    if detector_id(monitor._render.model) != detector_id(model):
        log.warning("the 64x64 estimate model has another keypoint detector: refresh from keypoints instead")
        monitor.close()
        return RefreshMonitor(replace(rc, mode="keypoints"))
    return monitor


def make_framer(cfg: SenderConfig) -> Framer:
    """The --framing stage; face framing falls back to the centre square when dlib is missing."""
    try:
        return Framer(FramingConfig(mode=cfg.framing, size=cfg.size, nice=cfg.nice))
    except (ImportError, RuntimeError) as e:  # dlib-bin not installed (or a dlib that cannot build its detector)
        log.warning("face framing unavailable (%s): using the centre square", e)
        return Framer(FramingConfig(mode="centre", size=cfg.size))


def _nth(k: int) -> str:
    return f"{k}th" if k > 2 else "2nd"


def load_replay(path: str) -> np.ndarray:
    """(N, 60) keypoint vectors saved by ``--truth-out``, for ``--replay-keypoints``."""
    try:
        replay = np.load(path)["vectors"].astype(np.float32)
    except (OSError, KeyError, ValueError) as e:
        raise CaptureError(f"cannot read keypoints from {path}: {e}") from e
    if replay.ndim != 2 or replay.shape[1] != KP_DIM or len(replay) == 0:
        raise CaptureError(f"{path} does not hold (N, {KP_DIM}) keypoint vectors")
    return replay


class SenderCall:
    """One call to a receiver, as ``SenderConfig`` asks; ``await run()`` returns its stats.

    By default the call makes its own peer and signals to ``cfg.receiver`` over HTTP. Given a
    :class:`SenderPeer` on a connection negotiated elsewhere (``peer``, or :meth:`use_peer` before
    :meth:`run`: ``kpcast``'s two-way call), it streams on that peer's channels once they open.
    :meth:`prepare` opens the input and loads the models ahead of the call (``run`` does it
    otherwise), so a call that is answered later starts without that wait.
    """

    def __init__(self, cfg: SenderConfig, peer: SenderPeer | None = None) -> None:
        self.cfg = cfg
        self.peer: SenderPeer | None = None
        self.signaling = True  # this call makes its peer and offers to cfg.receiver; False: use_peer's
        self.prepared = False
        self.stop_reason: str | None = None  # set by stop(): the call ends after the current frame
        self.input_ended = False  # the input ran out (end of file, --max-frames): the call ended here
        # every captured (framed) picture, e.g. a self-view; called on the event loop, so it must be quick
        self.on_frame: Callable[[np.ndarray], None] | None = None
        self.codec = CODECS[cfg.codec]
        self.stats = SenderStats()
        self.pred: PredictiveSender | None = None
        self._last_kf_request: tuple[int, float] | None = None  # (last_seq, monotonic time) of the last one
        # image_id -> the receiver can render it; only images this sender waits for, so a receiver naming
        # others (any number of them) adds nothing
        self.ready: dict[int, asyncio.Event] = {}
        self.source_requests: list[str] = []
        self.pending: list[tuple[int, int, np.ndarray]] = []  # q8/f16 frames batched for the next message
        self.image_id = -1  # the source image sent last (SourceChunk.image_id)
        self.kp_image_id = -1  # the one keypoint messages name: image_id, or the previous one just after a refresh
        self.switch_at: float | None = None  # when keypoints start naming a refreshed image
        self.framing_sent = 0  # the framing generation of the source image the receiver holds
        self.kp_sent_at = time.monotonic()  # the last keypoint message (or heartbeat): liveness for the receiver
        self.refresh_due = False
        # --truth-out: every frame's keypoints and stage times (read, extract, encode, capture and send
        # instants; send 0: never sent, e.g. skipped by the predictive codec) for bench.latency
        self.truth_seq: list[int] = []
        self.truth_vec: list[np.ndarray] = []
        self.timing: dict[int, list[float]] = {}
        if peer is not None:
            self.use_peer(peer)

    # ------------------------------------------------------------------ set-up
    def use_peer(self, peer: SenderPeer) -> None:
        """Stream on ``peer`` (its connection negotiated by someone else) instead of signaling."""
        self.peer, self.signaling = peer, False
        peer.on_message = self._on_message

    def stop(self, reason: str) -> None:
        """End the call after the frame in hand; the Bye says ``reason``."""
        self.stop_reason = reason

    def prepare(self) -> None:
        """Open the input, load the models and time the extraction (once; ``run`` calls it otherwise)."""
        if not self.prepared:
            self._setup()
            self.prepared = True
            # what set-up loaded lives as long as the process: out of the collector's sight, so a full
            # collection during the call (~50 ms over ~200,000 objects, holding the GIL) does not walk it
            gc.collect()
            gc.freeze()

    def _setup(self) -> None:
        import torch

        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        self.model, _ = load_motion_model(cfg.weights)
        self.replay = load_replay(cfg.replay_keypoints) if cfg.replay_keypoints else None
        self.chosen = read_source_image(cfg.source_image) if cfg.source_image else None
        self.source = FrameSource(CaptureConfig(cfg.camera, cfg.video, cfg.fps, cfg.size, cfg.loop,
                                                cfg.max_frames, cfg.mirror), make_framer(cfg))
        self.stats.fps_asked = fps = self.source.fps
        if fps < P.MIN_FPS:  # `python -m sender` refuses such an --fps; kpcast's own CLI only asks for > 0
            self.source.close()
            raise CaptureError(f"{fps:g} fps is under the {P.MIN_FPS:g} fps a receiver accepts")
        # after the input has opened: a missing camera or file fails before the detector is built
        self.extractor = KeypointExtractor(self.model, threads=cfg.threads, cache_dir=DETECTOR_CACHE_DIR)
        self.extract_pool = worker_pool("extract", cfg.nice)  # ONNX Runtime runs on it (one intra-op thread)
        stride = 1
        if cfg.pacing == "auto" and self.replay is None:
            work_ms = measure_work_ms(self.extractor, np.zeros((cfg.size, cfg.size, 3), np.uint8),
                                      PacingConfig().rounds)
            stride = choose_stride(fps, work_ms)
            self.stats.extract_ms_startup = work_ms
        # A receiver takes at most MAX_FPS in a Hello: a faster file (up to 120 fps are read natively) is
        # thinned like a machine that cannot hold its rate, rather than refused by the receiver.
        wire = announceable_stride(fps, stride)
        if stride > 1:
            log.warning("keypoint extraction takes %.0f ms a frame here: %.1f fps cannot be held; sending "
                        "every %s frame, at %.1f fps", work_ms, fps, _nth(wire), fps / wire)
        elif wire > 1:
            log.info("%.1f fps is more than a receiver takes (%g): sending every %s frame, at %.1f fps", fps,
                     P.MAX_FPS, _nth(wire), fps / wire)
        self.stats.fps_stride = wire
        if wire > 1:
            self.source.set_stride(wire)
        if cfg.target_kbps is not None and self.codec != P.Codec.PRED:
            k, b, est, fits = choose_rate(cfg.target_kbps, self.source.fps, self.codec)
            (log.info if fits else log.warning)(
                "target %.1f kbps at %.1f fps: kp_every=%d batch=%d (estimated %.1f kbps%s)", cfg.target_kbps,
                self.source.fps, k, b, est, "" if fits else ", does NOT fit: cheapest setting")
            cfg.kp_every, cfg.batch = k, b
        self.refresh = make_refresh(cfg, self.model)

    def _signaling_peer(self) -> SenderPeer:
        cfg = self.cfg
        # never the receiver's address: it is not one of this host's (README's two-machine call)
        restrict_host_addresses(cfg.ice_address or addresses_for_receiver(urlparse(cfg.receiver).hostname or ""))
        return SenderPeer(self._on_message, rtc_configuration(cfg.ice_options()))

    def _on_message(self, msg: P.Message) -> None:
        """The receiver's control messages (already validated by ``SenderPeer``)."""
        if isinstance(msg, P.SourceReady):
            if msg.image_id in self.ready:
                self.ready[msg.image_id].set()
        elif isinstance(msg, P.SourceRequest):
            self.source_requests.append(msg.reason)
        elif isinstance(msg, P.KeyframeRequest) and self.pred is not None:
            # the receiver sends each request on both channels: the second copy is not a second request
            # (a repeat after its request interval, ~0.25 s, is)
            now = time.monotonic()
            if self._last_kf_request is not None and self._last_kf_request[0] == msg.last_seq \
                    and now - self._last_kf_request[1] < KEYFRAME_COPY_S:
                return
            self._last_kf_request = (msg.last_seq, now)
            log.info("receiver asks for a keyframe (it decoded up to frame %d)", msg.last_seq)
            self.pred.request_keyframe()

    async def _start_stream(self) -> None:
        cfg = self.cfg
        if self.signaling:
            await self.peer.connect(cfg.receiver, cfg.token, timeout_s=cfg.connect_timeout)
        else:
            await self.peer.opened(cfg.connect_timeout)
        ts_base_us = time.time_ns() // 1000  # capture times count from here (fewer bytes per message)
        if self.codec == P.Codec.PRED:
            rate = None if cfg.target_kbps is None else RateController(RateConfig(cfg.target_kbps), cfg.tolerance)
            self.pred = PredictiveSender(self.peer.send_keypoints, cfg.pred_config(), ts_base_us, rate,
                                         bundle=cfg.bundle)
        self.peer.send_control(P.Hello(model=detector_id(self.model), size=cfg.size, fps=self.source.fps,
                                       codec=int(self.codec), kp_every=cfg.kp_every, ts_base_us=ts_base_us,
                                       pred=self.pred.hello_params() if self.pred is not None else None))

    # ------------------------------------------------------------------ the call
    async def run(self) -> dict[str, Any]:
        """The whole call; returns ``SenderStats.to_dict()``."""
        self.prepare()
        if self.peer is None:
            self.peer = self._signaling_peer()
        t_start = time.monotonic()
        last: tuple[int, int, np.ndarray] | None = None
        try:
            await self._start_stream()
            async for frame in self.source.frames():
                self.stats.frames_captured += 1
                if self.on_frame is not None:
                    self.on_frame(frame.image)
                frame = await self._source_image_if_due(frame)
                self._switch_if_due()
                vec = await self._keypoints(frame)
                self._send(frame, vec)
                if self.pred is not None:
                    last = (frame.seq, frame.capture_us, vec)
                self._heartbeat_if_quiet()
                if self.peer.closed.is_set():
                    log.warning("receiver ended the call")
                    break
                if self.stop_reason is not None:
                    log.info("ending the call: %s", self.stop_reason)
                    break
            else:
                self.input_ended = True
            finished = self.pred is not None and last is not None and not self.peer.closed.is_set()
            if finished and self.pred.finish(*last, time.monotonic()) and self.cfg.truth_out:
                for seq in self.pred.last_sent_seqs:
                    self.timing[seq][4] = time.time_ns() // 1000
        finally:
            await self._close(time.monotonic() - t_start)
        self.stats.fps = self.source.fps
        self.stats.frames_late = self.source.late.count
        if self.cfg.truth_out:
            self._write_truth(Path(self.cfg.truth_out))
        return self.stats.to_dict()

    async def _source_image_if_due(self, frame: CapturedFrame) -> CapturedFrame:
        """Send a new source image when the call starts, the receiver asks, the face was re-framed or the
        picture drifted; returns the frame (restamped after the first image's wait)."""
        # a new framing moves the picture under the keypoints: the receiver needs its source image
        reframed = frame.framing != self.framing_sent and self.chosen is None
        if not (frame.seq == 0 or self.source_requests or reframed or self.refresh_due):
            return frame
        st = self.stats
        reason = (self.source_requests.pop() if self.source_requests else "start" if frame.seq == 0
                  else "re-framed" if reframed else "refresh")
        ok, jpeg = cv2.imencode(".jpg", frame.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, self.cfg.source_quality])
        if self.chosen is not None:  # --source-image: that file instead of the frame
            jpeg = np.frombuffer(self.chosen, np.uint8)
        self._flush()  # frames captured for the old image go out named after it
        self.image_id += 1
        if reason == "start":
            self.ready[self.image_id] = asyncio.Event()  # before it is sent: the answer may come at once
        await self.peer.send_source(jpeg.tobytes(), self.image_id)
        if reason == "refresh" and self.kp_image_id >= 0:
            self.switch_at = time.monotonic() + REFRESH_SWITCH_S
        else:
            self.switch_at = time.monotonic()
        self.refresh.source_sent(frame.image, None, time.monotonic())
        st.source_image_bytes += len(jpeg)
        st.source_sha256 = hashlib.sha256(jpeg.tobytes()).hexdigest()
        st.source_images_sent += 1
        if reason == "refresh":
            st.refresh_images_sent += 1
            st.refresh_bytes += len(jpeg)
        log.info("sent source image %d (%d B, %s)", self.image_id, len(jpeg), reason)
        if reason == "start":
            await self._wait_source_ready(self.ready[self.image_id])
            del self.ready[self.image_id]
            # The stream starts now: this frame counts as captured now and the next one a period
            # later. Stamped with its read time, the first frame would arrive as old as the wait
            # and the receiver's jitter buffer would take that for network jitter (a 500 ms
            # target delay through an impaired link). For a camera it understates this one
            # frame's latency by the wait.
            frame = replace(frame, capture_us=time.time_ns() // 1000)
            self.source.resync()
        self.framing_sent = frame.framing
        self.source_requests.clear()
        self.refresh_due = False
        return frame

    async def _wait_source_ready(self, ready: asyncio.Event, timeout_s: float = SOURCE_READY_WAIT_S) -> None:
        """Wait until the receiver can render against the first source image (``P.SourceReady``).

        Keypoints sent before that only queue behind the image: the receiver then drops them to catch
        up (the demo lost 4-5 of its first frames this way). A receiver that never says so (an older
        one) costs ``timeout_s`` once."""
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(ready.wait(), timeout_s)
            self.stats.source_ready_ms = (time.monotonic() - t0) * 1000
            log.info("receiver ready to render after %.0f ms", self.stats.source_ready_ms)
        except TimeoutError:
            log.info("no word from the receiver that the source image is ready after %.1f s: starting anyway",
                     timeout_s)

    def _switch_if_due(self) -> None:
        if self.switch_at is None or time.monotonic() < self.switch_at:
            return
        # keypoint messages name the new image from here on; the predictive stream restarts at it
        # with a keyframe, so no residual predicts across two pictures
        self._flush()
        self.kp_image_id, self.switch_at = self.image_id, None
        if self.pred is not None:
            self.pred.new_source(self.kp_image_id)

    async def _keypoints(self, frame: CapturedFrame) -> np.ndarray:
        t0 = time.perf_counter()
        if self.replay is not None:
            vec = self.replay[frame.seq % len(self.replay)]
        else:
            vec = await asyncio.get_running_loop().run_in_executor(self.extract_pool, self.extractor, frame.image)
        self.stats.extract_ms.append((time.perf_counter() - t0) * 1000)
        # off the hot path: a due estimate goes to a worker, the decision applies to a later frame
        self.refresh_due = self.refresh.observe(frame.image, vec, time.monotonic())
        if self.cfg.truth_out:
            self.truth_seq.append(frame.seq)
            self.truth_vec.append(vec)
            self.timing[frame.seq] = [frame.read_ms, self.stats.extract_ms[-1], 0.0, frame.capture_us, 0]
        return vec

    def _send(self, frame: CapturedFrame, vec: np.ndarray) -> None:
        """This frame's keypoints: coded (pred: sent only when the receiver cannot predict them) or batched."""
        if self.pred is not None:
            t_enc = time.perf_counter()
            if self.pred.frame(frame.seq, frame.capture_us, vec, time.monotonic()):
                self.kp_sent_at = time.monotonic()
                if self.cfg.truth_out:
                    self.timing[frame.seq][2] = (time.perf_counter() - t_enc) * 1000
                    for seq in self.pred.last_sent_seqs:  # this frame, and one that waited to share its message
                        self.timing[seq][4] = time.time_ns() // 1000
            return
        if frame.seq % self.cfg.kp_every == 0:
            self.pending.append((frame.seq, frame.capture_us, vec))
        if len(self.pending) >= self.cfg.batch:
            self._flush()

    def _flush(self) -> None:
        """Send the batched frames (q8/f16), named after the image they were captured for."""
        if not self.pending:
            return
        cfg, pending = self.cfg, self.pending
        t_enc = time.perf_counter()
        batch = P.KeypointBatch.build(pending[0][0], pending[0][1], [v for _, _, v in pending], self.codec,
                                      step=cfg.kp_every, interval_us=int(1e6 * cfg.kp_every / self.source.fps),
                                      image_id=self.kp_image_id)
        sent = self.peer.send_keypoints(batch)
        if cfg.truth_out:
            enc_ms, sent_us = (time.perf_counter() - t_enc) * 1000, time.time_ns() // 1000
            for seq, _, _ in pending:
                self.timing[seq][2], self.timing[seq][4] = enc_ms, sent_us if sent else 0
        if sent:
            self.stats.frames_sent += len(pending)
            self.stats.messages_sent += 1
            self.stats.keypoint_payload_bytes += len(batch.payload)
            self.kp_sent_at = time.monotonic()
        self.pending = []

    def _heartbeat_if_quiet(self) -> None:
        # heartbeats ride on keypoint messages: one goes out only after a silence (congestion,
        # or a stream with nothing to send), so the receiver never takes the sender for gone
        if time.monotonic() - self.kp_sent_at > HEARTBEAT_S:
            self.peer.send_control(P.Heartbeat(time.time_ns() // 1000))
            self.stats.heartbeats_sent += 1
            self.kp_sent_at = time.monotonic()

    async def _close(self, duration_s: float) -> None:
        st = self.stats
        st.duration_s = duration_s
        st.parts.update(self.peer.wire_stats())
        st.keypoint_message_bytes = self.peer.bytes_sent["kp"]
        st.parts.update(self.source.framer.stats())
        st.parts.update(self.refresh.stats())
        self.refresh.close()
        st.kp_dropped_congestion = self.peer.kp_dropped_congestion
        if self.pred is not None:
            st.parts.update(self.pred.summary())
        await self.peer.close(self.stop_reason or "done")
        self.source.close()
        self.extract_pool.shutdown(wait=False)

    def _write_truth(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        t = np.array([self.timing[s] for s in self.truth_seq], dtype=np.float64).reshape(-1, 5)
        np.savez(path, seq=np.array(self.truth_seq), vectors=np.array(self.truth_vec), read_ms=t[:, 0],
                 extract_ms=t[:, 1], encode_ms=t[:, 2], capture_us=t[:, 3].astype(np.int64),
                 sent_us=t[:, 4].astype(np.int64))
