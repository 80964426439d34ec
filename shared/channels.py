"""The call's two data channels, as both ends name them, and the transport under them.

A sender opens both; a receiver accepts exactly these two and nothing else:

- ``control``: ordered and reliable: Hello, the source image, heartbeats, keyframe and source
  requests, SourceReady, Bye;
- ``kp``: unordered with no retransmissions (``maxRetransmits=0``): a late keypoint frame is worth
  nothing, so a lost one is concealed or repaired by the next message rather than resent.
"""

from __future__ import annotations

from typing import Any

CONTROL_LABEL = "control"
KEYPOINT_LABEL = "kp"
CHANNEL_LABELS = (CONTROL_LABEL, KEYPOINT_LABEL)


def transport_counters(pc: Any) -> dict[str, int]:
    """UDP payload bytes and packets each way through a peer connection's DTLS transport (all channels,
    handshakes included), or {} when unknown.

    aiortc's ``RTCPeerConnection.getStats()`` reports media senders and receivers only; the data
    channels' DTLS transport has no public counters, so this reads its ``_get_stats`` (best effort: an
    aiortc without it gives {}, and the call's stats just lack these fields).
    """
    try:
        report = pc.sctp.transport._get_stats() if pc.sctp else {}
        s = next(iter(report.values()), None)
    except Exception:  # stats are best effort, never fatal
        return {}
    if s is None:
        return {}
    return {"udp_bytes_sent": s.bytesSent, "udp_packets_sent": s.packetsSent,
            "udp_bytes_received": s.bytesReceived, "udp_packets_received": s.packetsReceived}
