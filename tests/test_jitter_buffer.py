"""Jitter buffer alone: ordering, duplicates, late frames, clock mapping, adaptive delay, memory."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from receiver.jitter_buffer import DUPLICATE, LATE, OK, JitterBuffer, JitterConfig
from tests.utils import FakeLink

V = np.zeros(60, dtype=np.float32)
US = 1_000_000 / 30  # frame interval, us


def feed(buf: JitterBuffer, link: FakeLink, n: int, t0: float = 0.0, release_lag: int | None = None,
         seq0: int = 0) -> list[float]:
    """Send n frames over link into buf; returns the target delay (ms) after each arrival."""
    for i in range(n):
        link.send(seq0 + i, t0 + i / 30, V)
    targets = []
    for a in link.deliver(float("inf")):
        buf.push(a.seq, a.capture_us, a.vector, a.arrival_s)
        targets.append(buf.target_delay_s * 1000)
        if release_lag is not None and a.seq - release_lag > (buf.floor if buf.floor is not None else -1):
            buf.release_through(a.seq - release_lag)
    return targets


def test_in_order_and_reorder_are_sorted():
    buf = JitterBuffer()
    for s in [3, 0, 2, 1, 5, 4]:
        assert buf.push(s, int(s * US), V + s, 10.0 + s) == OK
    assert [f.seq for f in buf.frames_between(-1, 10)] == [0, 1, 2, 3, 4, 5]
    assert buf.first().seq == 0 and buf.newest.seq == 5
    assert buf.next_after(2).seq == 3
    assert buf.next_after(5) is None
    assert buf.release_through(2) == 2  # seqs 0 and 1 released unplayed, 2 was played
    assert buf.first().seq == 3 and len(buf) == 3


def test_duplicates_and_late_frames_rejected_and_counted():
    buf = JitterBuffer()
    assert buf.push(0, 0, V, 1.0) == OK
    assert buf.push(0, 0, V, 1.01) == DUPLICATE
    assert buf.push(2, int(2 * US), V, 1.07) == OK
    buf.release_through(2)
    assert buf.push(1, int(US), V, 1.2) == LATE  # its slot was skipped
    assert buf.push(2, int(2 * US), V, 1.2) == DUPLICATE  # played already: a duplicate, not late
    assert buf.push(1, int(US), V, 1.3) == DUPLICATE
    assert buf.counts == {"received": 2, "duplicates": 3, "late": 1, "evicted": 0, "predicted": 0, "predicted_late": 0}


def test_clock_offset_is_the_minimum_transit():
    buf = JitterBuffer()
    link = FakeLink(delay_ms=30, jitter_ms=40, seed=1, offset_s=12345.0)
    for i in range(300):
        link.send(i, 50.0 + i / 30, V)
    for a in link.deliver(float("inf")):
        buf.push(a.seq, a.capture_us, a.vector, a.arrival_s)
    # transit = arrival - capture = -12345 s + 30 ms + jitter; the min is within a ms of +30 ms
    assert buf.offset_at(12345.0 + 60.0) == pytest.approx(-12345.0 + 0.030, abs=0.005)
    # frame captured at sender time c is due at c + offset + target
    c_us = (12345.0 + 55.0) * 1e6
    assert buf.capture_due(buf.playout_time(c_us)) == pytest.approx(c_us * 1e-6, abs=1e-6)


@pytest.mark.parametrize("drift", [0.001, -0.001])
def test_clock_drift_neither_grows_nor_drains(drift):
    buf = JitterBuffer()
    link = FakeLink(delay_ms=20, jitter_ms=10, seed=2, drift=drift)
    n = 30 * 120  # two minutes: 120 ms of accumulated drift
    for i in range(n):
        link.send(i, i / 30, V)
    rel_at_play = []
    for a in link.deliver(float("inf")):
        buf.push(a.seq, a.capture_us, a.vector, a.arrival_s)
        # a frame arriving now is played at playout_time(capture); how long it waits must stay put
        rel_at_play.append(buf.playout_time(a.capture_us) - a.arrival_s)
    assert buf.stats()["drift_ppm"] == pytest.approx(drift * 1e6, abs=300)
    late_half = np.array(rel_at_play[n // 2:])
    # without drift handling the wait would change by ~60 ms over the second minute
    assert np.percentile(late_half, 5) > -0.002, "frames would arrive after their playout time"
    assert np.percentile(late_half, 95) < 0.040, "the buffer would grow"
    assert buf.target_delay_s < 0.035


def test_adaptive_delay_grows_fast_on_jitter_and_shrinks_slowly():
    cfg = JitterConfig(initial_delay_ms=20)
    buf = JitterBuffer(cfg)
    calm = feed(buf, FakeLink(delay_ms=20, jitter_ms=2, seed=3), 300, t0=0.0, release_lag=5)
    assert calm[-1] < 20
    rough = feed(buf, FakeLink(delay_ms=20, jitter_ms=150, seed=4), 150, t0=10.0, release_lag=5, seq0=300)
    # within a second (30 frames) of the jitter starting the target covers most of it
    assert max(rough[:30]) > 100
    assert rough[-1] > 120
    calm2 = feed(buf, FakeLink(delay_ms=20, jitter_ms=2, seed=5), 600, t0=15.0, release_lag=5, seq0=450)
    # shrinks slowly: ~15 ms/s once the 3 s window has forgotten the jitter
    assert calm2[30] > 100, "dropped too fast after the network calmed down"
    assert calm2[-1] < 25, "never came back down"
    assert all(b <= a + 1.0 for a, b in itertools.pairwise(calm2)), "must not grow again when calm"


def test_bounded_memory():
    cfg = JitterConfig(capacity=64, seen_window=128, window=50)
    buf = JitterBuffer(cfg)
    for i in range(5000):  # nobody releases anything
        buf.push(i, int(i * US), V, i / 30)
    assert len(buf) == 64 and buf.counts["evicted"] == 5000 - 64
    assert len(buf._seen) <= 128 and len(buf._transits) <= 50 and len(buf._buckets) <= cfg.offset_buckets + 1
    assert buf.first().seq == 5000 - 64


@pytest.mark.parametrize("kp_every", [1, 2])
def test_startup_burst_drains_in_seconds_not_for_the_whole_call(kp_every: int):
    """The first frames queue behind the source image and arrive together 0.5 s late: the target
    must come back to what the jitter needs within a few seconds, whatever the decimation."""
    rng = np.random.default_rng(0)
    extra = (kp_every - 1) * 1000 / 30
    buf = JitterBuffer(JitterConfig(extra_delay_ms=extra))
    arrivals = []
    for i in range(0, 600, kp_every):
        cap = i / 30
        arr = cap + 0.040 + rng.uniform(0, 0.050)
        if i < 30:
            arr = max(arr, 0.5 + i * 0.0005)  # the burst
        arrivals.append((arr, i, cap))
    targets = []
    for arr, i, cap in sorted(arrivals):
        buf.push(i, int(cap * 1e6), V, arr)
        targets.append((arr, buf.target_delay_s * 1000))
    assert max(t for _, t in targets) > 300  # the burst did lift the target (fast attack)
    settled = 50 + 10 + extra  # 95 % of U(0, 50 ms) + margin + decimation
    after_5s = [t for a, t in targets if a > 5.5]
    assert max(after_5s) < settled + 25, "the start-up burst still inflates the delay"
    assert min(after_5s) > settled - 25, "drained below what the jitter needs"


def test_frames_before_the_source_image_do_not_move_the_target():
    """The session marks the source image's arrival; the burst queued behind it is not jitter."""
    buf = JitterBuffer()
    buf.ignore_delays_until(float("inf"))
    for i in range(15):  # captured over 0.5 s, all arriving at 0.6 s: a burst
        assert buf.push(i, int(i * US), V, 0.6 + i * 0.0005) == OK
    assert buf.target_delay_s == pytest.approx(0.060)  # still the initial delay
    assert buf.has_timing  # ... but they did set the clock offset
    buf.ignore_delays_until(0.7)
    for i in range(15, 120):  # then a steady link: 40 ms + U(0, 20 ms)
        buf.push(i, int(i * US), V, i / 30 + 0.040 + 0.020 * ((i * 7) % 10) / 10)
    assert buf.target_delay_s < 0.045
    # the same arrivals without the mark: the burst lifts the target far above that
    ref = JitterBuffer()
    for i in range(15):
        ref.push(i, int(i * US), V, 0.6 + i * 0.0005)
    assert ref.target_delay_s > 0.3


