"""receiver.sources.SourceRouter: named images that never come are given up, so the one that does is used.

An outside probe sent keypoint frames naming images it never sent: they filled the router's table of
named images for good, and the frames of the image that did arrive were refused. Named images now
expire: superseded by a newer image that is ready (images complete in id order), or, when the table
is full, by time. Their frames are dropped like those of a replaced image, never drawn on another.
"""

from __future__ import annotations

import pytest

from receiver.sources import GIVEN_UP, MAX_IMAGES_AHEAD, SourceRouter
from shared import protocol as P


def _probed(ttl_s: float = 5.0) -> SourceRouter:
    """Image 0 in use; frames name images 1, 2, 3 (never sent): the table is full."""
    r = SourceRouter(pending_ttl_s=ttl_s)
    r.switch(0)
    assert r.admit(1, 0, now=0.0)
    for k in (1, 2, 3):
        assert r.admit(10 * k, k, now=float(k))
    return r


def test_a_full_table_of_fresh_names_still_refuses_a_new_one() -> None:
    r = _probed()
    with pytest.raises(P.ProtocolError) as e:
        r.admit(40, 4, now=4.0)
    assert e.value.reason == "field" and r.counts["given_up"] == 0


def test_the_image_that_arrives_supersedes_older_names_that_never_did() -> None:
    r = _probed()
    with pytest.raises(P.ProtocolError):
        r.admit(40, 4, now=4.0)  # its first frames come before it does, while the table is full
    r.add_ready(4, "image 4")  # it arrived: images complete in id order, so 1, 2 and 3 never will
    assert r.counts["given_up"] == 3
    assert r.admit(41, 4, now=4.5)  # its frames are accepted now
    assert r.image_for(41) == 4 and r.ready(4) == "image 4"
    # the given-up images' frames are dropped as old (not drawn on image 0 or 4), the held one's are kept
    assert [r.image_for(s) for s in (1, 9, 10, 25, 39)] == [0, 0, GIVEN_UP, GIVEN_UP, GIVEN_UP]
    assert r.is_old(25) and not r.is_old(5) and not r.is_old(41)
    assert not r.admit(26, 2, now=5.0) and r.counts["old_image"] == 1  # a late frame naming one: dropped
    r.switch(4)
    assert r.image_for(41) == 4 and r.counts["switches"] == 1


def test_with_the_table_full_names_overdue_make_room_for_a_new_one() -> None:
    r = _probed(ttl_s=5.0)  # 1, 2, 3 named at t = 1, 2, 3 s
    assert r.admit(40, 4, now=7.5)  # 1 and 2 are more than 5 s old: given up; 3 is not
    assert r.counts["given_up"] == 2
    assert [r.image_for(s) for s in (15, 25, 35, 45)] == [GIVEN_UP, GIVEN_UP, 3, 4]
    r.add_ready(3, "image 3")  # 3 was only late: still used
    assert r.ready(3) == "image 3" and r.image_for(35) == 3


def test_ready_and_held_images_are_never_given_up() -> None:
    r = SourceRouter(pending_ttl_s=1.0)
    r.switch(0)
    assert r.admit(0, 0, now=0.0) and r.admit(10, 1, now=0.0) and r.admit(20, 2, now=0.0)
    r.add_ready(1, "image 1")
    assert r.admit(30, 3, now=9.5)
    assert r.admit(40, 4, now=10.0)  # 2 is overdue and goes; 0 (held) and 1 (ready) stay, 3 is not due
    assert r.counts["given_up"] == 1
    assert [r.image_for(s) for s in (5, 15, 25, 35, 45)] == [0, 1, GIVEN_UP, 3, 4]


def test_given_up_names_stay_bounded() -> None:
    r = SourceRouter(pending_ttl_s=1.0)
    r.switch(0)
    for k in range(1, 200):  # a peer naming image after image and never sending one
        assert r.admit(10 * k, k, now=2.0 * k)
    assert len(r._starts) <= MAX_IMAGES_AHEAD and len(r._given_up) <= MAX_IMAGES_AHEAD
    assert r.counts["given_up"] > 150


def test_a_restart_forgets_given_up_images() -> None:
    r = _probed()
    r.add_ready(4, "image 4")
    r.restart()  # a new Hello: seqs start over, the old ranges mean nothing
    assert r.image_for(15) == 0 and r.admit(5, 4, now=6.0)
