"""Wire protocol: round trips, quantisation error bounds, and every bad input rejected cleanly."""

from __future__ import annotations

import math

import cv2
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.seqfilter import SequenceFilter
from shared import kpvector
from shared import protocol as P
from shared import source_image as S
from shared.errors import RejectCounter
from shared.kpcodec import CodedFrame, PredictiveConfig, PredictiveDecoder, PredictiveEncoder, encode_residual


def kp_vector(rng: np.random.Generator) -> np.ndarray:
    v = np.empty(kpvector.KP_DIM, np.float32)
    v[:20] = rng.uniform(-1, 1, 20)
    v[20:] = np.tile([1, 0, 0, 1], 10) + rng.normal(0, 0.2, 40)
    return v


@pytest.mark.parametrize("codec,tol_c,tol_j", [(P.Codec.F16, 1e-3, 2e-3), (P.Codec.Q8, 2e-5, 0.04)])
def test_keypoint_round_trip_within_quantisation_error(codec: P.Codec, tol_c: float, tol_j: float) -> None:
    rng = np.random.default_rng(0)
    vecs = [kp_vector(rng) for _ in range(3)]
    msg = P.KeypointBatch.build(10, 1_000_000, vecs, codec, step=2, interval_us=66_666)
    out = P.decode(P.encode(msg))
    assert out == msg
    frames = out.frames()
    assert [f[0] for f in frames] == [10, 12, 14]
    assert [f[1] for f in frames] == [1_000_000, 1_066_666, 1_133_332]
    for (_, _, got), want in zip(frames, vecs, strict=False):
        assert np.abs(got[:20] - want[:20]).max() <= tol_c
        # Jacobian error relative to the entry's size (+ a floor near zero)
        assert (np.abs(got[20:] - want[20:]) / (np.abs(want[20:]) + 0.5)).max() <= tol_j
    assert len(msg.payload) == 3 * kpvector.frame_bytes(codec)


def test_q8_keeps_large_jacobians() -> None:
    """Trained detectors produce Jacobian entries well beyond +-2; Q8 must not clip them."""
    v = np.zeros(60, np.float32)
    v[20:] = np.linspace(-12, 12, 40)
    (_, _, got), = P.decode(P.encode(P.KeypointBatch.build(0, 0, [v], P.Codec.Q8))).frames()
    rel = np.abs(got[20:] - v[20:]) / np.maximum(np.abs(v[20:]), 0.5)
    assert rel.max() < 0.03


def test_q8_is_smaller_than_f16() -> None:
    v = kp_vector(np.random.default_rng(1))
    q8 = P.encode(P.KeypointBatch.build(0, 0, [v], P.Codec.Q8))
    f16 = P.encode(P.KeypointBatch.build(0, 0, [v], P.Codec.F16))
    assert len(q8) < len(f16) and len(q8) <= 96


def test_other_messages_round_trip() -> None:
    pred = P.Hello("face64", 64, 30.0, int(P.Codec.PRED), ts_base_us=2**40,
                   pred=P.PredParams("linear", 0.01, 1 / 256, 8, 60))
    for msg in [P.Hello("face64", 64, 30.0, 1, 2), pred, P.Heartbeat(123), P.SourceRequest("scene changed"),
                P.Bye("done"), P.KeyframeRequest(17), P.KeyframeRequest(), P.SourceReady(0), P.SourceReady(2**40)]:
        assert P.decode(P.encode(msg)) == msg


def test_hello_frame_rates_from_1_to_60_fps_are_accepted() -> None:
    for fps in (P.MIN_FPS, 7.5, 29.97, P.MAX_FPS, 15):  # an int rate too (msgpack keeps 15 an int)
        raw = msgpack.packb([P.PROTOCOL_VERSION, 1, "m", 64, fps, 1, 1, 10, 0, None])
        hello = P.decode(raw)
        assert hello.fps == fps and isinstance(hello.fps, float)


def test_source_ready_refuses_a_bad_image_id() -> None:
    for bad in (-1, "0", None, 2**63):
        with pytest.raises(P.ProtocolError):
            P.decode(msgpack.packb([P.PROTOCOL_VERSION, int(P.MsgType.SOURCE_READY), bad]))


