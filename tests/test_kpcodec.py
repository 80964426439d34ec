"""Closed-loop predictive keypoint coding (shared.kpcodec)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.kpcodec import (
    NC,
    CodedFrame,
    PredictiveConfig,
    PredictiveDecoder,
    PredictiveEncoder,
    decode_residual,
    dequantise,
    encode_residual,
    quantise,
)


def walk(n: int, seed: int = 0, speed: float = 0.003) -> np.ndarray:
    """A keypoint-like random walk: coordinates drift in [-0.8, 0.8], Jacobians near identity."""
    rng = np.random.default_rng(seed)
    c = np.clip(np.cumsum(rng.normal(0, speed, (n, NC)), 0) + rng.uniform(-0.5, 0.5, NC), -0.8, 0.8)
    j = np.tile([1.0, 0.0, 0.0, 1.0], 10) + np.cumsum(rng.normal(0, speed * 3, (n, 40)), 0)
    return np.concatenate([c, j], 1).astype(np.float32)


def run(cfg: PredictiveConfig, vecs: np.ndarray, lost: set[int] = frozenset(), order: list[int] | None = None):
    enc, dec = PredictiveEncoder(cfg), PredictiveDecoder(cfg)
    frames = [enc.encode(s, v) for s, v in enumerate(vecs)]
    sent = [f for f in frames if f is not None]
    idx = order if order is not None else range(len(sent))
    decoded = {}
    for i in idx:
        if sent[i].seq in lost:
            continue
        for d in dec.push(sent[i]):
            decoded[d.seq] = d
        if dec.needs_keyframe:
            enc.request_keyframe()
    return enc, dec, sent, decoded


def test_residuals_round_trip() -> None:
    rng = np.random.default_rng(0)
    for scale in (0, 1, 3, 40, 900):
        r = np.round(rng.laplace(0, scale + 1e-9, 60)).astype(np.int32)
        assert (decode_residual(encode_residual(r)) == r).all()
    assert len(encode_residual(np.zeros(60, np.int32))) == 9  # 2 x 3-bit orders + 60 one-bit zeros = 66 bits


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-2000, 2000), min_size=60, max_size=60))
def test_residual_round_trip_any(values: list[int]) -> None:
    r = np.array(values, np.int32)
    assert (decode_residual(encode_residual(r)) == r).all()


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_garbage_residuals_raise_value_error_only(data: bytes) -> None:
    try:
        decode_residual(data)
    except ValueError:
        pass


@pytest.mark.parametrize("predictor", ["last", "linear"])
def test_lossless_stream_decodes_exactly_what_the_encoder_holds(predictor: str) -> None:
    cfg = PredictiveConfig(predictor=predictor)
    vecs = walk(300)
    enc, dec, sent, decoded = run(cfg, vecs)
    assert sorted(decoded) == list(range(300))  # every frame, skipped ones by prediction
    # (a random walk has no velocity to extrapolate: "linear" finds nothing to skip there)
    assert enc.counts["residual"] > 0 and (enc.counts["skipped"] > 0 or predictor == "linear")
    # decoded = the truth within the quantiser or, on skipped frames, the tolerance
    err = np.abs(np.stack([decoded[s].vector for s in range(300)]) - vecs)
    assert err[:, :NC].max() <= max(cfg.tolerance, cfg.coord_step / 2) + 1e-6
    assert err[:, NC:].max() <= cfg.tolerance * cfg.jac_factor + 1e-5
    # and both ends hold the same integers at the end (closed loop)
    assert all((a == b).all() for a, b in zip(enc.history, dec.history, strict=True))
    # the stream is far smaller than Q8's 80 B per frame
    assert sum(len(f.payload) for f in sent) < 0.5 * 80 * 300


def test_max_gap_and_keyframe_interval() -> None:
    cfg = PredictiveConfig(max_gap=3, keyframe_interval=50, tolerance=1.0)  # everything is "close"
    vecs = walk(200)
    _enc, _dec, sent, decoded = run(cfg, vecs)
    seqs = [f.seq for f in sent]
    assert max(np.diff(seqs)) == 4  # 3 skipped, then one sent
    keys = [f.seq for f in sent if f.key]
    assert keys[0] == 0 and max(np.diff(keys)) <= 50 and len(keys) >= 4
    # frames after the last coded one are filled only when the next coded frame comes
    assert sorted(decoded) == list(range(seqs[-1] + 1)) and seqs[-1] >= 196


def test_a_lost_frame_stops_decoding_until_a_keyframe_never_drifts() -> None:
    cfg = PredictiveConfig(tolerance=0.0005)  # few skips: most frames carry a residual
    vecs = walk(200, seed=3)
    enc = PredictiveEncoder(cfg)
    sent = [f for s, v in enumerate(vecs) if (f := enc.encode(s, v)) is not None]
    lost = sent[20].seq
    _e, dec, _s, decoded = run(cfg, vecs, lost={lost})
    # frames after the loss are decoded again only from the next keyframe on
    next_key = min(f.seq for f in sent if f.key and f.seq > lost)
    assert all(s not in decoded for s in range(lost, next_key))
    assert all(s in decoded for s in range(next_key, sent[-1].seq + 1))
    # everything decoded is within tolerance of the truth: nothing drifted
    for s, d in decoded.items():
        assert np.abs(d.vector[:NC] - vecs[s, :NC]).max() <= max(cfg.tolerance, cfg.coord_step / 2) + 1e-6


def test_keyframe_request_resynchronises_quickly() -> None:
    cfg = PredictiveConfig(tolerance=0.0005, keyframe_interval=10_000)
    vecs = walk(120, seed=4)
    enc, dec = PredictiveEncoder(cfg), PredictiveDecoder(cfg, max_pending=2)
    decoded, lost_at = {}, None
    for s, v in enumerate(vecs):
        f = enc.encode(s, v)
        if f is None:
            continue
        if s == 30:
            lost_at = s
            continue
        for d in dec.push(f):
            decoded[d.seq] = d
        if dec.needs_keyframe:
            enc.request_keyframe()
    assert lost_at is not None and enc.counts["key"] == 2  # the first, and the one asked for
    assert max(decoded) == 119 and 30 not in decoded
    assert min(s for s in decoded if s > 30) <= 34  # back within a few frames


def test_out_of_order_frames_are_held_and_decoded() -> None:
    cfg = PredictiveConfig(tolerance=0.0005)
    vecs = walk(60, seed=5)
    enc = PredictiveEncoder(cfg)
    sent = [f for s, v in enumerate(vecs) if (f := enc.encode(s, v)) is not None]
    order = list(range(len(sent)))
    order[10], order[11] = order[11], order[10]  # swapped in flight
    _e, dec, _s, decoded = run(cfg, vecs, order=order)
    assert sorted(decoded) == list(range(sent[-1].seq + 1))
    assert not dec.needs_keyframe and dec.counts["dropped"] == 0


def test_duplicates_and_stale_frames_are_dropped() -> None:
    cfg = PredictiveConfig()
    enc, dec = PredictiveEncoder(cfg), PredictiveDecoder(cfg)
    vecs = walk(10, speed=0.05)
    frames = [enc.encode(s, v) for s, v in enumerate(vecs)]
    assert all(f is not None for f in frames)  # fast motion: nothing skipped
    assert len(dec.push(frames[0])) == 1 and len(dec.push(frames[1])) == 1
    assert dec.push(frames[1]) == [] and dec.push(frames[0]) == []
    assert dec.push(CodedFrame(5, 7, False, frames[2].payload)) == []  # prev_seq after seq: inconsistent
    assert dec.counts["dropped"] == 3


def test_quantiser_limits() -> None:
    cfg = PredictiveConfig()
    v = np.concatenate([np.full(NC, 0.99), np.full(40, 20.0)]).astype(np.float32)
    d = dequantise(quantise(v, cfg), cfg)
    assert np.abs(d[:NC] - 0.99).max() <= cfg.coord_step / 2 + 1e-6 and np.abs(d[NC:] - 16).max() < 1e-3
    with pytest.raises(ValueError):
        quantise(np.full(60, np.nan), cfg)
    with pytest.raises(ValueError):
        PredictiveConfig(predictor="oracle")


def test_predict_at_is_what_the_encoder_assumed_for_skipped_frames() -> None:
    """The receiver shows skipped frames before it hears of them: its prediction must be the encoder's."""
    for predictor in ("last", "linear"):
        cfg = PredictiveConfig(predictor=predictor, tolerance=0.01, max_gap=6)
        enc, dec = PredictiveEncoder(cfg), PredictiveDecoder(cfg)
        vecs = walk(200, seed=7, speed=0.002)
        checked = 0
        for s, v in enumerate(vecs):
            ahead = dec.predict_at(s)  # before frame s (or the one after a skip run) arrives
            f = enc.encode(s, v)
            if f is None:  # skipped: the encoder's history now ends with what it assumed
                assert ahead is not None
                np.testing.assert_array_equal(ahead, dequantise(enc.history[-1], cfg))
                checked += 1
            else:
                dec.push(f)
        assert checked > 20
        assert dec.predict_at(dec.last_seq) is None and dec.predict_at(dec.last_seq + cfg.max_gap + 1) is None


