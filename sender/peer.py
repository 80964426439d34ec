"""The sender's WebRTC peer: one reliable control channel, one unreliable keypoint channel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection

from shared import protocol as P
from shared import source_image as S
from shared.channels import CONTROL_LABEL, KEYPOINT_LABEL, transport_counters
from shared.errors import RejectCounter
from shared.ice_servers import check_relay
from shared.signaling import offer_until_answered

log = logging.getLogger(__name__)

MAX_BUFFERED_BYTES = 32 * 1024  # above this the link is congested: drop keypoints, don't queue them


class SenderPeer:
    """The sending end of a call: its two channels on a peer connection of its own (signaled by
    :meth:`connect`), or on ``pc``, a connection someone else negotiates (a two-way call: ``kpcast``),
    where :meth:`opened` waits for the channels instead."""

    def __init__(self, on_message: Callable[[P.Message], None] | None = None,
                 configuration: RTCConfiguration | None = None, pc: RTCPeerConnection | None = None) -> None:
        # configuration: STUN/TURN servers (shared.ice_servers.rtc_configuration); None: host candidates only
        self.configuration = configuration or RTCConfiguration(iceServers=[])
        self.pc = pc if pc is not None else RTCPeerConnection(self.configuration)
        self.control: RTCDataChannel = self.pc.createDataChannel(CONTROL_LABEL, ordered=True)
        self.kp: RTCDataChannel = self.pc.createDataChannel(KEYPOINT_LABEL, ordered=False, maxRetransmits=0)
        self.on_message = on_message
        self.closed = asyncio.Event()
        self.bytes_sent = {CONTROL_LABEL: 0, KEYPOINT_LABEL: 0}
        self.messages_sent = {CONTROL_LABEL: 0, KEYPOINT_LABEL: 0}
        self.kp_dropped_congestion = 0
        self.rejected = RejectCounter()
        self.control.on("message", self._on_control)
        self.kp.on("message", self._on_kp)

        @self.pc.on("connectionstatechange")
        async def _state() -> None:
            log.info("connection state %s", self.pc.connectionState)
            if self.pc.connectionState in ("failed", "closed"):
                self.closed.set()

    def _on_control(self, data: bytes | str) -> None:
        try:
            msg = P.decode(data)
        except P.ProtocolError as e:
            older = e.reason == "version" and P.legacy_bye(data, "") is not None
            if older and not self.rejected.counts["version"]:  # an older receiver: say so, once
                log.error("the receiver speaks an older protocol (%s): upgrade it", e.detail)
            self.rejected.reject(e)
            return
        if isinstance(msg, P.Bye):
            log.info("receiver hung up: %s", msg.reason)
            self.closed.set()
        if self.on_message is not None:
            self.on_message(msg)

    def _on_kp(self, data: bytes | str) -> None:
        """The keypoint channel carries one message back: a receiver's KeyframeRequest, sent on both
        channels (an unreliable copy is not stuck behind a lost control chunk); anything else is refused."""
        try:
            msg = P.decode(data)
        except P.ProtocolError as e:
            self.rejected.reject(e)
            return
        if not isinstance(msg, P.KeyframeRequest):
            self.rejected.reject(P.ProtocolError("channel", f"{type(msg).__name__} on the keypoint channel"))
            return
        if self.on_message is not None:
            self.on_message(msg)

    async def connect(self, url: str, token: str | None = None, timeout_s: float = 15.0) -> None:
        """Offer to the receiver at ``url`` (again while it answers 503 busy, for up to ``timeout_s``), then
        wait up to ``timeout_s`` for both channels to open."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        check_relay(self.pc.localDescription.sdp, self.configuration, "sender")  # a dead TURN server: say so now
        # the same offer every time: its candidates and fingerprint stay valid until it is answered
        answer = await offer_until_answered(url, self.pc.localDescription, token, within_s=timeout_s)
        await self.pc.setRemoteDescription(answer)
        await self.opened(timeout_s)
        log.info("connected to %s", url)

    async def opened(self, timeout_s: float = 15.0) -> None:
        """Wait until both channels are open (TimeoutError after ``timeout_s``)."""
        await asyncio.wait_for(asyncio.gather(_opened(self.control), _opened(self.kp)), timeout_s)

    def send_control(self, msg: P.Message) -> int:
        data = P.encode(msg)
        self.control.send(data)
        self.bytes_sent[CONTROL_LABEL] += len(data)
        self.messages_sent[CONTROL_LABEL] += 1
        return len(data)

    async def send_source(self, jpeg: bytes, image_id: int) -> int:
        """Send the source image in chunks under the peer's max message size."""
        chunk = min(16 * 1024, _max_message_size(self.pc) - 256)
        total = 0
        for part in S.split_source(jpeg, image_id, chunk):
            total += self.send_control(part)
            while self.control.bufferedAmount > 256 * 1024:  # don't pile the whole image into SCTP at once
                await asyncio.sleep(0.005)
        return total

    def send_keypoints(self, msg: P.KeypointBatch | P.CodedKeypoints) -> int:
        """Send one keypoint message now; returns its encoded size, or 0 when dropped (channel not
        open, or congested: a queued keypoint would arrive too late to be worth anything)."""
        if self.kp.readyState != "open":
            return 0
        if self.kp.bufferedAmount > MAX_BUFFERED_BYTES:
            self.kp_dropped_congestion += 1
            return 0
        data = P.encode(msg)
        self.kp.send(data)
        self.bytes_sent[KEYPOINT_LABEL] += len(data)
        self.messages_sent[KEYPOINT_LABEL] += 1
        return len(data)

    def wire_stats(self) -> dict[str, int]:
        """UDP payload bytes/packets through DTLS (all channels, handshakes included)."""
        return transport_counters(self.pc)

    async def close(self, reason: str = "done") -> None:
        if self.control.readyState == "open":
            try:
                self.send_control(P.Bye(reason))
                # Let the Bye reach the receiver (SCTP may have to retransmit it on a lossy link):
                # the receiver hangs up when it gets it, so wait for that, at most a second.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closed.wait(), 1.0)
            except Exception as e:  # a dead transport must not stop the shutdown
                log.debug("bye not sent: %s", e)
        await self.pc.close()


async def _opened(channel: RTCDataChannel) -> None:
    if channel.readyState == "open":
        return
    ev = asyncio.Event()
    channel.on("open", ev.set)
    await ev.wait()


def _max_message_size(pc: RTCPeerConnection) -> int:
    size = getattr(pc.sctp, "_remote_max_message_size", None) if pc.sctp else None
    return int(size) if size else P.MAX_MESSAGE_BYTES
