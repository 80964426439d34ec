"""A catalogue of attacks on a kpcast receiver, each an independent hostile peer.

The peers are not ``sender/``: a plain aiortc client that builds its own messages with
``shared.protocol``'s public API (so they follow ``P.PROTOCOL_VERSION``), a raw TCP client for
what no HTTP library would send, and, for what aiortc itself never sends (a message without an
end), chunks queued straight into the client's own SCTP transport. ``bench.hostile`` runs them
against a real receiver process and measures what the receiver did.

An attack takes a call slot (or tries to), misbehaves, and then leaves its connections *open*:
a hostile peer does not hang up politely, so the harness measures how long the receiver takes
to free the slot by itself. :meth:`Outcome.cleanup` closes what is left afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import random
import struct
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import cv2
import msgpack
import numpy as np
from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.rtcsctptransport import SCTP_DATA_FIRST_FRAG, USERDATA_MAX_LENGTH, DataChunk, tsn_plus_one

from receiver.server import ServerConfig
from shared import kpvector as V
from shared import protocol as P
from shared.signaling import OFFER_PATH, SignalingError, offer_until_answered, send_offer

log = logging.getLogger(__name__)

WEBRTC_BINARY = 53  # SCTP payload protocol id of a binary data-channel message
# A face-like keypoint vector: coordinates inside [-1, 1], identity Jacobians.
NEUTRAL = np.array([0.1, -0.1] * V.NUM_KP + [1.0, 0.0, 0.0, 1.0] * V.NUM_KP, np.float32)
FPS = 30.0
OPEN_TIMEOUT_S = 20.0
EVICT_AFTER_S = ServerConfig.evict_after_s  # a receiver's default: silent peers give way after this


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    detector: str  # the receiver's keypoint detector id: a Hello with it is accepted
    max_calls: int
    token: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class Outcome:
    """What one attack did, as the attacker saw it."""

    taken_at: float | None = None  # monotonic: when the receiver answered the attacker's offer (a slot taken)
    freed_at: float | None = None  # HTTP-only attacks: when the last answer came (the slot is given back first)
    statuses: Counter = field(default_factory=Counter)  # HTTP statuses of the attacker's requests
    note: str = ""
    held: bool = True  # False: the receiver failed what the attack checks itself (e.g. locked a caller out)
    peers: list[RTCPeerConnection] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)

    async def cleanup(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for pc in self.peers:
            with contextlib.suppress(Exception):
                await pc.close()


@dataclass(frozen=True)
class Attack:
    name: str
    does: str  # what the attacker does
    expect: str  # what a receiver that holds does
    run: Callable[[Target], Awaitable[Outcome]]


# --------------------------------------------------------------------------- payloads


def jpeg(h: int = 64, w: int = 64, seed: int = 0) -> bytes:
    """A small real JPEG (a face-sized blob of noise over a gradient)."""
    rng = np.random.default_rng(seed)
    img = np.clip(np.linspace(40, 200, w)[None, :, None] + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def jpeg_claiming(w: int, h: int, keep: int | None = None) -> bytes:
    """A real JPEG whose frame header claims ``w`` x ``h``, cut to ``keep`` bytes (a header bomb)."""
    blob = jpeg(16, 16)
    sof = blob.index(b"\xff\xc0")
    out = blob[:sof + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + blob[sof + 9:]
    return out[:keep] if keep else out


def png_claiming(w: int, h: int) -> bytes:
    """A real 16x16 PNG whose IHDR claims ``w`` x ``h`` (CRC fixed, so a decoder believes it)."""
    blob = bytearray(cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    blob[16:24] = struct.pack(">II", w, h)
    blob[29:33] = struct.pack(">I", zlib.crc32(bytes(blob[12:29])))  # CRC over the chunk type and data
    return bytes(blob)


def webp_claiming(w: int, h: int) -> bytes:
    """A real lossy WebP whose VP8 frame header claims ``w`` x ``h`` (at most 16383 each)."""
    lossy = [cv2.IMWRITE_WEBP_QUALITY, 90]  # cv2's default (100) writes lossless VP8L
    blob = bytearray(cv2.imencode(".webp", np.zeros((16, 16, 3), np.uint8), lossy)[1].tobytes())
    assert blob[12:16] == b"VP8 " and blob[23:26] == b"\x9d\x01\x2a", "cv2 wrote another WebP flavour"
    blob[26:28] = (w & 0x3FFF).to_bytes(2, "little")
    blob[28:30] = (h & 0x3FFF).to_bytes(2, "little")
    return bytes(blob)


def png_zeros(side: int) -> bytes:
    """A PNG of ``side``² black pixels: a few KB that decode to side² x 3 bytes (a deflate bomb)."""
    return cv2.imencode(".png", np.zeros((side, side, 3), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()


def junk(r: random.Random, detector: str) -> bytes | str:
    """One message no receiver may accept: random bytes, random msgpack, a Hello of another version, text."""
    k = r.random()
    if k < 0.35:
        return r.randbytes(r.randint(1, 400))
    if k < 0.65:
        fields = [r.choice([None, True, -1, 2**63 - 1, 1e308, "x" * r.randint(0, 50), r.randbytes(r.randint(0, 99))])
                  for _ in range(r.randint(0, 8))]
        return msgpack.packb([P.PROTOCOL_VERSION, r.randint(0, 12), *fields], use_bin_type=True)
    if k < 0.9:
        hello = msgpack.unpackb(P.encode(P.Hello(model=detector, size=64, fps=FPS)))
        hello[0] = P.PROTOCOL_VERSION + r.randint(1, 100)  # a version this receiver does not speak
        return msgpack.packb(hello, use_bin_type=True)
    return "{\"type\": \"hello\"}"


# --------------------------------------------------------------------------- an aiortc attacker


@dataclass
class Peer:
    pc: RTCPeerConnection
    control: RTCDataChannel
    kp: RTCDataChannel | None
    taken_at: float  # when the receiver answered: from then on it holds a slot for us

    def send(self, msg: P.Message | bytes | str, channel: str = "control") -> None:
        ch = self.control if channel == "control" or self.kp is None else self.kp
        if ch.readyState == "open":
            ch.send(P.encode(msg) if not isinstance(msg, (bytes, str)) else msg)

    def hello(self, detector: str) -> None:
        self.send(P.Hello(model=detector, size=64, fps=FPS))

    async def source(self, blob: bytes, image_id: int = 0) -> None:
        """Send an image the way a sender does, without the sender's checks (a bomb is fine)."""
        digest = hashlib.sha256(blob).digest()[:P.DIGEST_BYTES]
        parts = [blob[i:i + 16 * 1024] for i in range(0, len(blob), 16 * 1024)]
        for i, part in enumerate(parts):
            self.send(P.SourceChunk(image_id, i, len(parts), len(blob), digest, part))
            while self.control.bufferedAmount > 256 * 1024:
                await asyncio.sleep(0.005)

    async def keypoints(self, seqs: list[int], ts_us: Callable[[int], int] | None = None,
                        fps: float = FPS) -> None:
        """One keypoint message per seq, paced at ``fps``, with a heartbeat every 0.5 s."""
        t0 = time.time_ns() // 1000
        beat = time.monotonic()
        for i, seq in enumerate(seqs):
            ts = ts_us(seq) if ts_us else t0 + int(i * 1e6 / fps)
            self.send(P.KeypointBatch.build(seq, ts, [NEUTRAL]), "kp")
            if time.monotonic() - beat > 0.5:
                self.send(P.Heartbeat(time.time_ns() // 1000))
                beat = time.monotonic()
            await asyncio.sleep(1.0 / fps)

    @property
    def up(self) -> bool:
        return self.pc.connectionState not in ("closed", "failed")


async def _opened(channel: RTCDataChannel) -> None:
    if channel.readyState != "open":
        ev = asyncio.Event()
        channel.on("open", ev.set)
        await ev.wait()


async def connect(target: Target, kp: bool = True, extra_channels: int = 0, busy_retry_s: float | None = None) -> Peer:
    """Offer, get answered (a slot is ours from then on), wait until the channels are open.
    ``busy_retry_s``: offer again while the receiver is busy (503), for that long, as the sender does."""
    pc = RTCPeerConnection()
    control = pc.createDataChannel("control", ordered=True)
    kp_ch = pc.createDataChannel("kp", ordered=False, maxRetransmits=0) if kp else None
    for i in range(extra_channels):
        pc.createDataChannel(f"x{i}")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        if busy_retry_s is None:
            answer = await send_offer(target.url, pc.localDescription, target.token)
        else:
            answer = await offer_until_answered(target.url, pc.localDescription, target.token, busy_retry_s)
        taken = time.monotonic()
        await pc.setRemoteDescription(answer)
        # only the sender's channels: a receiver may refuse the extra ones (channel_flood)
        await asyncio.wait_for(asyncio.gather(*(_opened(c) for c in (control, kp_ch) if c)), OPEN_TIMEOUT_S)
    except BaseException:
        await pc.close()
        raise
    return Peer(pc, control, kp_ch, taken)


async def _caller(target: Target, blob: bytes | None = None) -> Peer:
    """A peer that starts like an honest sender: Hello, then (optionally) a source image."""
    peer = await connect(target)
    peer.hello(target.detector)
    if blob is not None:
        await peer.source(blob)
    return peer


def _kept(peer: Peer, note: str = "", *tasks: asyncio.Task) -> Outcome:
    return Outcome(taken_at=peer.taken_at, note=note, peers=[peer.pc], tasks=list(tasks))


# --------------------------------------------------------------------------- source-image bombs


def _bomb(blob: bytes) -> Callable[[Target], Awaitable[Outcome]]:
    async def run(target: Target) -> Outcome:
        peer = await _caller(target, blob)
        await peer.keypoints(list(range(15)))  # half a second of a caller, then it vanishes without a word
        return _kept(peer, f"{len(blob)} B image")
    return run


# --------------------------------------------------------------------------- keypoint streams


async def far_ahead(target: Target) -> Outcome:
    peer = await _caller(target, jpeg())
    await peer.keypoints(list(range(30)))
    await peer.keypoints([2**62])  # one frame "2^62 frames later": must not make the playout forecast that far
    await peer.keypoints(list(range(30, 60)))
    return _kept(peer)


async def absurd_timestamps(target: Target) -> Outcome:
    peer = await _caller(target, jpeg())
    stamps = [2**62, 0, 2**61, 1, 2**62 - 1]
    await peer.keypoints(list(range(60)), ts_us=lambda seq: stamps[seq % len(stamps)])
    return _kept(peer)


async def second_hello(target: Target) -> Outcome:
    peer = await _caller(target, jpeg())
    await peer.keypoints(list(range(30)))
    peer.hello(target.detector)  # the sender restarted: its sequence numbers start over
    await peer.keypoints(list(range(30)))
    return _kept(peer, "60 frames sent (seq 0-29 twice)")


async def message_flood(target: Target) -> Outcome:
    peer = await _caller(target, jpeg())
    beat = P.encode(P.Heartbeat(1))
    sent, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 2.0 and peer.up:  # as fast as the kp channel takes them
        for _ in range(50):
            peer.send(beat, "kp")
        sent += 50
        await asyncio.sleep(0.001)
    return _kept(peer, f"{sent} messages in 2 s")


# --------------------------------------------------------------------------- peers that are not callers


async def silent(target: Target) -> Outcome:
    peer = await connect(target)
    return _kept(peer, "both channels open, nothing sent")


async def silent_full(target: Target) -> Outcome:
    """Every slot taken by a silent peer; then, once they have been silent for the receiver's
    eviction delay, a caller (Hello and all) must still get in."""
    peers = [await connect(target) for _ in range(target.max_calls)]
    await asyncio.sleep(EVICT_AFTER_S + 0.5)
    out = Outcome(taken_at=peers[0].taken_at, peers=[p.pc for p in peers])
    try:
        caller = await connect(target)
    except SignalingError as e:
        out.held, out.note = False, f"{len(peers)} silent peers; a caller was locked out ({e})"[:120]
        return out
    caller.hello(target.detector)
    out.peers.append(caller.pc)
    out.note = f"{len(peers)} silent peers; a caller still got a slot"
    return out


async def dead_offers(target: Target, rate: float = 4.0, caller_after_s: float = 1.0,
                      caller_within_s: float = 15.0, hold_s: float = 2.0) -> Outcome:
    """Answered offers that never connect (real offers whose peer connections are closed before they
    are posted), ``rate`` a second, as a peer with the token did to a receiver; ``caller_after_s`` into
    it a caller that offers again while refused as busy (as ``python -m sender`` does) must get in,
    and keep its slot while the flood goes on ``hold_s`` more."""
    import aiohttp

    sdps = [await offer_sdp() for _ in range(4)]
    out = Outcome()
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}

    async def flood(http: aiohttp.ClientSession) -> None:
        for i in itertools.count():
            t = time.monotonic()
            async with http.post(target.url + OFFER_PATH, json={"sdp": sdps[i % len(sdps)], "type": "offer"},
                                 headers=headers) as resp:
                out.statuses[resp.status] += 1
                if resp.status == 200 and out.taken_at is None:
                    out.taken_at = time.monotonic()
            await asyncio.sleep(max(0.0, t + 1.0 / rate - time.monotonic()))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        task = asyncio.ensure_future(flood(http))
        try:
            await asyncio.sleep(caller_after_s)
            t0 = time.monotonic()
            try:
                caller = await connect(target, busy_retry_s=caller_within_s)
            except (SignalingError, TimeoutError) as e:
                out.held, out.note = False, f"a caller was locked out ({e})"[:120]
                return out
            waited = time.monotonic() - t0
            caller.hello(target.detector)
            out.peers.append(caller.pc)
            await asyncio.sleep(hold_s)
            out.held = caller.up
            out.note = (f"dead offers at {rate:g}/s; a caller got in after {waited:.1f} s"
                        + ("" if caller.up else ", then lost its slot"))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return out


async def junk_peer(target: Target) -> Outcome:
    peer = await connect(target)
    r = random.Random(14)

    async def spray() -> None:
        while peer.up:
            peer.send(junk(r, target.detector), r.choice(["control", "kp"]))
            await asyncio.sleep(0.02)

    return _kept(peer, "junk every 20 ms until hung up on", asyncio.ensure_future(spray()))


async def channel_flood(target: Target) -> Outcome:
    peer = await connect(target, extra_channels=40)
    return _kept(peer, "42 data channels opened")


# --------------------------------------------------------------------------- SCTP messages


async def huge_message(target: Target) -> Outcome:
    peer = await connect(target)
    peer.pc.sctp._remote_max_message_size = 16 * 1024 * 1024  # ignore the size the receiver advertised
    peer.control.send(b"\x00" * (8 * 1024 * 1024))
    return _kept(peer, "8 MiB on the control channel")


def _queue_fragment(sctp, stream_id: int, stream_seq: int, data: bytes, first: bool) -> None:
    """Queue one DATA chunk of an ordered message, the way aiortc's ``_send`` does (private API,
    aiortc 1.16), but never with the last-fragment flag: aiortc itself cannot send that."""
    chunk = DataChunk()
    chunk.flags = SCTP_DATA_FIRST_FRAG if first else 0
    chunk.tsn = sctp._local_tsn
    chunk.stream_id, chunk.stream_seq, chunk.protocol = stream_id, stream_seq, WEBRTC_BINARY
    chunk.user_data = data
    for attr, value in (("_abandoned", False), ("_acked", False), ("_book_size", len(data)), ("_expiry", None),
                        ("_in_flight", False), ("_max_retransmits", None), ("_misses", 0), ("_retransmit", False),
                        ("_sent_count", 0), ("_sent_time", None)):
        setattr(chunk, attr, value)
    sctp._local_tsn = tsn_plus_one(sctp._local_tsn)
    sctp._outbound_queue.append(chunk)


async def never_ending(target: Target, limit_bytes: int = 64 * 1024 * 1024, limit_s: float = 20.0) -> Outcome:
    peer = await connect(target)
    sctp, sid = peer.pc.sctp, peer.control.id
    seq = sctp._outbound_stream_seq.get(sid, 0)
    sctp._outbound_stream_seq[sid] = (seq + 1) % 65536
    data = b"\x00" * USERDATA_MAX_LENGTH
    sent, t0 = 0, time.monotonic()
    while sent < limit_bytes and time.monotonic() - t0 < limit_s and peer.up:
        for _ in range(32):
            _queue_fragment(sctp, sid, seq, data, first=sent == 0)
            sent += len(data)
        await sctp._transmit()
        while len(sctp._outbound_queue) > 256 and peer.up and time.monotonic() - t0 < limit_s:
            await asyncio.sleep(0.01)  # the receiver stopped acknowledging: it refused the message
    return _kept(peer, f"{sent / 2**20:.1f} MiB of one message queued, no end")


# --------------------------------------------------------------------------- HTTP


async def _raw_offer(target: Target, head_only: bytes, drip: bytes, every_s: float) -> tuple[int, float]:
    """POST /offer whose body arrives one byte per ``every_s``; returns (status, when answered)."""
    r, w = await asyncio.open_connection(target.host, target.port)
    try:
        w.write(head_only)
        await w.drain()
        status_line = asyncio.ensure_future(r.readline())
        for b in drip:
            done, _ = await asyncio.wait({status_line}, timeout=every_s)
            if done:
                break
            w.write(bytes([b]))
            await w.drain()
        line = await asyncio.wait_for(status_line, 30)
        return int(line.split()[1]), time.monotonic()
    finally:
        w.close()


async def slow_bodies(target: Target) -> Outcome:
    body = json.dumps({"sdp": "v=0\r\n" + "a=x\r\n" * 200, "type": "offer"}).encode()
    head = (f"POST {OFFER_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    n = 2 * target.max_calls
    results = await asyncio.gather(*(_raw_offer(target, head, body, 0.5) for _ in range(n)))
    out = Outcome(freed_at=max(t for _, t in results), statuses=Counter(s for s, _ in results))
    out.note = f"{n} offers dripping 2 B/s"
    return out


async def offer_sdp() -> str:
    """A real aiortc offer with one data channel (the raw material of the SDP attacks)."""
    pc = RTCPeerConnection()
    pc.createDataChannel("control")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def without_lines(sdp: str, prefix: str) -> str:
    """``sdp`` with every line starting with ``prefix`` removed."""
    return "\r\n".join(ln for ln in sdp.split("\r\n") if not ln.startswith(prefix))


async def unusable_sdp(target: Target) -> Outcome:
    import aiohttp

    sdp = await offer_sdp()
    audio = sdp.replace("m=application", "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=rtpmap:0 PCMU/8000\r\nm=application")
    garbled = sdp.replace("a=fingerprint:sha-256 ", "a=fingerprint:sha-256 zz").replace("a=setup:", "a=setup:x")
    bodies: list[bytes] = [b"{not json", b"[1, 2]", json.dumps({"sdp": sdp, "type": "answer"}).encode(),
                           json.dumps({"sdp": "v=0" + "a" * 200_000, "type": "offer"}).encode()]
    bodies += [json.dumps({"sdp": s, "type": "offer"}).encode()
               for s in (without_lines(sdp, "m="), without_lines(sdp, "a=candidate"),
                         without_lines(sdp, "a=fingerprint"), without_lines(sdp, "a=ice-ufrag"), audio, garbled,
                         "v=0\r\n" + "m=application\r\n" * 999)]
    statuses: Counter = Counter()
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async def post(body: bytes) -> None:
            async with http.post(target.url + OFFER_PATH, data=body, headers=headers) as resp:
                statuses[resp.status] += 1
        for _ in range(5):  # one at a time: offers at once would mostly be refused as busy, unparsed
            for b in bodies:
                await post(b)
    return Outcome(freed_at=time.monotonic(), statuses=statuses, note=f"{sum(statuses.values())} offers")


async def no_attack(target: Target) -> Outcome:
    return Outcome(freed_at=time.monotonic(), note="-")


CATALOGUE: list[Attack] = [
    Attack("baseline", "nothing (the normal call alone)", "renders the call", no_attack),
    Attack("jpeg-32767-trunc", "source image: 629 B truncated JPEG claiming 32767x32767",
           "refuses it from the header", _bomb(jpeg_claiming(32767, 32767, keep=629))),
    Attack("jpeg-12000-trunc", "source image: truncated JPEG claiming 12000x12000",
           "refuses it from the header", _bomb(jpeg_claiming(12000, 12000, keep=400))),
    Attack("jpeg-4096-trunc", "source image: truncated JPEG claiming 4096x4096",
           "refuses it from the header", _bomb(jpeg_claiming(4096, 4096, keep=400))),
    Attack("png-30000-ihdr", "source image: PNG whose IHDR claims 30000x30000",
           "refuses it from the header", _bomb(png_claiming(30000, 30000))),
    Attack("webp-16383", "source image: WebP whose VP8 header claims 16383x16383",
           "refuses it from the header", _bomb(webp_claiming(16383, 16383))),
    Attack("png-2048-zeros", "source image: 12 KB PNG that inflates to 2048x2048 (the limit)",
           "accepts it, decodes off the loop", _bomb(png_zeros(2048))),
    Attack("far-ahead-seq", "keypoints, then one frame with seq 2^62, then more", "caps the forecast", far_ahead),
    Attack("absurd-timestamps", "keypoints with capture times 0 and 2^62 alternating", "keeps playing",
           absurd_timestamps),
    Attack("second-hello", "30 frames, a second Hello, seq 0-29 again", "restarts the stream", second_hello),
    Attack("message-flood", "valid heartbeats as fast as the channel takes for 2 s", "rate-limits them",
           message_flood),
    Attack("slow-body", "2 x max-calls offers whose body drips at 2 B/s", "max-calls x 408 at 5 s, rest 503",
           slow_bodies),
    Attack("unusable-sdp", "55 offers: not JSON, wrong type, 200 KB, no m=/candidates/fingerprint/ufrag, "
           "audio, garbled", "4xx, holds no slot, counts no call", unusable_sdp),
    Attack("junk-no-hello", "random bytes / msgpack / wrong-version Hellos every 20 ms, never a Hello",
           "hangs up 5 s after its first message", junk_peer),
    Attack("channel-flood", "42 data channels", "hangs up (over 16 streams)", channel_flood),
    Attack("huge-8MiB", "one 8 MiB data-channel message (256 KiB advertised)", "hangs up at 256 KiB",
           huge_message),
    Attack("never-ending", "one SCTP message that never ends (no last fragment)", "hangs up at 256 KiB",
           never_ending),
    Attack("silent", "connects, opens both channels, sends nothing", "hangs up after the setup timeout", silent),
    Attack("silent-full", "max-calls silent peers, then a caller", "lets the caller in (evicts a silent peer)",
           silent_full),
    Attack("dead-offers", "4 offers/s answered but never connected, a caller after 1 s (offering again on 503)",
           "lets the caller in (unconnected peers give way after 3-4 s)", dead_offers),
]
BY_NAME = {a.name: a for a in CATALOGUE}