def test_mean_skip_rule_bounds_every_value_by_the_cap() -> None:
    cfg = PredictiveConfig(tolerance=0.004, skip_rule="mean", mean_cap=3.0, max_gap=30)
    vecs = walk(300, seed=8)
    enc, _dec, _sent, decoded = run(cfg, vecs)
    n = max(decoded) + 1  # (frames after the last coded one decode when the next one comes)
    assert n > 250
    err = np.abs(np.stack([decoded[s].vector for s in range(n)]) - vecs[:n])
    assert err[:, :NC].max() <= 3.0 * cfg.tolerance + cfg.coord_step
    assert err[:, :NC].mean(axis=1).max() <= cfg.tolerance + cfg.coord_step
    strict = run(PredictiveConfig(tolerance=0.004, max_gap=30), vecs)[0]
    assert enc.counts["skipped"] > strict.counts["skipped"]  # the point of the rule: more frames skipped
    with pytest.raises(ValueError):
        PredictiveConfig(skip_rule="median")


def test_tolerance_can_change_between_frames_and_force_never_skips() -> None:
    cfg = PredictiveConfig(tolerance=1.0, max_gap=100)
    enc = PredictiveEncoder(cfg)
    v = walk(3)
    assert enc.encode(0, v[0]) is not None and enc.encode(1, v[1]) is None
    assert enc.encode(2, v[2], force=True) is not None
    enc.tolerance = 0.0  # rate control tightened it: nothing is close any more
    assert all(enc.encode(s, v[2] + 0.01 * s) is not None for s in range(3, 6))


