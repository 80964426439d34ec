"""Playout clock + concealment, driven by the deterministic fake link and explicit times."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from receiver.frames import PlayoutFrame
from receiver.jitter_buffer import JitterConfig
from receiver.playout import Playout, PlayoutConfig, kp_error
from tests.utils import (
    FakeLink,
    LastStandIn,
    LinearStandIn,
    forecaster,
    simulate,
    smooth_motion,
)

N = 300  # 10 s at 30 fps


def cfg(**kw) -> PlayoutConfig:
    """Start at a small target delay so the start-up shrink does not skip a frame mid-test."""
    kw.setdefault("forecaster", LinearStandIn())
    kw.setdefault("jitter", JitterConfig(initial_delay_ms=15))
    return PlayoutConfig(fps=30, **kw)


def in_stream(res, motion_len):
    """Rendered frames whose seq is inside the sent stream (the tail after the last frame is
    necessarily concealed and not interesting)."""
    return [f for f in res.frames if f is not None and f.seq < motion_len - 1]


def test_none_only_before_first_frame():
    po = Playout(cfg())
    assert po.tick(1.0) is None and po.tick(1.033) is None
    assert po.push(0, 5_000_000, np.zeros(60), 1.05)
    assert po.pending() == 1
    f = po.tick(1.066)
    assert isinstance(f, PlayoutFrame) and f.seq == 0 and f.kind == "real"
    for k in range(1, 30):  # never None again, even with nothing more arriving
        assert po.tick(1.066 + k / 30) is not None


def test_in_order_renders_every_frame_exactly():
    motion = smooth_motion(N)
    po = Playout(cfg())
    res = simulate(po, motion, FakeLink(delay_ms=30))
    frames = [f for f in in_stream(res, N) if not f.repeated]
    assert [f.seq for f in frames] == list(range(frames[0].seq, N - 1))
    assert frames[0].seq <= 2
    assert all(f.kind == "real" for f in frames)
    for f in frames:
        np.testing.assert_allclose(f.vector, motion[f.seq], atol=1e-6)
    st = po.stats()
    assert st["late"] == st["duplicates"] == st["stalls"] == 0
    assert st["target_delay_ms"] < 25  # no jitter: shrinks to the margin


def test_reorder_and_duplicates():
    motion = smooth_motion(N)
    po = Playout(cfg())
    # 80 ms uniform jitter on a 33 ms frame interval reorders a lot; 20 % duplicated
    res = simulate(po, motion, FakeLink(delay_ms=20, jitter_ms=80, duplicate=0.2, seed=7))
    st = po.stats()
    assert st["duplicates"] > 30 and res.rejected >= st["duplicates"]
    frames = [f for f in in_stream(res, N) if not f.repeated and f.seq > 30]  # after adapting
    seqs = [f.seq for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "playout order must be seq order"
    assert sum(f.kind == "real" for f in frames) / len(frames) > 0.95
    assert st["late"] < 0.05 * N


def test_late_frame_is_rejected_and_scores_its_concealment():
    motion = smooth_motion(N)
    po = Playout(cfg(interpolate_gaps=False))
    res = simulate(po, motion, FakeLink(delay_ms=20, jitter_ms=5, extra_delay_ms={150: 400}), set_truth=False)
    st = po.stats()
    assert st["late"] == 1
    f150 = [f for f in res.frames if f is not None and f.seq == 150 and not f.repeated]
    assert len(f150) == 1 and f150[0].kind == "concealed"
    # the late real frame served as truth for the concealed one
    assert st["concealed_kp_error_n"] >= 1 and st["concealed_kp_error"] < 0.02


@pytest.mark.parametrize("interp", [False, True])
def test_loss_burst_is_concealed_and_counted(interp):
    motion = smooth_motion(N)
    burst = set(range(100, 106))
    # interpolation needs the right neighbour (seq 106, 200 ms later) buffered when 100 is due
    jc = JitterConfig(initial_delay_ms=15, min_delay_ms=250 if interp else 0)
    po = Playout(cfg(interpolate_gaps=interp, jitter=jc))
    res = simulate(po, motion, FakeLink(delay_ms=20, jitter_ms=5, drop=burst))
    kinds = {f.seq: f.kind for f in in_stream(res, N) if not f.repeated}
    expected = "interpolated" if interp else "concealed"
    assert all(kinds[s] == expected for s in burst)
    assert all(kinds[s] == "real" for s in range(20, N - 1) if s not in burst)
    assert po.stats()[expected] >= len(burst)
    assert po.stats()[f"{expected}_kp_error"] < (0.03 if interp else 0.08)


def _conceal_error(fc, seed=0):
    motion = smooth_motion(N, seed=seed)
    drops = {s for start in range(40, N - 20, 25) for s in range(start, start + 4)}
    po = Playout(cfg(forecaster=fc, interpolate_gaps=False))
    simulate(po, motion, FakeLink(delay_ms=20, jitter_ms=5, drop=drops, seed=seed))
    st = po.stats()
    assert st["concealed_kp_error_n"] >= len(drops)
    return st["concealed_kp_error"]


def test_concealment_uses_the_forecaster():
    lin = LinearStandIn()
    e_lin = _conceal_error(lin)
    e_last = _conceal_error(LastStandIn())
    assert lin.calls > 0
    assert e_lin < 0.5 * e_last, (e_lin, e_last)


def test_project_forecasters_if_present():
    # models.forecast when it exists, else the stand-ins: same contract either way
    e_lin, e_last = _conceal_error(forecaster("linear")), _conceal_error(forecaster("last"))
    assert e_lin < 0.5 * e_last and e_lin < 0.03, (e_lin, e_last)


def _max_step(frames):
    vs = [f.vector[:20] for f in frames if not f.repeated]
    return max(kp_error(a, b) for a, b in itertools.pairwise(vs))


def test_smooth_convergence_after_concealment():
    # fast motion + a long burst: the linear extrapolation is well off by the time real frames return
    motion = smooth_motion(N, amp=0.6, seed=3)
    drops = set(range(100, 112)) | set(range(200, 215))
    natural = max(kp_error(a, b) for a, b in itertools.pairwise(motion))

    def run(blend):
        po = Playout(cfg(interpolate_gaps=False, blend_frames=blend))
        res = simulate(po, motion, FakeLink(delay_ms=20, jitter_ms=5, drop=drops))
        return _max_step(in_stream(res, N)), res

    smooth, res = run(5)
    abrupt, _ = run(0)
    assert abrupt > 2.0 * natural, "test scenario too easy: no jump to smooth over"
    assert smooth < 0.6 * abrupt and smooth < 2.0 * natural, (smooth, abrupt, natural)
    blended = [f for f in in_stream(res, N) if f.blend > 0]
    assert len(blended) == 10 and all(f.kind == "real" for f in blended)
    back = [f for f in in_stream(res, N) if 120 <= f.seq < 190]  # fully converged to the truth again
    assert all(np.allclose(f.vector, motion[f.seq], atol=1e-6) for f in back)


def test_decimation_interpolates_between_sent_frames():
    motion = smooth_motion(N)
    po = Playout(cfg(kp_every=2))
    res = simulate(po, motion, FakeLink(delay_ms=20, jitter_ms=20, seed=2), kp_every=2)
    frames = [f for f in in_stream(res, N) if not f.repeated and 10 <= f.seq < N - 2]
    assert all(f.kind == ("real" if f.seq % 2 == 0 else "interpolated") for f in frames)
    st = po.stats()
    assert st["interpolated_kp_error"] < 0.01 and st["target_delay_ms"] >= 33
    assert st["stalls"] == 0


def test_decimation_without_neighbour_forecasts():
    motion = smooth_motion(N)
    po = Playout(cfg(kp_every=3))
    simulate(po, motion, FakeLink(delay_ms=20, drop={150}), kp_every=3)
    st = po.stats()
    # 151, 152 have no right neighbour within max_interp_gap?  they do (153), so interpolated;
    # only the tail after the last sent frame is forecast.
    assert st["interpolated"] >= 2 * (N // 3) - 5
    assert st["concealed"] >= 2


def test_no_stall_at_10pct_loss_and_50ms_jitter():
    seconds = 20
    motion = smooth_motion(30 * seconds, seed=5)
    po = Playout(cfg())
    res = simulate(po, motion, FakeLink(loss=0.10, delay_ms=40, jitter_ms=50, seed=11), tick_jitter_ms=4)
    st = po.stats()
    new = [f for f in in_stream(res, len(motion)) if not f.repeated]
    assert len(new) / seconds >= 29, st
    assert st["stalls"] == 0 and st["max_gap_ms"] <= 100
    assert st["late"] < 0.03 * len(motion), st
    assert 40 <= st["target_delay_ms"] <= 120
    assert st["concealed_kp_error"] < 0.03


def test_clock_drift_keeps_playout_steady():
    motion = smooth_motion(30 * 60)
    for drift in (0.001, -0.001):
        po = Playout(cfg())
        res = simulate(po, motion, FakeLink(delay_ms=20, jitter_ms=10, drift=drift, seed=1))
        st = po.stats()
        assert st["late"] == 0 and st["stalls"] == 0 and st["resyncs"] == 0
        # 60 ms of drift over the minute is absorbed by ~2 skipped or repeated frames
        assert st["dropped"] + st["repeated"] <= 6, st
        assert max(len(po.buffer), st["buffered"]) <= 3
        assert st["target_delay_ms"] < 35
        real = sum(f.kind == "real" for f in in_stream(res, len(motion)) if not f.repeated)
        assert real >= len(motion) - 8


def test_render_ahead_forecasts_the_future():
    motion = smooth_motion(N)
    po = Playout(cfg(lookahead_ms=100))
    res = simulate(po, motion, FakeLink(delay_ms=20, jitter_ms=5))
    frames = [f for f in in_stream(res, N) if not f.repeated and f.seq > 20]
    assert all(f.lookahead == 3 for f in frames)
    st = po.stats()
    assert st["lookahead_forecast"] > 200 and st["lookahead_kp_error_n"] > 200
    assert st["lookahead_kp_error"] < 0.03
    po.set_lookahead_ms(0)
    assert po.tick(res.ticks[-1] + 1 / 30).lookahead == 0


def test_sender_restart_resets():
    po = Playout(cfg())
    motion = smooth_motion(N)
    link = FakeLink(delay_ms=20)
    simulate(po, motion, link)
    t = 200.0
    for i in range(40):  # the sender restarts from seq 0, on a new clock
        po.push(i, 10_000_000 + int(i * 1e6 / 30), motion[i], t + i / 30)
        po.tick(t + i / 30 + 0.01)
    assert po.stats()["restarts"] == 1
    assert po.cursor is not None and po.cursor < 40


def test_bounded_memory():
    cfg = PlayoutConfig(fps=30, forecaster=LinearStandIn(), truth_window=100, history=16,
                        jitter=JitterConfig(capacity=50))
    po = Playout(cfg)
    motion = smooth_motion(N * 2)
    simulate(po, motion, FakeLink(loss=0.2, jitter_ms=30, seed=3), set_truth=True)
    for i in range(10_000):
        po.set_truth(10**6 + i, motion[0])  # truths nobody will ever render
    assert len(po._truth) <= 100 and len(po._pending) <= 100 and len(po._hist) <= 16
    assert len(po.buffer) <= 50


class StepsSpy:
    """Repeat-last that records every horizon asked for (a broadcast view: no allocation even if huge)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def forecast(self, history: np.ndarray, steps: int, samples: int = 1) -> np.ndarray:
        self.steps.append(steps)
        return np.broadcast_to(history[-1], (samples, steps, history.shape[-1]))


