"""A two-way call: each side sends its own face and shows the other's, over one peer connection.

Each side runs the sender's whole path for its own face (``sender.call.SenderCall``: capture,
framing, keypoints, predictive coding, source image) and the receiver's whole path for the other's
(``receiver.session.CallSession``: validation, jitter buffer, playout clock, forecaster, tiers,
render), both on the same ``RTCPeerConnection``, negotiated once.

**Channels.** Each side opens its own outgoing ``control`` + ``kp`` channels on the connection
(``sender.peer.SenderPeer(pc=...)``) and takes the other side's through ``pc.on("datachannel")``
(``receiver.server.wire_session``). An end's own channels never fire that event, so the labels are
the same both ways, and SCTP gives the two sides' channels different stream ids (even for the DTLS
client, odd for the server). The connecting side creates its channels before the offer; the
listening side creates its own right after it answers, and aiortc opens them in-band (DCEP) over
the association the offer set up. Replies travel back on the channel they answer: the other side's
``SourceReady`` and ``KeyframeRequest`` for our stream arrive on *our* control channel, at our
``SenderPeer``; our session's answers go out on the other side's.

**Signaling.** The listening side is a ``receiver.server.ReceiverServer`` (one call slot, its token
check and SDP checks) whose ``on_answered`` hook adds this side's half; the connecting side POSTs its
offer with ``shared.signaling.send_offer``.

**The end.** The call ends for both when either side hangs up (Ctrl-C, ``q`` in the window, or its
input ended): its ``Bye`` goes out on its control channel, the other side's session drains and
closes the connection, and that side ends too. A side that vanishes is noticed by the session's
liveness watchdog (``SessionConfig.heartbeat_timeout_s``, 1.5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
from aiortc import RTCPeerConnection

from kpcast.view import CallView, Counters, Layout, make_view, wire_bytes
from receiver.batching import RenderBatcher
from receiver.loading import RenderModels, load_render_models
from receiver.render import pick_device
from receiver.server import ReceiverServer, ServerConfig, wire_session
from receiver.session import CallSession, SessionConfig
from receiver.tiers import TieredRenderer
from sender.call import SenderCall
from sender.config import SenderConfig
from sender.peer import SenderPeer
from shared.channels import KEYPOINT_LABEL
from shared.ice import addresses_for_host, addresses_for_receiver, restrict_host_addresses
from shared.ice_servers import IceServerOptions, check_relay, rtc_configuration
from shared.signaling import send_offer

log = logging.getLogger(__name__)

# How long the sending half may take to finish after the call ended (its Bye waits up to 1 s for the
# other side, a frame may be in extraction); then it is cancelled.
SENDER_FINISH_S = 5.0
CPU_SHARE_PERIOD_S = 1.0  # how often the receiving half learns what the sending half costs
# The sending half's worker threads run this many nice steps below the renderer (sender.priority): when the
# shared cores are short, a late extraction costs the other side one fresh frame, a late render freezes ours.
SEND_NICE = 5
# Exit statuses: a call that ended as someone asked (either side hung up, or the input ended) is 0;
# one whose other side vanished or broke the connection is LOST; set-up failures are ERROR.
LOST = 1
ERROR = 2


@dataclass
class CallConfig:
    """One side of a two-way call, one field per ``python -m kpcast call`` option that is not the sender's."""

    listen: bool = False
    connect: str | None = None  # the listening side's base URL (http://HOST:PORT)
    host: str = "0.0.0.0"  # --listen: address to listen on (and to restrict ICE to, when it is one IP)
    port: int = 8080
    token: str | None = None
    sender: SenderConfig = field(default_factory=SenderConfig)  # capture and stream of this side's face
    session: SessionConfig = field(default_factory=SessionConfig)  # the other side's stream (sink unused: null)
    size: str = "auto"  # render size of the other side's face: auto | 64 | 128 | 256 (receiver's --size)
    weights: str | None = None  # one checkpoint for both halves (overrides --size)
    adapt: bool | None = None  # render tiers follow render times (default: on with --size auto on a CPU)
    device: str | None = None
    # the renderer's torch / ONNX Runtime intra-op threads: 1, as a call's side also extracts its own
    # keypoints (a second render thread bought 1.14x at 256 alone, and lost ~1 fps a direction in
    # bench.two_way with both sides on one 2-core machine: docs/RESULTS.md, two-way call)
    threads: int = 1
    fast_render: bool = True
    int8_render: bool = True
    sink: str = "null"
    view_size: int = 512
    stats_json: str | None = None
    ice: IceServerOptions = field(default_factory=IceServerOptions)
    ice_address: list[str] | None = None
    refine_regions: str | None = None  # region refiner checkpoint for the other side's face (receiver.regions)