def test_coded_keypoints_round_trip_and_are_compact() -> None:
    rng = np.random.default_rng(3)
    cfg = PredictiveConfig(tolerance=0.0)
    enc = PredictiveEncoder(cfg)
    v = kp_vector(rng)
    frames = [enc.encode(0, v), enc.encode(1, v + 0.001), enc.encode(2, v + 0.003)]
    msgs = [P.CodedKeypoints(f.seq, f.prev_seq, f.key, 33_333 * f.seq, f.payload) for f in frames]
    for m in msgs:
        assert P.decode(P.encode(m)) == m
    assert msgs[0].prev_seq == -1 and msgs[0].key and not msgs[1].key
    # framing around the payload: array, version, type, seq, seq - prev_seq, key, time (< 2^16 us), bin header
    assert len(P.encode(msgs[1])) - len(msgs[1].payload) <= 1 + 1 + 1 + 1 + 1 + 1 + 3 + 2
    # deep into a call (seq past 2^16, 70 minutes of time) the framing still stays under 19 bytes
    late = P.CodedKeypoints(100_000, 99_996, False, 4_000_000_000, msgs[1].payload)
    assert len(P.encode(late)) - len(late.payload) <= 18 and P.decode(P.encode(late)) == late


def test_a_version_1_peer_is_refused_and_told_in_its_own_version() -> None:
    v1_hello = _raw(1, 1, "kp-0123456789ab", 64, 30.0, 1, 1, 10)  # exactly what a version-1 sender sends
    with pytest.raises(P.ProtocolError) as e:
        P.decode(v1_hello)
    assert e.value.reason == "version" and "unsupported protocol version 1" in str(e.value)
    bye = P.legacy_bye(v1_hello, "unsupported protocol version 1")
    assert msgpack.unpackb(bye) == [1, 6, "unsupported protocol version 1"]  # a version-1 Bye
    assert P.legacy_bye(_raw(V + 5, 1), "x") is None and P.legacy_bye(b"\xc1", "x") is None
    assert P.legacy_bye(_raw("1", 1), "x") is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-0.875, 0.875, width=32), min_size=20, max_size=20), st.integers(0, 2**40),
       st.integers(0, 2**40), st.floats(0.0, 0.02), st.sampled_from(["last", "linear"]))
def test_coded_stream_round_trips_through_the_wire(coords: list[float], seq0: int, ts: int, tol: float,
                                                  predictor: str) -> None:
    """Whatever the encoder emits decodes on the wire and in the decoder to what the encoder holds."""
    cfg = PredictiveConfig(tolerance=tol, predictor=predictor)
    enc, dec = PredictiveEncoder(cfg), PredictiveDecoder(cfg)
    base = np.concatenate([coords, np.tile([1.0, 0.0, 0.0, 1.0], 10)]).astype(np.float32)
    got = {}
    for i in range(12):
        v = base.copy()
        v[:20] = np.clip(v[:20] + 0.004 * i * np.sin(np.arange(20) + i), -1, 1)
        f = enc.encode(seq0 + i, v, force=i == 11)
        if f is None:
            continue
        m = P.decode(P.encode(P.CodedKeypoints(f.seq, f.prev_seq, f.key, ts + i, f.payload)))
        assert isinstance(m, P.CodedKeypoints)
        for d in dec.push(CodedFrame(m.seq, m.prev_seq, m.key, m.payload)):
            got[d.seq] = d
    assert sorted(got) == list(range(seq0, seq0 + 12))
    assert all((a == b).all() for a, b in zip(enc.history, dec.history, strict=True))


def test_source_image_split_and_reassembled() -> None:
    blob = np.random.default_rng(2).bytes(40_000)
    chunks = S.split_source(blob, image_id=7, chunk_bytes=16_384)
    assert len(chunks) == 3 and all(len(P.encode(c)) < 17_000 for c in chunks)
    asm = S.SourceAssembler()
    results = [asm.add(P.decode(P.encode(c))) for c in reversed(chunks)]  # any order
    assert results[:2] == [None, None] and results[2] == blob