@pytest.mark.parametrize("seq_jump,time_jump_s", [(10**7, 10**7 / 30), (100, 100 / 30), (1, 10**9)])
def test_a_far_ahead_frame_costs_bounded_work(seq_jump: int, time_jump_s: float) -> None:
    """A seq (or capture time) far ahead must not set the forecast horizon: it comes from the peer."""
    spy = StepsSpy()
    po = Playout(cfg(forecaster=spy, lookahead_ms=100))
    motion = smooth_motion(60)
    link = FakeLink(delay_ms=20)
    res = simulate(po, motion, link)
    t = res.ticks[-1]
    last_cap = link.capture_us(100.0 + 59 / 30)
    po.push(59 + seq_jump, last_cap + int(time_jump_s * 1e6), motion[0], t)
    for k in range(1, 40):
        po.tick(t + k / 30)
    assert max(spy.steps) <= po.cfg.max_forecast_steps
    # and the stream carries on: frames that follow the jump are shown as they are
    for k in range(40, 80):
        seq = 59 + seq_jump + (k - 39)
        po.push(seq, last_cap + int((time_jump_s + (k - 39) / 30) * 1e6), motion[k % 60], t + k / 30)
        frame = po.tick(t + k / 30 + 0.01)
    assert frame is not None and max(spy.steps) <= po.cfg.max_forecast_steps