@dataclass
class CallResult:
    """How a call ended and what went each way."""

    exit_code: int
    ended_by: str  # local (hung up here) | remote (the other side hung up) | input (our input ended) | lost | error
    reason: str  # in words, for the log and the stats
    duration_s: float
    sent: dict[str, Any]  # this side's SenderStats.to_dict()
    received: dict[str, Any]  # the other side's stream as this side's session saw it (CallStats)

    def to_dict(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "ended_by": self.ended_by, "end_reason": self.reason,
                "duration_s": self.duration_s, "sent": self.sent, "received": self.received}


# ---------------------------------------------------------------------------------------- models

def render_models(cfg: CallConfig, extract_ms: float | None = None) -> RenderModels:
    """As ``python -m receiver`` chooses them (``receiver.loading``), graphs built before the call;
    ``extract_ms``: our own extraction's time a frame (the sender's start-up measurement), which the
    first render tier must leave room for."""
    import torch

    torch.set_num_threads(cfg.threads)  # after the sender's set-up, which sets its own (one)
    device = cfg.device or pick_device()
    models = load_render_models(cfg.weights, cfg.size, cfg.adapt, device, cfg.fast_render, cfg.int8_render,
                                cfg.refine_regions, reserved_ms=extract_ms or 0.0)
    log.info("rendering the other side at %dx%d on %s (%.0f fps alone)%s", models.model.config.size,
             models.model.config.size, device, models.fps, ", tiers adapt" if models.tiers else "")
    return models


# ---------------------------------------------------------------------------------------- one call