def test_source_image_corruption_detected() -> None:
    chunks = S.split_source(b"a" * 1000 + b"b" * 1000, image_id=1, chunk_bytes=1000)
    bad = P.SourceChunk(1, 1, 2, 2000, chunks[1].digest, b"c" * 1000)
    asm = S.SourceAssembler()
    asm.add(chunks[0])
    with pytest.raises(P.ProtocolError) as e:
        asm.add(bad)
    assert e.value.reason == "digest"


def test_source_duplicate_and_inconsistent_chunks() -> None:
    chunks = S.split_source(b"x" * 3000, image_id=1, chunk_bytes=1000)
    asm = S.SourceAssembler()
    asm.add(chunks[0])
    with pytest.raises(P.ProtocolError, match="duplicate"):
        asm.add(chunks[0])
    with pytest.raises(P.ProtocolError, match="disagrees"):
        asm.add(P.SourceChunk(1, 1, 5, 3000, chunks[0].digest, b"x"))


def _raw(*fields: object) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


GOOD_PAYLOAD = kpvector.encode_vector(np.zeros(60), P.Codec.F16)
GOOD_Q8 = kpvector.encode_vector(np.zeros(60), P.Codec.Q8)
ZERO_RESIDUAL = encode_residual(np.zeros(60, np.int32))


V = P.PROTOCOL_VERSION
PRED = ["last", 0.004, 1 / 512, 4, 90]