def test_a_jump_of_more_than_restart_jump_s_restarts_the_stream() -> None:
    po = Playout(cfg())
    motion = smooth_motion(60)
    res = simulate(po, motion, FakeLink(delay_ms=20))
    t = res.ticks[-1]
    restarts = po.stats()["restarts"]
    far = po.cursor + int(po.cfg.restart_jump_s * 30) + 10
    for k in range(20):
        po.push(far + k, 10**9 + int(k * 1e6 / 30), motion[k], t + k / 30)
        po.tick(t + k / 30 + 0.01)
    assert po.stats()["restarts"] == restarts + 1
    assert po.cursor is not None and far <= po.cursor < far + 20


def _predictive_call(motion: np.ndarray, link: FakeLink, fps: float = 30.0, t0: float = 100.0,
                     back_delay_s: float = 0.02):
    """A predictive stream through ``link`` into a Playout: the sender's encoder, the receiver's
    PredictiveStream, keyframe requests travelling back after ``back_delay_s``. Returns the playout,
    the frames it showed and every vector the sender's encoder holds (what each frame decodes to)."""
    from receiver.kpstream import PredictiveStream
    from shared import protocol as P
    from shared.kpcodec import DEFAULT_STREAM, PredictiveEncoder, dequantise

    enc = PredictiveEncoder(DEFAULT_STREAM)
    stream = PredictiveStream(DEFAULT_STREAM, fps)
    po = Playout(cfg(predictor=stream.predict_at, forecaster=LastStandIn()))
    held: dict[int, np.ndarray] = {}
    requests: list[float] = []
    shown = []
    n = len(motion)
    k = 0
    sent_upto = -1
    while True:
        t = t0 + (k + 0.37) / fps
        if t > t0 + n / fps + 0.5:
            break
        while sent_upto + 1 < n and t0 + (sent_upto + 1) / fps <= t:  # the sender captures and codes
            sent_upto += 1
            i = sent_upto
            if requests and requests[0] <= t0 + i / fps:
                requests.clear()
                enc.request_keyframe()
            f = enc.encode(i, motion[i])
            held[i] = dequantise(enc.history[-1], DEFAULT_STREAM)
            if f is not None:
                link.send(i, t0 + i / fps, P.CodedKeypoints(f.seq, f.prev_seq, f.key, link.capture_us(t0 + i / fps),
                                                            f.payload))
        for a in link.deliver(t):
            for fr in stream.push(a.vector):
                po.push(fr.seq, fr.capture_us, fr.vector, a.arrival_s, predicted=fr.skipped)
            if stream.keyframe_request(a.arrival_s) is not None:
                requests.append(a.arrival_s + back_delay_s)
        shown.append(po.tick(t))
        k += 1
    return po, [f for f in shown if f is not None and not f.repeated], held, stream


