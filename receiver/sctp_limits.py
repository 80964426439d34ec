"""Bounds on what a peer can make aiortc's SCTP layer hold in memory for one call.

aiortc advertises ``a=max-message-size:262144`` in its SDP but reassembles an inbound
message of any size, and holds out-of-order chunks without limit (its sending side ignores
the receive window, and a hostile peer need not honour it anyway). aiortc has no hook for
this, and we do not patch its core: :func:`limit_inbound` wraps three methods of *one*
``RTCSctpTransport`` instance, from outside, before any data can arrive:

- ``_receive_chunk`` (every chunk of every packet): before a DATA chunk is added to the
  reassembly queue, refuse it when it is empty, when the message it continues in TSN order has
  already passed ``max_message_bytes`` (a huge or never-ending message is stopped here, at
  about the advertised size), or when the bytes or chunks held for reassembly across the
  association would pass ``max_held_bytes`` / ``max_held_chunks``. After each chunk, refuse
  more than ``max_streams`` inbound streams (every data channel is one; a FORWARD-TSN can
  name any stream id) and more than ``max_misordered`` TSNs received beyond a gap (aiortc keeps
  each one in a set that it filters on every chunk).
- ``_receive`` (a complete message, before the data-channel layer): refuse one longer than
  ``max_message_bytes`` (its fragments may have arrived out of order, so the in-order check
  above did not see it whole).

A refusal is a protocol violation: every later chunk is dropped, the reassembly queues are
emptied, and ``on_violation(reason)`` is called once (the session hangs up). What is bounded:
bytes and chunks waiting for reassembly, streams, the gap set, and the size of every message
delivered to the data channels. What is not: a message below ``max_message_bytes`` is still
reassembled (one join of at most that many bytes) before our decoder refuses it by its own,
smaller limit; aiortc's per-packet work (parsing, SACKs) is whatever the packet rate is,
which the DTLS and UDP layers below bound, not us. The wrapped attributes are private to
aiortc: :func:`limit_inbound` returns False and logs when they are missing (another version),
and tests pin the installed one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiortc import RTCSctpTransport
from aiortc.rtcsctptransport import SCTP_DATA_FIRST_FRAG, SCTP_DATA_LAST_FRAG, DataChunk

log = logging.getLogger(__name__)

# What this end advertises in its SDP (aiortc's local maximum, 256 KiB).
ADVERTISED_MAX_MESSAGE_BYTES = RTCSctpTransport.getCapabilities().maxMessageSize
# aiortc advertises a 1 MiB receive window; a sender on a lossy path can have about that much
# in flight behind a lost chunk, so the bound on what is held is a few windows, not one.
MAX_HELD_BYTES = 4 * 1024 * 1024
MAX_HELD_CHUNKS = 8192  # full chunks are ~1.2 kB: 4 MiB is ~3500 of them; tiny ones cost ~200 B each
MAX_STREAMS = 16  # the sender opens two data channels
MAX_MISORDERED = 16384

_NEEDED = ("_receive_chunk", "_receive", "_inbound_streams", "_sack_misordered", "_advertised_rwnd")


def limit_inbound(sctp: RTCSctpTransport, on_violation: Callable[[str], None],
                  max_message_bytes: int = ADVERTISED_MAX_MESSAGE_BYTES, max_held_bytes: int = MAX_HELD_BYTES,
                  max_held_chunks: int = MAX_HELD_CHUNKS, max_streams: int = MAX_STREAMS,
                  max_misordered: int = MAX_MISORDERED) -> bool:
    """Enforce the limits above on ``sctp``'s inbound side; True when installed."""
    missing = [a for a in _NEEDED if not hasattr(sctp, a)]
    if missing:
        log.warning("aiortc's SCTP transport lacks %s: inbound message sizes are NOT bounded", missing)
        return False
    receive_chunk, receive = sctp._receive_chunk, sctp._receive
    # aiortc lowers its advertised window by every byte it adds to a reassembly queue and raises
    # it by every byte it delivers or prunes: the window it started with minus the current one
    # is what it holds, known in O(1) per chunk.
    window = sctp._advertised_rwnd
    runs: dict[int, list[int]] = {}  # stream id -> [next TSN of the message being reassembled, its bytes]
    tripped: list[str] = []

    def violate(reason: str) -> None:
        if tripped:
            return
        tripped.append(reason)
        for stream in sctp._inbound_streams.values():
            stream.reassembly.clear()  # free what the peer made us hold now, not when the call is gone
        runs.clear()
        log.warning("SCTP peer violated our limits (%s): dropping its data", reason)
        on_violation(reason)

    def held() -> tuple[int, int]:
        chunks = sum(len(s.reassembly) for s in sctp._inbound_streams.values())  # <= max_streams of them
        return chunks, window - sctp._advertised_rwnd

    async def guarded_chunk(chunk: object) -> None:
        if tripped:
            return
        if isinstance(chunk, DataChunk):
            size = len(chunk.user_data)
            if size == 0:
                violate("empty DATA chunk")
                return
            run = runs.get(chunk.stream_id)
            if chunk.flags & SCTP_DATA_FIRST_FRAG:
                run = runs[chunk.stream_id] = [chunk.tsn, 0]
            if run is not None and chunk.tsn == run[0]:  # fragments of one message have consecutive TSNs
                run[0] = (run[0] + 1) % (1 << 32)
                run[1] += size
                if run[1] > max_message_bytes:
                    violate(f"message over {max_message_bytes} B")
                    return
                if chunk.flags & SCTP_DATA_LAST_FRAG:
                    del runs[chunk.stream_id]
            chunks, nbytes = held()
            if nbytes + size > max_held_bytes or chunks + 1 > max_held_chunks:
                violate(f"over {max_held_bytes} B or {max_held_chunks} chunks held for reassembly")
                return
        await receive_chunk(chunk)
        if len(sctp._inbound_streams) > max_streams:
            violate(f"more than {max_streams} inbound streams")
        elif len(sctp._sack_misordered) > max_misordered:
            violate(f"more than {max_misordered} TSNs beyond a gap")

    async def guarded_receive(stream_id: int, pp_id: int, data: bytes) -> None:
        if tripped:
            return
        if len(data) > max_message_bytes:
            violate(f"message of {len(data)} B over {max_message_bytes} B")
            return
        await receive(stream_id, pp_id, data)

    sctp._receive_chunk = guarded_chunk
    sctp._receive = guarded_receive
    return True