@pytest.mark.parametrize("data,reason", [
    (b"", "malformed"),
    (b"\xc1\xc1\xc1", "malformed"),
    ("text", "malformed"),
    (_raw(V + 1, 3, 0, 1, 0, 0, 0, GOOD_PAYLOAD), "version"),
    (_raw(1, 3, 0, 1, 0, 0, 0, GOOD_PAYLOAD), "version"),  # a version-1 peer's keypoints
    (_raw(V, 99), "type"),
    (_raw(V, 3, 0, 1, 0, 0, 0), "malformed"),  # missing a field
    (_raw(V, 3, 0, 1, 0, 0, 0, GOOD_PAYLOAD[:-2]), "length"),  # wrong vector size
    (_raw(V, 3, 0, 1, 0, 0, 7, GOOD_PAYLOAD), "codec"),
    (_raw(V, 3, 0, 1, 0, 0, 2, GOOD_PAYLOAD), "codec"),  # PRED is not a per-vector codec
    (_raw(V, 3, -5, 1, 0, 0, 0, GOOD_PAYLOAD), "field"),  # negative seq
    (_raw(V, 3, "0", 1, 0, 0, 0, GOOD_PAYLOAD), "field"),
    (_raw(V, 3, 0, 1, 0, 0, 0, np.full(60, np.nan, "<f2").tobytes()), "nonfinite"),
    (_raw(V, 3, 0, 1, 0, 0, 0, np.full(60, np.inf, "<f2").tobytes()), "nonfinite"),
    (_raw(V, 3, 0, 1, 0, 0, 0, np.full(60, 3.0, "<f2").tobytes()), "range"),  # coordinate outside [-1, 1]
    (_raw(V, 3, 0, 1, 0, 0, 0, GOOD_PAYLOAD * 65), "length"),  # too many frames in one message
    (_raw(V, 1, "m", 64, float("nan"), 1, 1, 10, 0, None), "field"),  # NaN fps
    # a receiver's playout clock runs at the announced rate: 1..60 fps (P.MIN_FPS, P.MAX_FPS) only
    (_raw(V, 1, "m", 64, 240.0, 1, 1, 10, 0, None), "field"),  # rendered at ~42 fps, stalling other calls
    (_raw(V, 1, "m", 64, 60.5, 1, 1, 10, 0, None), "field"),
    (_raw(V, 1, "m", 64, 0.001, 1, 1, 10, 0, None), "field"),  # held a slot showing nothing
    (_raw(V, 1, "m", 64, 0.0, 1, 1, 10, 0, None), "field"),
    (_raw(V, 1, "m", 64, -30.0, 1, 1, 10, 0, None), "field"),
    (_raw(V, 1, "m", 64, float("inf"), 1, 1, 10, 0, None), "field"),
    (_raw(V, 1, "m", 64, True, 1, 1, 10, 0, None), "field"),  # a bool is not a rate (JavaScript agrees)
    (_raw(V, 1, "m", 64, "30", 1, 1, 10, 0, None), "field"),
    (_raw(V, 1, "m", 64, 30.0, 1, 1, 12, 0, None), "field"),  # wrong number of keypoints
    (_raw(V, 1, "m", 64, 30.0, 1, 1, 10), "malformed"),  # a version-1 Hello's fields
    (_raw(V, 1, "m", 64, 30.0, 2, 1, 10, 0, None), "field"),  # PRED without its parameters
    (_raw(V, 1, "m", 64, 30.0, 1, 1, 10, 0, PRED), "field"),  # parameters without PRED
    (_raw(V, 1, "m", 64, 30.0, 2, 2, 10, 0, PRED), "field"),  # PRED with decimation
    (_raw(V, 1, "m", 64, 30.0, 2, 1, 10, 0, ["oracle", *PRED[1:]]), "field"),
    (_raw(V, 1, "m", 64, 30.0, 2, 1, 10, 0, ["last", float("nan"), *PRED[2:]]), "field"),
    (_raw(V, 1, "m", 64, 30.0, 2, 1, 10, 0, ["last", 0.004, 0.0, 4, 90]), "field"),  # zero coord_step
    (_raw(V, 1, "m", 64, 30.0, 2, 1, 10, 0, [*PRED[:3], 10_000, 90]), "field"),  # absurd max_gap
    (_raw(V, 1, "m", 64, 30.0, 2, 1, 10, 0, PRED[:4]), "field"),
    (_raw(V, 2, 0, 3, 2, 10, b"x" * 16, b"abc"), "field"),  # chunk index >= total
    (_raw(V, 2, 0, 0, 1, 10**9, b"x" * 16, b"abc"), "field"),  # oversized source image
    (_raw(V, 7, 5, 1, False, 0, b"\x00" * 9), "residual"),  # 60 zero-bit codes do not fit 72 bits of zeros
    (_raw(V, 7, 5, 0, False, 0, ZERO_RESIDUAL), "field"),  # a residual needs a predecessor
    (_raw(V, 7, 5, 6, False, 0, ZERO_RESIDUAL), "field"),  # predecessor before seq 0
    (_raw(V, 7, 5, 1, 1, 0, ZERO_RESIDUAL), "field"),  # key must be a bool
    (_raw(V, 7, 5, 1, True, 0, ZERO_RESIDUAL), "length"),  # a keyframe is one Q8 vector
    (_raw(V, 7, 5, 1, True, 0, GOOD_Q8 + GOOD_Q8), "length"),  # two vectors
    (_raw(V, 7, 5, 1, False, 0, b"\x01" * 241), "field"),  # longer than any residual
    (_raw(V, 7, 5, 1, True, -1, GOOD_Q8), "field"),
    (_raw(V, 7, 5, 1, False, 0, ZERO_RESIDUAL + b"\x00"), "residual"),  # trailing bytes
    (_raw(V, 7, 5, 1, False, 0, b""), "residual"),
    (_raw(V, 8, -2), "field"),
    (_raw(V, 8, "1"), "field"),
    (b"\x00" * (P.MAX_MESSAGE_BYTES + 1), "oversized"),
])
def test_bad_messages_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.decode(data)
    assert e.value.reason == reason


def test_encode_refuses_bad_vectors() -> None:
    with pytest.raises(ValueError, match="60 values"):
        kpvector.encode_vector(np.zeros(59))
    with pytest.raises(ValueError, match="NaN"):
        kpvector.encode_vector(np.full(60, math.nan))


def test_sequence_filter_rejects_duplicates_and_stale() -> None:
    f = SequenceFilter(window=10)
    for s in [0, 2, 1, 5]:
        f.check(s)
    with pytest.raises(P.ProtocolError, match="duplicate"):
        f.check(2)
    f.check(30)
    with pytest.raises(P.ProtocolError, match="stale"):
        f.check(15)
    f.check(25)  # late but inside the window: fine


