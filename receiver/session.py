"""One call on the receiver: decode -> buffer -> (forecast) -> render -> sink, plus its stats.

Everything a peer sends goes through ``shared.protocol.decode`` and per-call checks;
a bad message is counted and dropped, never raised into aiortc's event handlers.

A peer holds its slot only while it behaves like a caller (``receiver.liveness``).

Source images: a keypoint message may name the image it refers to (``image_id``); such a frame
is rendered only against that image (``receiver.sources``). A new image is decoded and encoded
as soon as it is complete but used only from its first frame on; until it is complete its frames
wait with the last picture held (``frames_source_wait``), and frames of an image already replaced,
or given up as never coming, are dropped (``frames_old_image``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from aiortc import RTCDataChannel, RTCPeerConnection

from receiver.adapt import TierChange
from receiver.batching import RenderBatcher
from receiver.framelog import FramesLog
from receiver.immediate import ImmediatePlayout, QueuedFrame
from receiver.jitter_buffer import JitterConfig
from receiver.kpstream import PredictiveStream, StreamFrame
from receiver.liveness import Liveness
from receiver.render import Renderer
from receiver.seqfilter import SequenceFilter
from receiver.sinks import Sink, make_sink
from receiver.sources import SourceRouter
from receiver.stats import CallStats
from receiver.tiers import TieredRenderer
from shared import protocol as P
from shared import source_image as S
from shared.channels import CHANNEL_LABELS, CONTROL_LABEL, KEYPOINT_LABEL, transport_counters
from shared.errors import RejectCounter

log = logging.getLogger(__name__)

MAX_SOURCE_PIXELS = S.MAX_SOURCE_PIXELS
# The concealment forecaster with the lowest keypoint error on held-out clips (bench.forecast).
DEFAULT_FORECASTER = "last"
DEFAULT_MAX_DELAY_MS = 40.0  # SessionConfig.max_delay_ms


@dataclass
class SessionConfig:
    sink: str = "null"  # null | window | file:PATH
    playout: str = "clock"  # clock: steady fps from a jitter buffer with concealment; immediate: render on arrival
    forecaster: str = DEFAULT_FORECASTER  # conceals missing keypoints in clock mode
    heartbeat_timeout_s: float = 1.5  # aiortc only reports "failed" after ~30 s, so we watch liveness ourselves
    # Before the first message the DTLS/SCTP handshake may still be retransmitting (1-3 s timers
    # per lost packet on a lossy path), so the peer gets as long as the sender's connect timeout.
    setup_timeout_s: float = 15.0
    # Once the transport delivers anything, an honest sender's Hello is its first message on
    # the control channel (keypoints may overtake it only while it is being retransmitted,
    # ~1 s per loss), so a peer without a valid Hello this long after its first message is not a caller.
    hello_timeout_s: float = 5.0
    max_messages_per_s: float = 400.0  # beyond this a peer's messages are dropped (rate_limited)
    max_message_bytes: int = P.MAX_MESSAGE_BYTES
    lookahead_ms: float = 0.0  # render-ahead for latency hiding (clock mode)
    # Low-delay playout (clock mode): the jitter buffer's target delay never exceeds this; a frame later
    # than that is shown as the codec predicts it when due (a forecast, blended out when the stream
    # resumes, beyond the codec's reach) instead of waited for. 40 ms: on 40 ms + 50 ms jitter + 10 %
    # loss it took the median latency from 142 to 112 ms and the 95th percentile from 166 to 127 at
    # 0.002 SSIM and 0.017 mouth correlation (5 runs each, docs/RESULTS.md "Low-delay playout");
    # 35 ms cost 0.07 of mouth correlation. 1000: the buffer follows the 95th percentile of arrivals.
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS
    # Clock mode: render a frame whose keypoints are already in ahead of its due time, by about one render,
    # and show it when due, instead of starting the render when it falls due and showing it a render late
    # (the decoder's lead of WebRTC's timing model). A frame not yet in is still waited for until it is
    # due, then concealed as before: no keypoint deadline moves, so the picture is the same.
    early_render: bool = True
    # Benchmark aid, off by default: write every frame shown (seq, kind, vector, capture and
    # render time, ...) to this .npz when the call ends, so keypoint error against the sender's
    # ``--truth-out`` can be computed offline. Later calls get ``_2``, ``_3``... like file sinks.
    frames_log: str | None = None


SOURCE_BURST_S = 0.1  # after the source image is ready, keypoints may still be draining out of SCTP
EARLY_RENDER_SLACK_S = 0.002  # SessionConfig.early_render: the sink's share of a frame's lead
EARLY_RENDER_MAX = 0.6  # ... and its lead at most this share of a frame period


class CallSession:
    def __init__(self, call_id: str, index: int, pc: RTCPeerConnection, renderer: Renderer,
                 executor: Executor, config: SessionConfig,
                 on_closed: Callable[[CallSession], None] | None = None,
                 batcher: RenderBatcher | None = None) -> None:
        self.call_id = call_id
        self.index = index
        self.pc = pc
        self.renderer = renderer
        self.executor = executor
        # shared by the receiver's calls so their frames render in one batch (receiver.batching)
        self.batcher = batcher if batcher is not None else RenderBatcher(executor, max_batch=1)
        self.config = config
        self.on_closed = on_closed
        self.stats = CallStats(call_id)
        self.stats.regions = renderer.region_counts  # the renderer counts its frames through the region stage
        self.hello: P.Hello | None = None
        self.assembler = S.SourceAssembler()
        self.sources = SourceRouter()  # which image each frame is rendered against
        self.seq_filter = SequenceFilter()
        self.rejects = RejectCounter(counts=self.stats.rejected)
        self.sink: Sink | None = None
        self.control: RTCDataChannel | None = None
        self.kp_channel: RTCDataChannel | None = None
        self._channels: set[str] = set()
        self.liveness = Liveness(config.heartbeat_timeout_s, config.setup_timeout_s, config.hello_timeout_s)
        self.closed = asyncio.Event()
        # set once close() has finished (frames log written, transport closed); closed is set when it starts
        self._close_done = asyncio.Event()
        self._closing_task: asyncio.Task | None = None
        self.immediate = ImmediatePlayout()  # --playout immediate (the clock's Playout is made at the Hello)
        self.kp_stream: PredictiveStream | None = None  # the decoder of a predictive (Codec.PRED) call
        self._wake = asyncio.Event()
        self._rate_window: collections.deque[float] = collections.deque()
        self._source_task: asyncio.Task | None = None
        self._next_source: tuple[bytes, int] | None = None  # complete while another image was decoding
        self._tasks: list[asyncio.Task] = []
        self.playout = None
        self._last_image: np.ndarray | None = None
        self._last_vector: np.ndarray | None = None  # what _last_image shows
        self._picture_gen = 0  # bumped when the renderer changes (image or tier): see _new_picture
        self.frames_log: FramesLog | None = FramesLog() if config.frames_log else None
        self._tick_ms = 0.0  # time the last playout decision took (buffer + forecast)
        self.on_frame: Callable[[np.ndarray], None] | None = None  # every shown frame, e.g. to the viewer

    # ------------------------------------------------------------------ wiring
    def attach(self, channel: RTCDataChannel) -> None:
        """Listen to the sender's two channels; any other (or a second one of a label) is ignored."""
        if channel.label not in CHANNEL_LABELS or channel.label in self._channels:
            log.warning("call %s: ignoring extra data channel %.40r", self.call_id, channel.label)
            self.rejects.reject(P.ProtocolError("channel", "unexpected data channel"))
            return
        self._channels.add(channel.label)
        if channel.label == CONTROL_LABEL:
            self.control = channel
        else:
            self.kp_channel = channel
        channel.on("message", lambda data, label=channel.label: self.on_message(label, data))

    def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._render_loop()))
        self._tasks.append(asyncio.ensure_future(self._watchdog()))

    # ------------------------------------------------------------------ input
    def on_message(self, label: str, data: bytes | str) -> None:
        """Entry point for every data-channel message; never raises."""
        try:
            self._on_message(label, data)
        except P.ProtocolError as e:
            self.rejects.reject(e)
        except Exception as e:  # a bug here must not take the receiver down
            log.exception("call %s: error handling a message", self.call_id)
            self.rejects.reject(P.ProtocolError("internal", str(e)))

    def _on_message(self, label: str, data: bytes | str) -> None:
        now = time.monotonic()
        self.liveness.message(now)
        self.stats.messages_received += 1
        self.stats.bytes_received += len(data)
        self._rate_window.append(now)
        while self._rate_window and self._rate_window[0] < now - 1.0:
            self._rate_window.popleft()
        if len(self._rate_window) > self.config.max_messages_per_s:
            raise P.ProtocolError("rate_limited", f"more than {self.config.max_messages_per_s:.0f} messages/s")
        try:
            msg = P.decode(data, self.config.max_message_bytes)
        except P.ProtocolError as e:
            if e.reason == "version":
                self._refuse_version(data, e)
            raise
        if isinstance(msg, P.KeypointBatch):
            if label != KEYPOINT_LABEL:
                raise P.ProtocolError("channel", "keypoints on the control channel")
            self._on_keypoints(msg, len(data), now)
        elif isinstance(msg, P.CodedKeypoints):
            if label != KEYPOINT_LABEL:
                raise P.ProtocolError("channel", "keypoints on the control channel")
            self._on_coded(msg, len(data), now)
        elif isinstance(msg, P.Hello):
            self._on_hello(msg)
        elif isinstance(msg, P.SourceChunk):
            blob = self.assembler.add(msg)
            if blob is not None:
                if self._source_task is not None and not self._source_task.done():
                    # decoded when the current one is done (a re-frame right after a refresh must not be
                    # lost: its keypoints wait for it); only the newest waits, so a flood costs nothing more
                    replaced, self._next_source = self._next_source, (blob, msg.image_id)
                    if replaced is not None:
                        raise P.ProtocolError("busy", "source image superseded while the previous one was decoding")
                else:
                    self._source_task = asyncio.ensure_future(self._set_sources(blob, msg.image_id))
        elif isinstance(msg, P.Bye):
            log.info("call %s: peer said bye (%s)", self.call_id, msg.reason)
            asyncio.ensure_future(self._drain_and_close(f"bye: {msg.reason}"))
        # Heartbeat: nothing but liveness; SourceRequest and KeyframeRequest are for senders.
        self.liveness.valid(now)  # reached only by a message that decoded and passed the call's checks

    def _refuse_version(self, data: bytes | str, err: P.ProtocolError) -> None:
        """A peer of an older protocol version: tell it, in its own version, and hang up.

        Only before a valid Hello: a peer that said Hello speaks this version, and one odd
        message from it is just a rejected message.
        """
        if self.hello is not None or self.closed.is_set() or isinstance(data, str):
            return
        reason = f"{err.detail}; upgrade kpcast"
        bye = P.legacy_bye(data, reason)
        if bye is None:
            return
        log.warning("call %s: %s, hanging up", self.call_id, reason)
        if self.control is not None and self.control.readyState == "open":
            self.control.send(bye)
        asyncio.ensure_future(self.close("unsupported protocol version"))

    def _on_hello(self, hello: P.Hello) -> None:
        # Keypoints mean something only to a renderer trained with the same detector; the
        # output size does not matter (the source image is resized to the receiver's model).
        if hello.model != self.renderer.detector_id:
            self.send(P.Bye(f"keypoint detector {hello.model!r} != receiver's {self.renderer.detector_id!r}"))
            asyncio.ensure_future(self.close("detector mismatch"))
            raise P.ProtocolError("field", f"sender detector {hello.model!r} != {self.renderer.detector_id!r}")
        stream = PredictiveStream.from_hello(hello) if hello.codec == P.Codec.PRED else None  # may raise
        first = self.hello is None
        self.hello = hello
        self.kp_stream = stream
        self.stats.hello = {"model": hello.model, "size": hello.size, "fps": hello.fps,
                            "codec": P.Codec(hello.codec).name, "kp_every": hello.kp_every}
        if hello.pred is not None:
            self.stats.hello["pred"] = dataclasses.asdict(hello.pred)
        if not first:  # the sender restarted its stream: its sequence numbers start over
            self.seq_filter.reset()
            self.sources.restart()
            self.immediate.reset()
            if self.playout is not None:
                self.playout.reset()
        if first:
            self.sink = make_sink(self.config.sink, hello.fps, self.renderer.size, self.index)
            if isinstance(self.renderer, TieredRenderer):
                self.renderer.set_fps(hello.fps)  # the render budget is one frame of this call
            self.stats.render_size = getattr(self.renderer, "tier", self.renderer.size)
            if self.config.playout == "clock":
                from models.forecast import load_forecaster
                from receiver.playout import Playout, PlayoutConfig
                jitter = JitterConfig(max_delay_ms=self.config.max_delay_ms,
                                      initial_delay_ms=min(JitterConfig.initial_delay_ms, self.config.max_delay_ms))
                self.playout = Playout(PlayoutConfig(fps=hello.fps, forecaster=load_forecaster(self.config.forecaster),
                                                     kp_every=hello.kp_every, lookahead_ms=self.config.lookahead_ms,
                                                     predictor=self._predict_at, jitter=jitter))
                if not self.renderer.ready:
                    self.playout.buffer.ignore_delays_until(float("inf"))  # until the source is in

    def _predict_at(self, seq: int) -> np.ndarray | None:
        """The playout's closed-loop predictor: the current stream's (a restart replaces the stream)."""
        return self.kp_stream.predict_at(seq) if self.kp_stream is not None else None

    def _on_keypoints(self, batch: P.KeypointBatch, nbytes: int, now: float) -> None:
        if self.hello is None:
            raise P.ProtocolError("order", "keypoints before hello")
        if self.kp_stream is not None:
            raise P.ProtocolError("codec", "a keypoint batch in a predictive call")
        self.stats.keypoint_messages += 1
        self.stats.keypoint_message_bytes += nbytes
        self.stats.keypoint_payload_bytes += len(batch.payload)
        for seq, capture_us, vec in batch.frames():
            try:
                self.seq_filter.check(seq)
                if not self.sources.admit(seq, batch.image_id, now):
                    self.stats.frames_old_image += 1  # its image was replaced: never shown on the new one
                    continue
            except P.ProtocolError as e:
                self.rejects.reject(e)
                continue
            self.stats.frames_received += 1
            if self.frames_log is not None:
                self.frames_log.arrived(seq)
            self._deliver(seq, capture_us, vec, now, skipped=False)
        self._wake.set()

    def _on_coded(self, msg: P.CodedKeypoints, nbytes: int, now: float) -> None:
        if self.hello is None:
            raise P.ProtocolError("order", "keypoints before hello")
        if self.kp_stream is None:
            raise P.ProtocolError("codec", "coded keypoints in a call whose Hello announced another codec")
        st = self.stats
        st.keypoint_messages += 1
        st.keypoint_message_bytes += nbytes
        st.keypoint_payload_bytes += len(msg.payload)
        if not self.sources.admit(msg.seq, msg.image_id, now):
            # a frame of a replaced image: the new image's chain starts at a keyframe and needs none of it
            st.frames_old_image += 1
            return
        try:
            frames: list[StreamFrame] = self.kp_stream.push(msg)
        finally:  # a broken chain asks for a keyframe whatever this message was
            request = self.kp_stream.keyframe_request(now)
            if request is not None:
                self.send(request)
                # also on the keypoint channel: the control channel is reliable and ordered, so a request
                # queued behind a lost chunk waits for SCTP's retransmission timeout (~1 s: 30 frames
                # concealed), while an unreliable copy gets through at the next try
                self.send_unreliable(request)
                st.keyframe_requests += 1
        st.keyframes_received += int(msg.key)
        for f in frames:
            if self.sources.is_old(f.seq):  # e.g. skipped frames before the new image's keyframe, filled in late
                st.frames_old_image += 1
                continue
            st.frames_received += 1
            st.frames_skipped += int(f.skipped)
            if self.frames_log is not None:
                self.frames_log.arrived(f.seq)
            self._deliver(f.seq, f.capture_us, f.vector, now, skipped=f.skipped)
        self._wake.set()

    def _deliver(self, seq: int, capture_us: int, vec: np.ndarray, now: float, skipped: bool) -> None:
        """One accepted frame to the playout clock, or to the immediate render queue."""
        if self.playout is not None:
            if not self.playout.push(seq, capture_us, vec, now, predicted=skipped) and not skipped:
                self.rejects.reject(P.ProtocolError("late", f"seq {seq} arrived after its playout time"))
            return
        if not self.immediate.push(QueuedFrame(seq, capture_us, vec, skipped)):  # e.g. no source image yet
            self.stats.frames_dropped += 1

    async def _set_sources(self, blob: bytes, image_id: int) -> None:
        """Decode this image, then any that completed meanwhile (the newest only)."""
        while True:
            await self._set_source(blob, image_id)
            if self._next_source is None or self.closed.is_set():
                return
            (blob, image_id), self._next_source = self._next_source, None

    async def _set_source(self, blob: bytes, image_id: int = 0) -> None:
        try:
            S.source_image_size(blob)  # from the header: a decoder allocates what it claims
        except P.ProtocolError as e:
            self.rejects.reject(e)
            return
        # Even a picture within the limit takes tens of ms to decode: off the event loop, so
        # other calls and /health do not wait for it (and not on the render worker either).
        img = await asyncio.get_running_loop().run_in_executor(None, _decode_image, blob)
        if self.closed.is_set():
            return
        if img is None or img.ndim != 3 or img.shape[0] * img.shape[1] > MAX_SOURCE_PIXELS:
            self.rejects.reject(P.ProtocolError("source_image", "source image does not decode to a sane picture"))
            return
        rgb = np.ascontiguousarray(img[..., ::-1])
        prepared = await asyncio.get_running_loop().run_in_executor(self.executor, self.renderer.prepare, rgb)
        if self.closed.is_set():
            return
        router = self.sources
        if not self.renderer.ready or not router.tagged:
            # the first image (nothing else to show), or a sender that does not name images: use it now
            self.renderer.use(prepared)
            router.switch(image_id)
            self._new_picture()
        else:  # used from its first frame on: frames of the image in use may still be in the buffer
            router.add_ready(image_id, prepared)
        self.stats.source_image_bytes += len(blob)
        self.stats.source_sha256 = hashlib.sha256(blob).hexdigest()
        self.stats.source_images += 1
        log.info("call %s: source image %dx%d (%d B) ready", self.call_id, img.shape[1], img.shape[0], len(blob))
        self.send(P.SourceReady(image_id))  # the sender starts its frames on it (shared.protocol)
        if self.playout is not None:
            # Keypoints sent while the image was on its way queued behind it on the SCTP
            # association and arrive as one burst: not network jitter (see jitter_buffer).
            self.playout.buffer.ignore_delays_until(time.monotonic() + SOURCE_BURST_S)
        self._wake.set()

    # ------------------------------------------------------------------ output
    def send(self, msg: P.Message) -> None:
        if self.control is not None and self.control.readyState == "open":
            self.control.send(P.encode(msg))

    def send_unreliable(self, msg: P.KeyframeRequest) -> None:
        """On the keypoint channel (unordered, no retransmissions): only what may be lost and repeated."""
        if self.kp_channel is not None and self.kp_channel.readyState == "open":
            self.kp_channel.send(P.encode(msg))

    def request_source(self, reason: str) -> None:
        """Ask the sender for a fresh source image (e.g. the scene changed)."""
        self.send(P.SourceRequest(reason))

    async def _render(self, seq: int, capture_us: int, vec: np.ndarray, frame: Any = None,
                      show_at: float | None = None) -> None:
        t0 = time.perf_counter()
        gen = self._picture_gen
        image, together = await self.batcher.render_counted(self.renderer.job(vec), self)
        t1 = time.perf_counter()
        if show_at is not None:  # rendered early: shown when due, not before
            await self._hold_until(show_at)
        t_show = time.perf_counter()
        self.stats.render_batch.append(together)
        self.stats.render_ms.append((t1 - t0) * 1000)
        if isinstance(self.renderer, TieredRenderer):
            change = self.renderer.observe(time.monotonic(), (t1 - t0) * 1000)
            if change is not None:
                self._tasks.append(asyncio.ensure_future(self._change_tier(change)))
        if self.sink is not None:
            self.sink.write(image, seq)
        if self.on_frame is not None:
            self.on_frame(image)
        self._last_image = image
        # what the picture shows, unless the renderer changed while it was drawn (then nothing may reuse it)
        self._last_vector = np.asarray(vec, np.float32).reshape(-1) if gen == self._picture_gen else None
        self.stats.frames_rendered += 1
        self.stats.render_times.append(time.monotonic())
        self.stats.latency_ms.append(time.time() * 1000 - capture_us / 1000)
        self._log_frame(seq, capture_us, vec, frame, repeated=False, render_start_us=int(
            time.time_ns() // 1000 - (time.perf_counter() - t0) * 1e6), render_ms=(t1 - t0) * 1000,
            sink_ms=(time.perf_counter() - t_show) * 1000)

    def _log_frame(self, seq: int, capture_us: int, vec: np.ndarray, frame: Any, repeated: bool,
                   render_start_us: int = 0, render_ms: float = 0.0, sink_ms: float = 0.0,
                   reused: bool = False) -> None:
        """One shown frame to the frames log (``frame``: the PlayoutFrame, None when immediate)."""
        if self.frames_log is None:
            return
        played = {} if frame is None else {"lookahead": frame.lookahead, "blend": frame.blend,
                                            "target_delay_ms": frame.target_delay_ms, "tick_ms": self._tick_ms}
        self.frames_log.shown(seq, frame.kind if frame is not None else None, vec, capture_us, repeated,
                              render_start_us=render_start_us, render_ms=render_ms, sink_ms=sink_ms, reused=reused,
                              **played)

    def _frames_log_path(self) -> Path:
        path = Path(self.config.frames_log)
        return path.with_name(f"{path.stem}_{self.index + 1}{path.suffix}") if self.index > 0 else path

    async def _render_loop(self) -> None:
        while not self.closed.is_set():
            if self.playout is not None:
                await self._tick_clock()
                continue
            await self._wake.wait()
            self._wake.clear()
            while self.renderer.ready and not self.closed.is_set():
                step = self.immediate.next(lambda seq: self._route(seq, switch_ok=True), self._shows)
                if step is None:
                    break
                what, f = step
                if what == "render":
                    await self._render(f.seq, f.capture_us, f.vector)
                    self.stats.frames_predicted += int(f.skipped)
                elif what == "same":
                    self._repeat(f.seq, f.capture_us, f.vector, None)
                    self.stats.frames_predicted += 1
                elif what == "old":
                    self.stats.frames_old_image += 1
                else:  # behind real time, or reordered
                    self.stats.frames_dropped += 1

    def _lead_s(self, period: float) -> float:
        """How long before a frame's due time its render starts (``early_render``): the recent median render
        time and 2 ms for the sink, at most 60 % of a frame period (the clock must still tick every period)."""
        recent = self.stats.render_ms[-9:]
        if not self.config.early_render or not recent:
            return 0.0
        return min(float(np.median(recent)) / 1000.0 + EARLY_RENDER_SLACK_S, EARLY_RENDER_MAX * period)

    async def _until_in_or(self, deadline: float) -> None:
        """Return once the frame after the playout's cursor is buffered, or at ``deadline``."""
        while not self.playout.next_in() and not self.closed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    @staticmethod
    async def _hold_until(t: float) -> None:
        left = t - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)

    async def _tick_clock(self) -> None:
        period = 1.0 / self.hello.fps
        next_tick = time.monotonic()  # when the next frame is shown (its due time, phase-locked)
        while not self.closed.is_set():
            lead = self._lead_s(period)
            now = time.monotonic()
            if now < next_tick - lead:
                await asyncio.sleep(next_tick - lead - now)
            if lead > 0 and self.renderer.ready:
                await self._until_in_or(next_tick)  # render now if its keypoints are in, else when due
            show_at = next_tick
            next_tick += period
            if time.monotonic() - next_tick > period:  # renderer fell behind: don't burst to catch up
                next_tick = time.monotonic() + period
            if not self.renderer.ready:
                # Keypoints that arrive while the source image is still decoding stay buffered;
                # ticking now would consume them without anything to render them with.
                continue
            t_tick = time.perf_counter()
            now = time.monotonic()
            shown = max(now, show_at)
            frame = self.playout.tick(shown)  # the frame for the time it will be shown
            self._tick_ms = (time.perf_counter() - t_tick) * 1000
            due = self.playout.next_due_s()
            if due is not None:  # phase-locked: show the next frame when it falls due, 0.5 to 1.5 periods on
                next_tick = min(max(due, shown + 0.5 * period), shown + 1.5 * period)
            if frame is None:
                continue
            if frame.repeated and self._last_image is not None:
                # the playout holds a frame to let the buffer refill: show it again, don't re-render
                await self._hold_until(show_at)
                self._repeat(frame.seq, frame.capture_us, frame.vector, frame)
                continue
            vector = frame.vector
            held = self.sources.held
            route = self._route(frame.seq, switch_ok=frame.kind == "real")
            if route != "ok":
                # a frame of an image not complete yet (or made up from the old image's frames): hold the
                # last picture rather than draw these keypoints on a picture they do not belong to
                self.stats.frames_source_wait += 1
                if self._last_image is not None:
                    await self._hold_until(show_at)
                    self._repeat(frame.seq, frame.capture_us, frame.vector, frame)
                continue
            if self.sources.held != held:  # switched: the old image's frames must not shape this one's
                clean = self.playout.forget_before(frame.seq)
                vector = clean if clean is not None else vector
            if self._shows(vector):
                # the keypoints of the picture on screen (a frame the sender skipped, or one predicted or
                # concealed as the last): a render would draw the same picture, so show it when due, without
                # rendering (no render time, and no render's delay for a frame that was not in early)
                await self._hold_until(show_at)
                self._reuse(frame.seq, frame.capture_us, vector, frame)
            else:
                await self._render(frame.seq, frame.capture_us, vector, frame, show_at=show_at)
            # counted once shown, like frames_rendered: a render cut off by the hang-up counts in neither
            if frame.kind == "concealed":
                self.stats.frames_concealed += 1
            elif frame.kind == "interpolated":
                self.stats.frames_interpolated += 1
            elif frame.kind == "predicted":
                self.stats.frames_predicted += 1
            else:
                self.stats.frames_real += 1

    def _route(self, seq: int, switch_ok: bool) -> str:
        """Whether frame ``seq`` can be rendered now: "ok" (switching images if it starts a new one),
        "wait" (its image is not ready, or ``switch_ok`` is False for the frame that would switch),
        "old" (its image was replaced)."""
        router = self.sources
        need = router.image_for(seq)
        if need is None or router.held is None or need == router.held:
            return "ok"
        if need < router.held:
            return "old"
        prepared = router.ready(need)
        if prepared is None or not switch_ok:
            return "wait"
        self.renderer.use(prepared)
        router.switch(need)
        self._new_picture()  # the picture on screen is the old image's
        self.stats.source_switches += 1
        return "ok"

    async def _change_tier(self, change: TierChange) -> None:
        """Encode the source at the new tier on the render worker, then switch between two frames."""
        r = self.renderer
        assert isinstance(r, TieredRenderer)
        for _ in range(2):  # a new source image may have been switched to meanwhile: once more
            if r.current is not None and r.current.size == change.to_size:
                break
            prepared = await asyncio.get_running_loop().run_in_executor(self.executor, r.prepare_tier,
                                                                        change.to_size)
            if self.closed.is_set():
                return
            if r.switch_tier(prepared):
                self._new_picture()  # the picture on screen is the old tier's: the next frame renders
                break
        self.stats.render_size = r.current.size if r.current is not None else change.to_size
        self.stats.tier_changes.append({"t_s": round(time.time() - self.stats.started, 3), "from": change.from_size,
                                        "to": change.to_size, "reason": change.reason, "load": round(change.load, 3),
                                        "budget_ms": round(r.adapter.config.budget_ms, 2),
                                        "frames_rendered": self.stats.frames_rendered})
        log.info("call %s: rendering at %dx%d (%s)", self.call_id, change.to_size, change.to_size, change.reason)

    def _shows(self, vec: np.ndarray) -> bool:
        """Whether the last shown image is exactly the rendering of ``vec``."""
        return (self._last_image is not None and self._last_vector is not None
                and np.array_equal(self._last_vector, np.asarray(vec, np.float32).reshape(-1)))

    def _new_picture(self) -> None:
        """The renderer draws differently from now on (another image or tier): no frame may reuse the picture on
        screen, nor the picture of a render already under way (``_render`` checks the generation)."""
        self._last_vector = None
        self._picture_gen += 1

    def _reuse(self, seq: int, capture_us: int, vec: np.ndarray, frame: Any) -> None:
        """Show new frame ``seq`` as the picture on screen, which ``_shows`` its keypoints (counted in
        frames_rendered, as a new frame shown, and in frames_reused)."""
        if self.sink is not None:
            self.sink.write(self._last_image, seq)
        if self.on_frame is not None:
            self.on_frame(self._last_image)
        self.stats.frames_rendered += 1
        self.stats.frames_reused += 1
        self.stats.render_times.append(time.monotonic())
        self.stats.latency_ms.append(time.time() * 1000 - capture_us / 1000)
        self._log_frame(seq, capture_us, vec, frame, repeated=False, reused=True)

    def _repeat(self, seq: int, capture_us: int, vec: np.ndarray, frame: Any) -> None:
        """Show the last image again for ``seq`` (counted in frames_repeated, not rendered)."""
        if self.sink is not None:
            self.sink.write(self._last_image, seq)
        if self.on_frame is not None:
            self.on_frame(self._last_image)
        self.stats.frames_repeated += 1
        self._log_frame(seq, capture_us, vec, frame, repeated=True)

    async def _drain_and_close(self, reason: str, max_wait_s: float = 2.0) -> None:
        """After a Bye, show the frames already received before hanging up."""
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline and not self.closed.is_set():
            pending = self.immediate.pending() if self.playout is None else self.playout.pending()
            if pending == 0 or not self.renderer.ready:
                break
            await asyncio.sleep(0.02)
        await self.close(reason)

    def _expired(self, now: float) -> str | None:
        """Why the peer no longer holds its slot, or None while it does."""
        return self.liveness.expired(now, said_hello=self.hello is not None, source_ready=self.renderer.ready)

    async def _watchdog(self) -> None:
        period = 0.1  # a dead peer is noticed within heartbeat_timeout_s + 0.1 s
        while not self.closed.is_set():
            t = time.monotonic()
            await asyncio.sleep(period)
            # A receiver starved of CPU runs this late and reads the peer's packets late too: time
            # the event loop was stalled is not the peer's silence (receiver.adapt relieves the load).
            self.liveness.stalled(max(0.0, time.monotonic() - t - period - 0.01))
            reason = self._expired(time.monotonic())
            if reason is not None:
                log.warning("call %s: %s (%d messages, %d rejected; silent %.1f s, of which the receiver "
                            "itself stalled %.1f s), hanging up", self.call_id, reason, self.stats.messages_received,
                            self.rejects.total, time.monotonic() - self.liveness.last_seen,
                            self.liveness.lag_since_seen)
                await self.close(reason)
                return

    async def close(self, reason: str) -> None:
        """End the call (the first reason given stands) and return once it has ended: a second caller, e.g. a
        two-way call hanging up just after the other side's Bye, waits for the close under way to finish
        (its frames log and stats written) instead of returning at once and letting the process exit."""
        if self.closed.is_set():
            if asyncio.current_task() is not self._closing_task:  # not from inside the close itself
                await self._close_done.wait()
            return
        self.closed.set()
        self._closing_task = asyncio.current_task()
        try:
            await self._close(reason)
        finally:
            self._close_done.set()

    async def _close(self, reason: str) -> None:
        self.stats.end_reason = reason
        self.stats.ended = time.time()
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()
        self.stats.udp = transport_counters(self.pc)
        if self.playout is not None:
            self.stats.playout = self.playout.stats()
        if self.kp_stream is not None:
            self.stats.codec = self.kp_stream.stats()
        if self.sink is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.sink.close)
        if self.frames_log is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.frames_log.write, self._frames_log_path())
            except Exception:  # a benchmark log must not break the hang-up
                log.exception("call %s: could not write the frames log", self.call_id)
        await self.pc.close()
        log.info("call %s ended (%s): %d frames received, %d rendered, %d rejected", self.call_id, reason,
                 self.stats.frames_received, self.stats.frames_rendered, self.rejects.total)
        if self.on_closed is not None:
            self.on_closed(self)

    def summary(self) -> dict[str, Any]:
        d = self.stats.to_dict()
        if self.playout is not None and not self.closed.is_set():
            d["playout"] = self.playout.stats()
        return d


def _decode_image(blob: bytes) -> np.ndarray | None:
    """BGR pixels of an encoded image, or None (runs in a worker thread)."""
    try:
        return cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