def test_a_peer_cannot_make_the_decoder_fill_or_hold_without_bound() -> None:
    cfg = PredictiveConfig(max_gap=4)
    enc, dec = PredictiveEncoder(cfg), PredictiveDecoder(cfg)
    v = walk(2, speed=0.05)
    dec.push(enc.encode(0, v[0]))
    r = enc.encode(1, v[1])
    with pytest.raises(ValueError, match="max_gap"):  # a residual claiming 10^12 skipped frames
        dec.push(CodedFrame(10**12, 0, False, r.payload))
    key = enc.encode(2, v[1], force=True)
    assert [d.seq for d in dec.push(CodedFrame(10**12, 0, True, P_KEY(v[1])))] == [10**12]  # no fill
    for i in range(100):  # frames whose predecessors never come: held, but only a few
        dec.push(CodedFrame(10**12 + 10 + 2 * i, 10**12 + 5 + 2 * i, False, key.payload))
    assert len(dec.pending) <= 16 and dec.needs_keyframe


def P_KEY(v: np.ndarray) -> bytes:  # a keyframe payload, as on the wire
    from shared.kpvector import Codec, encode_vector

    return encode_vector(v, Codec.Q8)


def test_a_custom_closed_loop_predictor_decodes_exactly_and_only_with_the_same_predictor() -> None:
    from shared.kpcodec import PredictiveConfig, PredictiveDecoder, PredictiveEncoder, predict

    cfg = PredictiveConfig(tolerance=0.01, max_gap=4, skip_rule="mean")

    def damped(history: list[np.ndarray]) -> np.ndarray:  # sees three frames: history_len=3
        if len(history) < 3:
            return history[-1].copy()
        return history[-1] + (history[-1] - history[-3]) // 4

    rng = np.random.default_rng(3)
    t = np.arange(120)[:, None]
    kp = np.concatenate([0.3 * np.sin(t / 9 + rng.uniform(0, 6, 20)), 1 + 0.1 * np.cos(t / 7 + rng.uniform(0, 6, 40))],
                        axis=1).astype(np.float32)
    enc = PredictiveEncoder(cfg, damped, history_len=3)
    coded, shown = [], []
    for i, v in enumerate(kp):
        f = enc.encode(i, v)
        shown.append(enc.history[-1].copy())
        assert len(enc.history) <= 3
        if f is not None:
            coded.append(f)
    assert enc.counts["skipped"] > 10  # the test means something only if frames were predicted

    def decode(predictor, history_len):
        dec = PredictiveDecoder(cfg, predictor=predictor, history_len=history_len)
        out = {}
        for f in coded:
            for d in dec.push(f):
                out[d.seq] = d.vector
        return np.stack([out[i] for i in sorted(out)])

    from shared.kpcodec import dequantise

    want = np.stack([dequantise(q, cfg) for q in shown])[: len(decode(damped, 3))]
    np.testing.assert_array_equal(decode(damped, 3), want)
    # the receiver running a different predictor than the sender does not reproduce the stream
    other = decode(lambda h: predict(h, cfg), 2)
    assert not np.array_equal(other, want[: len(other)])