def test_reject_counter_counts_by_reason() -> None:
    c = RejectCounter()
    for r in ["range", "range", "oversized"]:
        c.reject(P.ProtocolError(r))
    assert c.counts == {"range": 2, "oversized": 1} and c.total == 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        P.decode(data)
    except P.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(), st.binary(max_size=200), st.text(max_size=20),
                          st.none(), st.booleans()), max_size=9))
def test_decoder_survives_structured_garbage(fields: list) -> None:
    for head in ([V, 3], [V, 1], [V, 2], [V, 7], [V, 8], [V, 1, "m", 64, 30.0, 2, 1, 10, 0], []):
        try:
            P.decode(msgpack.packb(head + fields, use_bin_type=True))
        except P.ProtocolError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1, 1, width=32), min_size=60, max_size=60), st.integers(0, 2**40))
def test_any_valid_vector_round_trips(values: list[float], seq: int) -> None:
    v = np.array(values, np.float32)
    msg = P.KeypointBatch.build(seq, 0, [v], P.Codec.Q8)
    (s, _, got), = P.decode(P.encode(msg)).frames()
    assert s == seq
    assert np.abs(got[:20] - v[:20]).max() < 2e-5


def test_sequence_filter_reset_forgets_every_seq() -> None:
    f = SequenceFilter(window=10)
    for s in range(50):
        f.check(s)
    f.reset()  # a restarted stream: the same numbers again are neither duplicates nor stale
    for s in range(5):
        f.check(s)


def _encoded(ext: str, h: int, w: int, *params: int) -> bytes:
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8)
    return cv2.imencode(ext, img, list(params))[1].tobytes()


def _claiming(jpeg: bytes, w: int, h: int, keep: int | None = None) -> bytes:
    """A real JPEG whose frame header claims ``w`` x ``h`` (truncated to ``keep`` bytes)."""
    sof = jpeg.index(b"\xff\xc0")
    out = jpeg[:sof + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpeg[sof + 9:]
    return out[:keep] if keep else out


@pytest.mark.parametrize("ext,params", [(".jpg", ()), (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)), (".png", ()),
                                        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 80)),
                                        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101))])  # VP8 and VP8L
def test_source_image_size_from_the_header(ext: str, params: tuple) -> None:
    for h, w in [(30, 50), (257, 129)]:
        assert S.source_image_size(_encoded(ext, h, w, *params)) == (w, h)


def test_source_image_bombs_are_refused_from_the_header() -> None:
    jpeg = _encoded(".jpg", 16, 16)
    png = _encoded(".png", 16, 16)
    bombs = {
        "truncated JPEG claiming 32767x32767": _claiming(jpeg, 32767, 32767, keep=629),
        "JPEG claiming 12000x12000": _claiming(jpeg, 12000, 12000),
        "a real 4096x4096 JPEG": cv2.imencode(".jpg", np.zeros((4096, 4096, 3), np.uint8))[1].tobytes(),
        "JPEG claiming 0 rows (height from a DNL marker)": _claiming(jpeg, 16, 0),
        "JPEG without a frame header": jpeg[:2] + jpeg[jpeg.index(b"\xff\xda"):],
        "JPEG of 200 scans": jpeg[:-2] + b"\xff\xda\x00\x02" * 200 + b"\xff\xd9",
        "PNG claiming 100000x100000": png[:16] + (100000).to_bytes(4, "big") * 2 + png[24:],
        "WebP canvas of 16384x16384": b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00"
                                      + (16383).to_bytes(3, "little") * 2,
        "BMP": cv2.imencode(".bmp", np.zeros((8, 8, 3), np.uint8))[1].tobytes(),
        "TIFF": cv2.imencode(".tiff", np.zeros((8, 8, 3), np.uint8))[1].tobytes(),
        "junk": b"\xff\xd8\xff",
    }
    for what, blob in bombs.items():
        with pytest.raises(P.ProtocolError) as e:
            S.source_image_size(blob)
        assert e.value.reason == "source_image", what
    assert S.source_image_size(_claiming(jpeg, 2048, 2048)) == (2048, 2048)  # the limit itself is fine


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**20), st.integers(0, 40), st.booleans(), st.integers(0, 2**40), st.binary(max_size=260))
def test_any_coded_keypoints_either_decode_or_are_refused(seq: int, back: int, key: bool, ts: int,
                                                           payload: bytes) -> None:
    """Random payloads in a well-formed frame: decode refuses them with a reason, or the receiver's
    decoder takes them or raises ValueError (which the session counts as "residual"), nothing else."""
    try:
        msg = P.decode(_raw(V, 7, seq, min(back, seq), key, ts, payload))
    except P.ProtocolError:
        return
    assert isinstance(msg, P.CodedKeypoints)
    cfg = PredictiveConfig(max_gap=64)
    dec = PredictiveDecoder(cfg)
    enc = PredictiveEncoder(cfg)
    base = max(0, msg.prev_seq)
    f = enc.encode(base, np.concatenate([np.zeros(20), np.tile([1.0, 0, 0, 1.0], 10)]))
    dec.push(CodedFrame(f.seq, -1, True, f.payload))  # a history the random frame can build on
    try:
        out = dec.push(CodedFrame(msg.seq, msg.prev_seq, msg.key, msg.payload))
    except ValueError:
        return
    for d in out:
        assert d.vector.shape == (60,) and np.isfinite(d.vector).all()


