"""receiver.adapt: the render tier steps down under overuse, back up with headroom, never flaps."""

from __future__ import annotations

import pytest

from receiver.adapt import AdaptConfig, TierAdapter

COST = {64: 1.0, 128: 1.5, 256: 2.6}  # relative render time per tier (the start-up measurement's shape)


def _run(adapter: TierAdapter, t0: float, seconds: float, ms_at: dict[int, float], fps: float = 30.0) -> float:
    """Feed one render per frame; the render time depends on the tier the adapter has chosen."""
    t = t0
    while t < t0 + seconds:
        adapter.process(t, ms_at[adapter.size])
        t += 1 / fps
    return t


def test_steps_down_under_overuse_one_tier_at_a_time_and_stays_when_it_fits() -> None:
    a = TierAdapter(COST, 256)
    slow = {256: 40.0, 128: 31.0, 64: 17.0}  # 256 and 128 over 85 % of 33 ms, 64 fits
    t = _run(a, 0.0, 20.0, slow)
    assert [(c.from_size, c.to_size, c.reason) for c in a.changes] == [(256, 128, "overuse"), (128, 64, "overuse")]
    # no change within the cooldown, and no decision before the window has enough renders
    assert a.changes[1].t - a.changes[0].t >= a.config.cooldown_s
    assert a.changes[0].t >= a.config.down_after_s
    assert a.changes[0].load > a.config.high_load
    # 64 at 17 ms: 128 is predicted at 25.5 ms = 77 % of the budget: no room to step up
    _run(a, t, 5.0, slow)
    assert a.size == 64


def test_severe_overuse_steps_down_at_once_to_the_tier_that_fits() -> None:
    a = TierAdapter(COST, 256)
    # a two-way call with both ends on one machine: 256 renders take 3x the budget; only 64 fits
    crushed = {256: 100.0, 128: 60.0, 64: 20.0}
    t = _run(a, 5.0, 3.0, crushed)  # past the start-up grace, as a call's renders are
    first = a.changes[0]
    assert (first.from_size, first.to_size) == (256, 64)  # straight past 128 (predicted 1.73 x budget)
    # no min_frames or down_after_s wait: decided on the third render
    assert first.t == pytest.approx(5.0 + 2 / 30.0)
    _run(a, t, 10.0, crushed)
    assert a.size == 64 and len(a.changes) == 1
    # one slow first render is not severe overuse (the median of the first renders decides)
    c = TierAdapter(COST, 256)
    c.process(5.0, 500.0)
    for i in range(1, 20):
        c.process(5.0 + i / 30.0, 15.0)
    assert not c.changes
    # severe overuse after a step down waits only severe_cooldown_s, not cooldown_s
    b = TierAdapter(COST, 256, AdaptConfig(severe_cooldown_s=0.5))
    worse = {256: 45.0, 128: 70.0, 64: 20.0}  # 128 predicted to fit, then does not, badly
    _run(b, 0.0, 8.0, worse)
    assert [c.to_size for c in b.changes] == [128, 64]
    assert b.config.severe_cooldown_s <= b.changes[1].t - b.changes[0].t < b.config.cooldown_s


def test_steps_back_up_after_sustained_headroom_and_backs_off_when_it_fails() -> None:
    a = TierAdapter(COST, 128)
    fast = {256: 20.0, 128: 8.0, 64: 5.0}
    t = _run(a, 0.0, 12.0, fast)
    assert a.size == 256 and a.changes[-1].reason == "headroom"
    assert a.changes[-1].t >= a.config.up_after_s  # hysteresis: up waits much longer than down
    # at the edge: the predicted time fits, the real one does not -> down, and the next try waits longer
    edge = {256: 30.0, 128: 9.0, 64: 5.0}
    t = _run(a, t, 30.0, edge)
    downs = [c for c in a.changes if c.reason == "overuse"]
    ups = [c for c in a.changes if c.reason == "headroom"]
    assert downs and len(ups) >= 2
    gaps = [u.t - d.t for d, u in zip(downs, ups[1:], strict=False)]
    assert gaps[0] >= 2 * a.config.up_after_s - 0.1  # doubled back-off
    assert len(a.changes) <= 6  # no flapping: at most a few changes in 42 s


def test_the_first_tier_leaves_room_for_the_extraction_beside_it() -> None:
    from receiver.tiers import start_tier

    fps = {64: 250.0, 128: 110.0, 256: 57.0}  # renders per second alone, as measured at start-up
    assert start_tier(fps) == 256  # a receiver alone: 17.5 ms fits a 36 fps frame
    assert start_tier(fps, reserved_ms=12.0) == 128  # a two-way call: 17.5 + 12 ms does not, 9.1 + 12 does
    assert start_tier(fps, reserved_ms=30.0) == 64  # nothing fits: the smallest
    # the region stage's time on every display-size frame counts against the largest tier
    assert start_tier(fps, reserved_ms=8.0) == 256 and start_tier(fps, reserved_ms=8.0, extra_ms={256: 3.0}) == 128


def test_bounds_and_validation() -> None:
    a = TierAdapter(COST, 64)
    _run(a, 0.0, 5.0, {64: 100.0, 128: 100.0, 256: 100.0})
    assert a.size == 64 and not a.changes  # nothing below the lowest tier
    b = TierAdapter(COST, 256)
    _run(b, 0.0, 30.0, {64: 1.0, 128: 1.0, 256: 1.0})
    assert b.size == 256 and not b.changes  # nothing above the highest
    assert TierAdapter(COST, 256).load() is None
    with pytest.raises(ValueError):
        TierAdapter(COST, 96)
    with pytest.raises(ValueError):
        AdaptConfig(low_load=0.9, high_load=0.8)


def test_a_call_start_burst_changes_nothing_unless_the_tier_cannot_cope() -> None:
    a = TierAdapter(COST, 256)
    burst = {256: 40.0, 128: 31.0, 64: 17.0}  # 120 % of the budget: over, but not hopeless
    t = _run(a, 0.0, a.config.startup_s - 0.2, burst)
    assert not a.changes  # the start-up burst of both ends decides nothing
    _run(a, t, 5.0, {256: 20.0, 128: 15.0, 64: 9.0})  # then it fits: 256 stays
    assert a.size == 256 and not a.changes
    b = TierAdapter(COST, 256)
    _run(b, 0.0, 3.0, {256: 100.0, 128: 60.0, 64: 17.0})  # 300 % of the budget: no waiting
    assert b.changes and b.changes[0].t < b.config.startup_s


def test_work_beside_the_renderer_shrinks_its_budget() -> None:
    """A two-way call's own extraction shares the cores: renders that fit a whole frame no longer fit."""
    fits = {256: 20.0, 128: 13.0, 64: 8.0}  # 256 at 60 % of 33 ms: no reason to move
    alone = TierAdapter(COST, 256)
    _run(alone, 0.0, 10.0, fits)
    assert alone.changes == []
    shared = TierAdapter(COST, 256, AdaptConfig(reserved_ms=18.0))  # 15 ms left for rendering
    _run(shared, 0.0, 10.0, fits)
    assert [(c.from_size, c.to_size) for c in shared.changes] == [(256, 128)]  # 13 ms fits the 15 left
    assert shared.config.budget_ms == pytest.approx(1000 / 30 - 18)


def test_reserved_budget_never_falls_below_a_quarter_frame() -> None:
    assert AdaptConfig(fps=30, reserved_ms=100.0).budget_ms == pytest.approx(1000 / 30 / 4)
    with pytest.raises(ValueError):
        AdaptConfig(reserved_ms=-1.0)