def test_skipped_frames_stay_out_of_the_timing_model():
    """Frames the sender skipped arrive (decoded) with the next coded frame, up to max_gap frames after
    their capture time: counted as network delay they would lift the target by that much."""
    gap = 8
    plain, pred = JitterBuffer(), JitterBuffer()
    for i in range(0, 600, gap + 1):  # every 9th frame coded, 20 ms transit; the 8 before it skipped
        arrival = 50.0 + i / 30 + 0.020
        for b in (plain, pred):
            b.push(i, int(i * US), V, arrival)
        for s in range(i - gap, i):
            if s > 0:
                assert pred.push(s, int(s * US), V, arrival, predicted=True) == OK
                plain.push(s, int(s * US), V, arrival)  # what not marking them would do
        for b in (plain, pred):
            b.release_through(i - gap - 1)
    assert pred.target_delay_s * 1000 < 35  # the 10 ms margin and a little: no delay for the skips
    assert plain.target_delay_s * 1000 > 200  # ... where unmarked skips would have cost ~8 frames
    assert pred.counts["predicted"] > 0 and pred.newest.seq % (gap + 1) == 0
    pred.release_through(10_000)
    assert pred.push(10_000 - 1, 0, V, 99.0, predicted=True) == LATE
    assert pred.counts["late"] == 0 and pred.counts["predicted_late"] == 1