def test_predictive_stream_shows_skipped_frames_exactly_and_adds_no_delay():
    motion = smooth_motion(N, amp=0.02)  # a face that moves slowly: most frames are predictable
    link = dict(delay_ms=30, jitter_ms=10, seed=4)
    po, shown, held, stream = _predictive_call(motion, FakeLink(**link))
    kinds = {k: sum(f.kind == k for f in shown) for k in ("real", "predicted", "concealed", "interpolated")}
    assert kinds["predicted"] > 0.4 * len(shown)
    assert all(f.seq >= N for f in shown if f.kind == "concealed")  # only the tail after the last frame
    # a frame the sender skipped is shown as exactly what it assumed, and so is every sent one
    inside = [f for f in shown if f.seq < N - 10]
    assert all(np.array_equal(f.vector, held[f.seq]) for f in inside)
    # no added delay: the playout's target delay is what every-frame Q8 over the same link gets
    q8 = Playout(cfg(forecaster=LastStandIn()))
    simulate(q8, motion, FakeLink(**link))
    assert po.stats()["target_delay_ms"] <= q8.stats()["target_delay_ms"] + 5
    assert stream.counts["skipped"] > 0.4 * N and stream.counts["keyframe_requests"] == 0


def test_predictive_stream_recovers_from_loss_without_stalls():
    motion = smooth_motion(N, amp=0.05, seed=3)
    po, shown, held, stream = _predictive_call(motion, FakeLink(delay_ms=30, jitter_ms=10, loss=0.10, seed=5))
    st = po.stats()
    assert st["stalls"] == 0
    assert stream.counts["keyframe_requests"] >= 1 and stream.counts["keyframes"] >= 2
    # a lost message freezes the picture until the keyframe asked for arrives (about a round trip
    # and a frame later); most frames still show the decoded stream itself, the rest stay close
    exact = sum(np.array_equal(f.vector, held[f.seq]) for f in shown if f.seq < N)
    assert exact > 0.45 * len(shown)
    err = np.mean([kp_error(f.vector, motion[min(f.seq, N - 1)]) for f in shown])
    still = np.mean([kp_error(motion[0], m) for m in motion])  # a frozen first frame
    q8 = Playout(cfg(forecaster=LastStandIn()))  # every frame sent, each loss concealed on its own
    res = simulate(q8, motion, FakeLink(delay_ms=30, jitter_ms=10, loss=0.10, seed=5))
    q8_err = np.mean([kp_error(f.vector, motion[min(f.seq, N - 1)]) for f in res.frames if f is not None])
    # each loss costs a few frames until the keyframe: worse than every-frame Q8 (whose error is a third of
    # this with the same losses), far from a frozen picture
    assert err < 0.35 * still and err < 4 * q8_err