def test_q8_round_trips_jacobians_at_the_end_of_its_range() -> None:
    v = np.zeros(kpvector.KP_DIM, np.float32)
    v[kpvector.NUM_KP * 2:] = np.linspace(-16.0, 16.0, 4 * kpvector.NUM_KP)  # 15.78 and beyond quantise to +-127
    msg = P.KeypointBatch.build(seq0=0, ts0_us=0, vectors=[v], codec=P.Codec.Q8)
    (_seq, _ts, got), = P.decode(P.encode(msg)).frames()
    assert np.abs(got[20:]).max() == kpvector.JAC_RANGE  # exactly the range's end, not 16.000002
    assert np.allclose(got[20:], v[20:], rtol=0.03, atol=0.02)


def test_coded_keypoints_carry_their_predecessor_once_more_when_asked() -> None:
    r = encode_residual(np.arange(60, dtype=np.int32) % 3 - 1)
    m = P.CodedKeypoints(10, 8, False, 1234, r, 0, P.RedundantFrame(5, False, r))
    assert P.decode(P.encode(m)) == m
    key = kpvector.encode_vector(np.zeros(kpvector.KP_DIM, np.float32))
    first = P.CodedKeypoints(3, 0, False, 99, r, 2, P.RedundantFrame(-1, True, key))  # its predecessor is the keyframe
    assert P.decode(P.encode(first)) == first
    with pytest.raises(ValueError):
        P.encode(P.CodedKeypoints(10, 8, False, 1, r, None, P.RedundantFrame(5, False, r)))  # needs an image_id
    base = [P.PROTOCOL_VERSION, int(P.MsgType.CODED_KEYPOINTS), 10, 2, False, 1234, r, 0]
    for bad, reason in (([3, False], "field"), ([3, 1, r], "field"), ([0, False, r], "field"),
                        ([3, False, b"\x00" * 300], "field"), ([3, True, r], "length"), ("x", "field")):
        with pytest.raises(P.ProtocolError) as e:
            P.decode(msgpack.packb(base + [bad], use_bin_type=True))
        assert e.value.reason == reason, (bad, e.value)
    with pytest.raises(P.ProtocolError) as e:  # a keyframe with no predecessor has nothing to repeat
        P.decode(msgpack.packb([P.PROTOCOL_VERSION, 7, 10, 0, True, 1, key, 0, [1, False, r]], use_bin_type=True))
    assert e.value.reason == "field"
    with pytest.raises(P.ProtocolError) as e:
        P.decode(msgpack.packb(base + [[3, False, r], 1], use_bin_type=True))
    assert e.value.reason == "malformed"
