"""Immediate playout's policy (receiver.immediate): what is shown, repeated or dropped, and why."""

import numpy as np

from receiver.immediate import ImmediatePlayout, QueuedFrame


def frame(seq: int, skipped: bool = False, value: float = 0.0) -> QueuedFrame:
    return QueuedFrame(seq, seq * 33_000, np.full(60, value, np.float32), skipped)


def ok(seq: int) -> str:
    return "ok"


def never(vec: np.ndarray) -> bool:
    return False


def drain(p: ImmediatePlayout, route=ok, shows=never) -> list[tuple[str, int]]:
    out = []
    while (step := p.next(route, shows)) is not None:
        out.append((step[0], step[1].seq))
    return out


def test_frames_in_order_are_rendered() -> None:
    p = ImmediatePlayout()
    for s in range(3):
        p.push(frame(s))
    assert drain(p) == [("render", 0), ("render", 1), ("render", 2)] and p.last_seq == 2


def test_behind_real_time_skips_to_the_newest_few() -> None:
    p = ImmediatePlayout(max_behind=3)
    for s in range(6):
        p.push(frame(s))
    assert drain(p) == [("behind", 0), ("behind", 1), ("behind", 2), ("render", 3), ("render", 4), ("render", 5)]


def test_an_older_frame_than_one_shown_is_dropped() -> None:
    p = ImmediatePlayout()
    p.push(frame(5))
    assert drain(p) == [("render", 5)]
    p.push(frame(4))
    assert drain(p) == [("reordered", 4)]


def test_waits_for_an_image_and_drops_frames_of_a_replaced_one() -> None:
    p = ImmediatePlayout()
    p.push(frame(0))
    p.push(frame(1))
    assert p.next(lambda s: "wait", never) is None and p.pending() == 2  # nothing lost while waiting
    assert drain(p, route=lambda s: "old" if s == 0 else "ok") == [("old", 0), ("render", 1)]


def test_skipped_frame_that_shows_the_same_picture_is_not_rendered() -> None:
    p = ImmediatePlayout()
    p.push(frame(0))
    p.push(frame(1, skipped=True))
    p.push(frame(2, skipped=True, value=1.0))
    same = lambda vec: float(vec[0]) == 0.0  # noqa: E731
    assert drain(p, shows=same) == [("render", 0), ("same", 1), ("render", 2)] and p.last_seq == 2


def test_bounded_queue_and_reset() -> None:
    p = ImmediatePlayout(max_queued=4)
    assert all(p.push(frame(s)) for s in range(4))
    assert not p.push(frame(4))  # the oldest made room
    assert [f.seq for f in p.queued()] == [1, 2, 3, 4]
    drain(p)
    p.reset()
    assert p.pending() == 0 and p.last_seq == -1
    p.push(frame(0))
    assert drain(p) == [("render", 0)]  # the restarted stream's seq 0 is new again
