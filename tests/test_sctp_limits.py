"""Inbound SCTP limits on a real aiortc association (two peer connections on loopback in this process).

The "attacker" is a plain aiortc peer that ignores the size we advertise (its own transport is
told the limit is 16 MiB) or, for what aiortc would never send, has chunks injected the way
its packets would deliver them once decrypted.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiortc
import pytest
from aiortc import RTCDataChannel, RTCPeerConnection
from aiortc.rtcsctptransport import SCTP_DATA_FIRST_FRAG, SCTP_DATA_LAST_FRAG, SCTP_DATA_UNORDERED, DataChunk

from receiver.sctp_limits import ADVERTISED_MAX_MESSAGE_BYTES, limit_inbound
from shared.ice import restrict_host_addresses
from tests.harness import until

pytestmark = pytest.mark.call  # aiortc peers on loopback

WEBRTC_BINARY = 53  # SCTP payload protocol id of a binary data-channel message


@dataclass
class Pair:
    attacker: RTCPeerConnection
    victim: RTCPeerConnection
    channel: RTCDataChannel
    violations: list[str] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)

    def held_bytes(self) -> int:
        return sum(len(c.user_data) for s in self.victim.sctp._inbound_streams.values() for c in s.reassembly)

    def inject(self, tsn: int, data: bytes, flags: int = SCTP_DATA_UNORDERED, stream_id: int | None = None):
        """A DATA chunk as the victim's transport would parse it from the attacker's packet."""
        sid = self.channel.id if stream_id is None else stream_id
        body = struct.pack("!LHHL", tsn, sid, 0, WEBRTC_BINARY) + data
        return self.victim.sctp._receive_chunk(DataChunk(flags, body))

    def next_tsn(self) -> int:
        return (self.victim.sctp._last_received_tsn + 1) % (1 << 32)


async def _pair(**limits) -> Pair:
    restrict_host_addresses(["127.0.0.1"])
    attacker, victim = RTCPeerConnection(), RTCPeerConnection()
    channel = attacker.createDataChannel("control")
    await attacker.setLocalDescription(await attacker.createOffer())
    await victim.setRemoteDescription(attacker.localDescription)
    pair = Pair(attacker, victim, channel)
    assert limit_inbound(victim.sctp, pair.violations.append, **limits)
    victim.on("datachannel", lambda ch: ch.on("message", pair.received.append))
    await victim.setLocalDescription(await victim.createAnswer())
    await attacker.setRemoteDescription(victim.localDescription)
    opened = asyncio.Event()
    channel.on("open", opened.set)
    await asyncio.wait_for(opened.wait(), 20)
    attacker.sctp._remote_max_message_size = 16 * 1024 * 1024  # the attacker ignores what we advertised
    return pair


@pytest.fixture
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    p = await _pair(**getattr(request, "param", {}))
    yield p
    await p.attacker.close()
    await p.victim.close()
    restrict_host_addresses(None)


def test_pinned_aiortc_has_what_the_limits_wrap() -> None:
    # The wrapped methods are aiortc internals: an upgrade that renames them must fail here, not silently.
    assert aiortc.__version__ == "1.16.0"
    assert ADVERTISED_MAX_MESSAGE_BYTES == 256 * 1024


async def test_messages_within_the_advertised_size_pass(pair: Pair) -> None:
    pair.channel.send(b"small")
    pair.channel.send(b"y" * (200 * 1024))  # fragmented into ~170 chunks, under the limit
    await until(lambda: len(pair.received) == 2, "both messages", interval_s=0.01)
    assert pair.received == [b"small", b"y" * (200 * 1024)] and pair.violations == []


async def test_message_over_the_advertised_size_is_refused(pair: Pair) -> None:
    pair.channel.send(b"x" * (300 * 1024))
    await until(lambda: pair.violations, "a violation", interval_s=0.01)
    pair.channel.send(b"after")  # the association is dropped from now on: nothing more is delivered
    await asyncio.sleep(0.3)
    assert pair.received == [] and len(pair.violations) == 1
    assert pair.held_bytes() == 0


async def test_huge_message_is_stopped_at_about_the_advertised_size(pair: Pair) -> None:
    pair.channel.send(b"z" * (8 * 1024 * 1024))
    await until(lambda: pair.violations, "a violation", interval_s=0.01)
    assert pair.received == [] and pair.held_bytes() == 0
    assert "message over" in pair.violations[0]


@pytest.mark.parametrize("pair", [{"max_held_bytes": 64 * 1024}], indirect=True)
async def test_a_message_that_never_completes_is_bounded(pair: Pair) -> None:
    # Fragments after a missing first one: aiortc holds them all, waiting for the gap to fill.
    tsn, peak = (pair.next_tsn() + 1) % (1 << 32), 0
    for i in range(200):  # 200 kB offered
        await pair.inject((tsn + i) % (1 << 32), b"m" * 1000, flags=0)
        peak = max(peak, pair.held_bytes())
        if pair.violations:
            break
    assert pair.violations and "held for reassembly" in pair.violations[0]
    assert peak <= 64 * 1024 and pair.held_bytes() == 0


@pytest.mark.parametrize("pair", [{"max_held_chunks": 100}], indirect=True)
async def test_many_tiny_chunks_are_bounded(pair: Pair) -> None:
    tsn = (pair.next_tsn() + 1) % (1 << 32)
    for i in range(1000):
        await pair.inject((tsn + i) % (1 << 32), b"t", flags=0)
        if pair.violations:
            break
    assert pair.violations and i < 200


async def test_empty_data_chunk_and_stray_streams_are_violations(pair: Pair) -> None:
    await pair.inject(pair.next_tsn(), b"", flags=SCTP_DATA_FIRST_FRAG | SCTP_DATA_LAST_FRAG)
    assert pair.violations == ["empty DATA chunk"]
    other = await _pair(max_streams=4)
    try:
        tsn = other.next_tsn()
        for sid in range(100, 110):  # chunks on streams nobody opened
            await other.inject((tsn + sid) % (1 << 32), b"s", flags=0, stream_id=sid)
        assert other.violations and "inbound streams" in other.violations[0]
    finally:
        await other.attacker.close()
        await other.victim.close()
