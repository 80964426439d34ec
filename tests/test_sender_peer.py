"""sender.peer: what the sender accepts on its keypoint channel (a receiver's KeyframeRequest copy)."""

from __future__ import annotations

import numpy as np

from sender.peer import SenderPeer
from shared import protocol as P


async def test_a_keyframe_request_on_the_keypoint_channel_reaches_the_sender_and_nothing_else_does() -> None:
    got: list[P.Message] = []
    peer = SenderPeer(got.append)
    try:
        peer._on_kp(P.encode(P.KeyframeRequest(41)))
        assert got == [P.KeyframeRequest(41)]
        # a receiver (or a hostile peer) may not use the keypoint channel for anything else
        peer._on_kp(P.encode(P.Bye("done")))
        peer._on_kp(P.encode(P.KeypointBatch.build(1, 0, [np.zeros(60, np.float32)])))
        peer._on_kp(b"\x01\x02 not msgpack")
        assert got == [P.KeyframeRequest(41)]
        assert peer.rejected.counts["channel"] == 2 and peer.rejected.total == 3
        assert not peer.closed.is_set()  # a Bye on the wrong channel does not end the call
    finally:
        await peer.pc.close()


def test_the_second_copy_of_a_request_is_not_a_second_keyframe() -> None:
    from sender.call import SenderCall

    class Pred:
        def __init__(self) -> None:
            self.requests = 0

        def request_keyframe(self) -> None:
            self.requests += 1

    call = SenderCall.__new__(SenderCall)  # only the message handler's state
    call.pred, call._last_kf_request, call.ready, call.source_requests = Pred(), None, {}, []
    call._on_message(P.KeyframeRequest(10))
    call._on_message(P.KeyframeRequest(10))  # the other channel's copy
    call._on_message(P.KeyframeRequest(12))  # a new loss
    assert call.pred.requests == 2
