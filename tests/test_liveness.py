"""Who holds a call slot (receiver.liveness): the Hello's deadline, the heartbeat, the receiver's own stalls."""

from receiver.liveness import Liveness


def make(t0: float = 100.0) -> Liveness:
    return Liveness(heartbeat_timeout_s=1.5, setup_timeout_s=15.0, hello_timeout_s=5.0, created=t0)


def test_silent_peer_gets_the_setup_timeout() -> None:
    lv = make()
    assert lv.expired(114.0, said_hello=False, source_ready=False) is None
    assert lv.expired(116.0, said_hello=False, source_ready=False) == "peer timeout"


def test_a_peer_that_talks_must_say_hello_soon() -> None:
    lv = make()
    lv.message(101.0)
    lv.message(102.0)  # only the first message starts the Hello's clock
    assert lv.first_message == 101.0
    assert lv.expired(105.5, said_hello=False, source_ready=False) is None
    assert lv.expired(106.5, said_hello=False, source_ready=False) == "no hello"


def test_heartbeat_after_the_source_and_setup_before_it() -> None:
    lv = make()
    lv.valid(110.0)
    assert lv.expired(113.0, said_hello=True, source_ready=False) is None  # the image may be retransmitting
    assert lv.expired(126.0, said_hello=True, source_ready=False) == "peer timeout"
    assert lv.expired(111.0, said_hello=True, source_ready=True) is None
    assert lv.expired(112.0, said_hello=True, source_ready=True) == "peer timeout"


def test_the_receivers_own_stall_is_not_the_peers_silence() -> None:
    lv = make()
    lv.valid(110.0)
    lv.stalled(2.0)
    assert lv.expired(112.0, said_hello=True, source_ready=True) is None
    lv.valid(112.0)  # a valid message resets both
    assert lv.lag_since_seen == 0.0 and lv.expired(113.6, said_hello=True, source_ready=True) == "peer timeout"