def test_low_delay_cap_shows_frames_sooner_and_forecasts_the_late_ones() -> None:
    """--max-delay-ms: the buffer waits at most that long; frames later than it are forecast when due."""
    motion = smooth_motion(N)
    runs = {}
    for cap in (1000.0, 20.0):
        po = Playout(cfg(jitter=JitterConfig(initial_delay_ms=15, max_delay_ms=cap)))
        res = simulate(po, motion, FakeLink(delay_ms=40, jitter_ms=50, seed=3))
        shown = [(f, t) for f, t in zip(res.frames, res.ticks, strict=True)
                 if f is not None and not f.repeated and 30 <= f.seq < N - 1]
        late_ms = np.array([(t - (100.0 + f.seq / 30)) * 1000 for f, t in shown])
        runs[cap] = {"latency": float(np.median(late_ms)), "stats": po.stats(),
                     "concealed": sum(f.kind == "concealed" for f, _ in shown),
                     "err": float(np.mean([kp_error(f.vector, motion[f.seq]) for f, _ in shown]))}
    buffered, low = runs[1000.0], runs[20.0]
    assert low["stats"]["target_delay_ms"] <= 20.0 + 1e-6 < buffered["stats"]["target_delay_ms"]
    assert low["latency"] < buffered["latency"] - 20  # the jitter's upper part is no longer waited for
    assert low["concealed"] > buffered["concealed"]  # what came later was forecast ...
    assert low["err"] < 0.02  # ... close to the truth on smooth motion (a linear forecast, then blended)


def test_next_due_is_the_next_frames_playout_time_one_period_apart():
    """The render clock ticks at ``next_due_s`` (phase-locked): the due time of the frame after the cursor."""
    po = Playout(cfg())
    assert po.next_due_s() is None  # nothing received: no clock yet
    for s in range(6):
        po.push(s, 1_000_000 + s * 33_333, np.zeros(60), 2.0 + s / 30 + 0.02)
    f = po.tick(2.1)
    assert f is not None and f.seq == 0
    due1 = po.next_due_s()
    assert due1 == pytest.approx(po.buffer.playout_time(1_000_000 + 33_333))
    po.tick(due1)
    assert po.next_due_s() - due1 == pytest.approx(1 / 30, abs=1e-4)


class _Named(LinearStandIn):
    name = "linear"


def test_a_forecaster_guesses_frames_newer_than_any_received_instead_of_the_codec():
    """With a predictive stream's predictor: frames after the newest received are forecast by a forecaster
    other than repeat-last (they may be late, not skipped), and shown as the codec predicts with repeat-last."""
    motion = np.cumsum(np.full((10, 60), 0.01, np.float32), axis=0)

    def run(fc) -> list[str]:
        po = Playout(cfg(forecaster=fc, predictor=lambda s: motion[3]))  # the codec: repeat the last decoded
        for s in range(4):
            po.push(s, 1_000_000 + s * 33_333, motion[s], 2.0 + s / 30 + 0.01)
        kinds = []
        t = 2.0
        for _ in range(8):
            f = po.tick(t)
            if f is not None and not f.repeated:
                kinds.append(f.kind)
            t += 1 / 30
        return kinds

    named, plain = run(_Named()), run(LastStandIn())
    assert "concealed" in named and "predicted" not in named
    assert "predicted" in plain and "concealed" not in plain