class TwoWayCall:
    """One call on one peer connection: ``sender`` streams this side's face, ``session`` shows the other's,
    ``view`` puts both on the screen (or file). ``await run(stop)`` lasts the call."""

    def __init__(self, sender: SenderCall, session: CallSession, cfg: CallConfig) -> None:
        self.sender = sender
        self.session = session
        self.view = CallView(make_view(cfg.sink, cfg.view_size, self._picture_fps), Layout(cfg.view_size),
                             self._counters)
        sender.on_frame = self.view.local
        shown_before = session.on_frame  # the listening side's server publishes frames to its web viewer

        def on_remote(image: np.ndarray) -> None:
            if shown_before is not None:
                shown_before(image)
            self.view.remote(image)

        session.on_frame = on_remote

    def _picture_fps(self) -> float:
        """The composed picture's rate: the other side's (it changes with each of their frames), else ours."""
        hello = self.session.hello
        return hello.fps if hello is not None else self.sender.source.fps

    def _counters(self) -> Counters:
        st, peer = self.session.stats, self.sender.peer
        out = wire_bytes(peer.bytes_sent[KEYPOINT_LABEL], peer.messages_sent[KEYPOINT_LABEL]) if peer else 0
        latency = float(np.median(st.latency_ms[-30:])) if st.latency_ms else None
        return Counters(wire_bytes(st.keypoint_message_bytes, st.keypoint_messages), out, st.frames_rendered, latency)

    def reserved_ms(self) -> float | None:
        """CPU time our own extraction takes per frame of the other side's stream (None: not known yet).

        Both halves run on this machine's cores: the tier adaptation of the picture we show must leave
        room for the keypoints we send, or it keeps a tier the machine cannot hold beside them."""
        ex = self.sender.stats.extract_ms[-30:]
        hello = self.session.hello
        if not ex or hello is None:
            return None
        return float(np.median(ex)) * self.sender.source.fps / hello.fps

    async def _share_cpu(self) -> None:
        """Tell the receiving half's tier adaptation what the sending half costs, once a second."""
        renderer = self.session.renderer
        if not isinstance(renderer, TieredRenderer):
            return
        while True:
            ms = self.reserved_ms()
            if ms is not None:
                renderer.set_reserved_ms(ms)
            await asyncio.sleep(CPU_SHARE_PERIOD_S)

    async def run(self, stop: asyncio.Event) -> CallResult:
        t0 = time.monotonic()
        send = asyncio.ensure_future(self.sender.run())
        share = asyncio.ensure_future(self._share_cpu())
        waits = {"stop": asyncio.ensure_future(stop.wait()), "quit": asyncio.ensure_future(self.view.quit.wait()),
                 "remote": asyncio.ensure_future(self.session.closed.wait())}
        try:
            await asyncio.wait([send, *waits.values()], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in (*waits.values(), share):
                w.cancel()
        code, ended_by, reason, bye = self._why(send, stop)
        log_at = log.warning if code else log.info
        log_at("call ended: %s", reason)
        self.sender.stop(bye)
        sent = await self._finish_sender(send)
        await self.session.close(reason if ended_by != "remote" else f"the other side ended the call: {reason}")
        self.view.close()
        return CallResult(code, ended_by, reason, time.monotonic() - t0, sent, self.session.summary())

    def _why(self, send: asyncio.Future, stop: asyncio.Event) -> tuple[int, str, str, str]:
        """(exit code, who ended it, why in words, the Bye's reason) of a call that just ended. One's own
        hang-up first: the other side's end or ours may follow from it in the same instant."""
        if self.view.quit.is_set():
            return 0, "local", "hung up here (q)", "hung up"
        if stop.is_set():
            return 0, "local", "hung up here (signal)", "hung up"
        if self.sender.input_ended:
            # before the session's end: our Bye makes the other side close the connection, which ends it
            return 0, "input", "our input ended", "done"
        if self.session.closed.is_set():
            why = self.session.stats.end_reason
            if why.startswith("bye") or why == "connection closed":
                return 0, "remote", f"the other side hung up ({why})", "the other side hung up"
            if "timeout" in why:
                return LOST, "lost", f"the other side went silent ({why}): it vanished or its network did", "lost"
            return LOST, "lost", f"call lost ({why})", "lost"
        error = send.exception() if not send.cancelled() else None
        if error is not None:
            return ERROR, "error", f"sending failed: {type(error).__name__}: {error}", "error"
        return 0, "input", "our input ended", "done"

    async def _finish_sender(self, send: asyncio.Future) -> dict[str, Any]:
        """Let the sending half finish (its Bye out), then its stats."""
        try:
            return await asyncio.wait_for(asyncio.shield(send), SENDER_FINISH_S)
        except TimeoutError:
            log.warning("the sending half did not finish within %.0f s: cancelling it", SENDER_FINISH_S)
            send.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await send
        except Exception as e:  # already reported by _why; the stats so far still count
            log.debug("sending half failed: %s", e)
        return self.sender.stats.to_dict()


# ---------------------------------------------------------------------------------------- the two roles

async def listen(cfg: CallConfig, stop: asyncio.Event) -> CallResult | None:
    """Wait for one call on ``cfg.host:cfg.port`` and hold it; None when stopped before any call came."""
    sender = SenderCall(cfg.sender)
    sender.prepare()  # a camera that does not open fails now, not when someone calls
    models = _render_models(cfg, sender)
    restrict_host_addresses(cfg.ice_address or addresses_for_host(cfg.host))
    rtc = rtc_configuration(cfg.ice)
    calls: list[TwoWayCall] = []
    answered = asyncio.Event()

    def on_answered(pc: RTCPeerConnection, session: CallSession) -> None:
        if calls:  # one call per run: the sender's input and stream are this call's
            asyncio.ensure_future(session.close("busy: this side is already in a call"))
            return
        # our channels, right after the answer: aiortc opens them in-band once the association is up
        sender.use_peer(SenderPeer(configuration=rtc, pc=pc))
        calls.append(TwoWayCall(sender, session, cfg))
        answered.set()

    # One slot, never evicted (a second caller gets 503 while this call lasts), and the same token and
    # SDP checks as a receiver.
    server_cfg = ServerConfig(cfg.host, cfg.port, cfg.token, max_calls=1, stop_after_calls=1, session=cfg.session,
                              fast_render=cfg.fast_render, int8_render=cfg.int8_render, ice=cfg.ice,
                              evict_after_s=float("inf"), render_workers=min(4, os.cpu_count() or 1))
    server = ReceiverServer(models.model, server_cfg, models.tiers, on_answered=on_answered, regions=models.regions)
    try:
        await server.start()
        if not cfg.token:
            log.warning("no --token: anyone who reaches port %d can call", cfg.port)
        print(f"kpcast: waiting for a call on http://{cfg.host}:{cfg.port}", flush=True)
        if not await _first(answered, stop):
            return None
        log.info("call answered")
        return await calls[0].run(stop)
    finally:
        await server.stop()
        if not calls:  # the sending half never ran: its input and refresh worker are still open
            sender.source.close()
            sender.refresh.close()


async def connect(cfg: CallConfig, stop: asyncio.Event) -> CallResult | None:
    """Call the listening side at ``cfg.connect`` and hold the call; None when stopped before it was answered."""
    assert cfg.connect is not None
    sender = SenderCall(cfg.sender)
    sender.prepare()
    models = _render_models(cfg, sender)
    restrict_host_addresses(cfg.ice_address or addresses_for_receiver(urlparse(cfg.connect).hostname or ""))
    rtc = rtc_configuration(cfg.ice)
    pc = RTCPeerConnection(rtc)
    sender.use_peer(SenderPeer(configuration=rtc, pc=pc))  # our channels, before the offer: they are in it
    workers = min(4, os.cpu_count() or 1)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="render")
    session = CallSession(uuid.uuid4().hex[:8], 0, pc, models.renderer(), executor, cfg.session,
                          batcher=RenderBatcher(executor, max_batch=1, workers=workers))
    try:
        try:
            await pc.setLocalDescription(await pc.createOffer())
            check_relay(pc.localDescription.sdp, rtc, "kpcast")
            wire_session(pc, session)  # before the answer: nothing can arrive until then
            offer = asyncio.ensure_future(send_offer(cfg.connect, pc.localDescription, cfg.token))
            if not await _first(offer, stop):
                offer.cancel()
                await _unused(pc, sender)
                return None
            await pc.setRemoteDescription(offer.result())
        except BaseException:
            await _unused(pc, sender)
            raise
        log.info("call answered by %s", cfg.connect)
        session.start()
        return await TwoWayCall(sender, session, cfg).run(stop)
    finally:
        executor.shutdown(wait=True)


def _render_models(cfg: CallConfig, sender: SenderCall) -> RenderModels:
    """``load_render_models``; on a failure (a bad checkpoint) the prepared sender's input and refresh worker
    are closed first."""
    try:
        return render_models(cfg, sender.stats.extract_ms_startup)
    except BaseException:
        sender.source.close()
        sender.refresh.close()
        raise


async def _unused(pc: RTCPeerConnection, sender: SenderCall) -> None:
    """Close what a call that never started holds: the connection, the sender's input and refresh worker."""
    await pc.close()
    sender.source.close()
    sender.refresh.close()


async def _first(what: asyncio.Event | asyncio.Future, stop: asyncio.Event) -> bool:
    """Wait for ``what`` (an event, or a future whose result the caller reads) or ``stop``; True for ``what``."""
    wait = asyncio.ensure_future(what.wait()) if isinstance(what, asyncio.Event) else what
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([wait, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if wait is not what:
            wait.cancel()
    if wait.done() and not wait.cancelled():
        if wait.exception() is not None:
            raise wait.exception()
        return True
    return False
