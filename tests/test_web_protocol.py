"""One spec, two implementations: the browser sender's protocol and codec (JavaScript, run under node)
against shared.protocol and shared.kpcodec.

- Q8 and F16 vectors: identical bytes for the same floats (edge values included: exact halves of a
  quantisation step, the clip limits, values beyond them);
- the predictive stream: the JavaScript encoder emits exactly the Python encoder's frames, byte for
  byte, and Python's decoder decodes them to Python's own decoded keypoints;
- messages: every type encoded in JavaScript decodes in Python to the same message, Python's
  decode in JavaScript to the same fields, keypoint messages are the same bytes, and malformed
  messages are refused by both with the same reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess

import msgpack
import numpy as np
import pytest

from shared import kpvector as V
from shared import protocol as P
from shared import source_image as S
from shared.kpcodec import (
    DEFAULT_STREAM,
    CodedFrame,
    PredictiveConfig,
    PredictiveDecoder,
    PredictiveEncoder,
    encode_residual,
)
from tests.harness import ROOT

SCRIPT = ROOT / "tests" / "web" / "protocol_check.mjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None or not (ROOT / "node_modules" / "@msgpack" / "msgpack").exists(),
    reason="node or node_modules missing (.ci/setup.sh runs npm ci)")


def _vectors(n: int = 400, seed: int = 0) -> np.ndarray:
    """A talking head's keypoints (a slow random walk with jitter) plus edge values."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(0, 0.004, (n, V.KP_DIM)), axis=0)
    base = np.concatenate([rng.uniform(-0.6, 0.6, 20), rng.normal(0, 1.5, 40)])
    v = base + walk + rng.normal(0, 0.002, (n, V.KP_DIM))
    v[50:60] = v[49]  # a still face: skipped frames
    v[100:103, :20] = np.array([1.0 / 1024, -3.0 / 1024, 0.5 + 1.0 / 1024])[:, None]  # exact half steps of 1/512
    v[103, :20] = np.linspace(-1.2, 1.2, 20)  # coordinates beyond the clip
    # Jacobians over the whole Q8 range: from 15.78 on they quantise to +-127, which decodes to exactly
    # JAC_RANGE (it once decoded to 16.000002 > JACOBIAN_LIMIT and the decoder refused its own keyframe)
    v[104, 20:] = np.linspace(-16.0, 16.0, 40)
    v[105, 20:] = 0.0
    v[200:210] += rng.normal(0, 0.2, (10, V.KP_DIM))  # fast motion: large residuals
    return v.astype(np.float32)


def _spec(msg: P.Message) -> dict:
    """A message as the JSON spec the node script builds its JavaScript message from."""
    d = {"type": type(msg).__name__}
    for f in dataclasses.fields(msg):
        val = getattr(msg, f.name)
        if isinstance(val, bytes):
            val = {"hex": val.hex()}
        elif isinstance(val, P.PredParams):
            val = dataclasses.asdict(val)
        elif isinstance(val, P.RedundantFrame):
            val = {"prev_seq": val.prev_seq, "key": val.key, "payload": {"hex": val.payload.hex()}}
        d[f.name] = val
    d.pop("version", None)
    return d


def _from_js(d: dict) -> dict:
    """A message the JavaScript decoder returned, as the dataclass fields Python compares."""
    out = {k: bytes.fromhex(v["hex"]) if isinstance(v, dict) and "hex" in v else v
           for k, v in d.items() if k != "type"}
    if isinstance(out.get("redundant"), dict):  # as dataclasses.asdict nests it
        r = out["redundant"]
        out["redundant"] = {"prev_seq": r["prev_seq"], "key": r["key"], "payload": bytes.fromhex(r["payload"]["hex"])}
    return out


MESSAGES: list[P.Message] = [
    P.Hello("kp-0a75f148200c", 256, 30.0, int(P.Codec.PRED), 1, V.NUM_KP, 1_764_000_000_123_456,
            DEFAULT_STREAM.params()),
    P.Hello("kp-x", 64, 24.5, int(P.Codec.Q8), 3),
    P.Hello("kp-x", 64, P.MAX_FPS, int(P.Codec.Q8)), P.Hello("kp-x", 64, P.MIN_FPS, int(P.Codec.F16)),
    P.SourceChunk(7, 1, 3, 40_000, bytes(range(16)), b"\xff\xd8jpeg bytes"),
    P.KeypointBatch.build(12, 5000, [np.zeros(V.KP_DIM, np.float32), np.full(V.KP_DIM, 0.25, np.float32)],
                          P.Codec.Q8, step=2, interval_us=66_666),
    P.KeypointBatch.build(0, 0, [np.linspace(-1, 1, V.KP_DIM, dtype=np.float32)], P.Codec.F16),
    P.CodedKeypoints(0, -1, True, 0, V.encode_vector(np.zeros(V.KP_DIM), P.Codec.Q8)),
    P.CodedKeypoints(2**40, 2**40 - 3, False, 2**33, encode_residual(np.arange(-30, 30))),
    P.CodedKeypoints(9, 8, False, 300_000, encode_residual(np.zeros(V.KP_DIM, int)), image_id=2),
    P.CodedKeypoints(12, 9, False, 400_000, encode_residual(np.arange(-30, 30)), 2,
                     P.RedundantFrame(8, False, encode_residual(np.zeros(V.KP_DIM, int)))),
    P.KeypointBatch.build(3, 7, [np.zeros(V.KP_DIM, np.float32)], P.Codec.Q8, image_id=0),
    P.KeyframeRequest(41), P.KeyframeRequest(), P.SourceReady(3),
    P.Heartbeat(1_764_000_000_000_000),
    P.SourceRequest("lost"), P.Bye("done"), P.Bye(""),
]

# malformed messages both decoders must refuse, with Python's reason
BAD: list[bytes] = [
    b"\xc1",  # not msgpack
    msgpack.packb({"a": 1}),
    msgpack.packb([1, 6, "old"]),  # version 1
    msgpack.packb([2, 99, 0]),  # unknown type
    msgpack.packb([2, 6]),  # wrong arity
    msgpack.packb([2, 3, 0, 1, 0, 0, 1, b"\x00" * 79]),  # Q8 payload not a multiple of 80
    msgpack.packb([2, 3, 0, 0, 0, 0, 1, b"\x00" * 80]),  # step 0
    msgpack.packb([2, 7, 5, 0, False, 0, b"\x00"]),  # residual without a previous frame
    msgpack.packb([2, 7, 5, 1, False, 0, b"\x00" * 3]),  # not a residual bitstream
    msgpack.packb([2, 7, 5, 1, 1, 0, b"\x00" * 80]),  # key is not a bool
    msgpack.packb([2, 1, "m", 256, 30.0, 2, 1, 10, 0, None]),  # predictive codec without parameters
    msgpack.packb([2, 1, "m", 256, 0.0, 1, 1, 10, 0, None]),  # fps 0
    msgpack.packb([2, 1, "m", 256, 240.0, 1, 1, 10, 0, None]),  # fps over MAX_FPS (60)
    msgpack.packb([2, 1, "m", 256, 0.5, 1, 1, 10, 0, None]),  # fps under MIN_FPS (1)
    msgpack.packb([2, 1, "m", 256, True, 1, 1, 10, 0, None]),  # a bool for fps
    msgpack.packb([2, 2, 0, 0, 1, 10, b"short", b"x"]),  # digest not 16 bytes
    msgpack.packb([2, 4, -1]),  # negative time
    msgpack.packb([2, 7, 5, 0, True, 0, b"\x00" * 80, None]),  # image_id nil
    msgpack.packb([2, 7, 5, 0, True, 0, b"\x00" * 80, 1, 2]),  # a redundant frame that is not [back, key, payload]
    msgpack.packb([2, 7, 5, 1, False, 0, b"\x00", 1, [2, False, b"\x00" * 3]]),  # its payload is not a residual
    msgpack.packb([2, 7, 5, 1, False, 0, b"\x00", 1, [1, False, b"\x00"], 3]),  # one more after it
    msgpack.packb([2, 4, 1, 2]),  # only keypoint messages take a trailing field
]


def _python_reason(data: bytes) -> str:
    try:
        P.decode(data)
    except P.ProtocolError as e:
        return e.reason
    raise AssertionError(f"Python accepted {data!r}")


@pytest.fixture(scope="module")
def js() -> dict:
    vectors = _vectors()
    cfg = DEFAULT_STREAM
    job = {"vectors": vectors.astype(float).tolist(), "keyframe_requests": [150, 151, 300],
           "pred_config": {**dataclasses.asdict(cfg)},
           "encode": [_spec(m) for m in MESSAGES],
           "decode": [P.encode(m).hex() for m in MESSAGES] + [b.hex() for b in BAD],
           "source_image": (b"\xff\xd8\xff" + bytes(range(256)) * 150).hex(), "chunk_bytes": 16 * 1024}
    res = subprocess.run([NODE, str(SCRIPT)], input=json.dumps(job), capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"job": job, "vectors": vectors, "cfg": cfg, **json.loads(res.stdout)}


def test_vector_codecs_are_the_same_bytes(js: dict) -> None:
    for i, v in enumerate(js["vectors"]):
        assert js["q8"][i] == V.encode_vector(v, P.Codec.Q8).hex(), f"Q8 differs at vector {i}"
        assert js["f16"][i] == V.encode_vector(v, P.Codec.F16).hex(), f"F16 differs at vector {i}"
        ref = V.decode_vectors(bytes.fromhex(js["q8"][i]), P.Codec.Q8)[0]
        assert np.array_equal(np.array(js["q8_decoded"][i], np.float32), ref), f"Q8 decodes differently at {i}"


def _python_stream(vectors: np.ndarray, cfg: PredictiveConfig, requests: list[int]) -> list:
    enc = PredictiveEncoder(cfg)
    frames = []
    for seq, v in enumerate(vectors):
        if seq in requests:
            enc.request_keyframe()
        f = enc.encode(seq, v)
        if f is not None:
            frames.append(f)
    return frames


def test_predictive_stream_is_bit_exact(js: dict) -> None:
    frames = _python_stream(js["vectors"], js["cfg"], js["job"]["keyframe_requests"])
    got = js["pred"]
    # the stream exercises every kind of frame
    assert js["pred_counts"]["key"] >= 4 and js["pred_counts"]["residual"] > 50 and js["pred_counts"]["skipped"] > 20
    assert [(f["seq"], f["prev_seq"], f["key"]) for f in got] == [(f.seq, f.prev_seq, f.key) for f in frames]
    for a, b in zip(got, frames, strict=True):
        assert a["payload"] == b.payload.hex(), f"frame {b.seq}: payloads differ"
        want = P.encode(P.CodedKeypoints(b.seq, b.prev_seq, b.key, b.seq * 33333, b.payload))
        assert a["message"] == want.hex(), f"frame {b.seq}: messages differ"
    # Python's decoder follows the JavaScript stream: every frame decodes, none is dropped
    dec = PredictiveDecoder(PredictiveConfig.from_params(js["cfg"].params()))
    decoded = []
    for f in got:
        msg = P.decode(bytes.fromhex(f["message"]))
        assert isinstance(msg, P.CodedKeypoints)
        decoded += dec.push(CodedFrame(msg.seq, msg.prev_seq, msg.key, msg.payload))
    assert [d.seq for d in decoded] == list(range(got[-1]["seq"] + 1))
    assert dec.counts["dropped"] == 0 and not dec.needs_keyframe
    # within the codec's tolerance of the truth (mean rule, cap 3x; Jacobians at 10x)
    err = np.abs(np.array([d.vector[:20] for d in decoded]) - np.clip(js["vectors"][: len(decoded), :20], -1, 1))
    assert err.max() <= 3 * js["cfg"].tolerance + 1 / 512


def test_javascript_messages_decode_in_python(js: dict) -> None:
    for msg, h in zip(MESSAGES, js["encoded"], strict=True):
        got = P.decode(bytes.fromhex(h))
        assert got == msg, (msg, got)
        if isinstance(msg, (P.CodedKeypoints, P.KeypointBatch, P.SourceChunk, P.KeyframeRequest, P.SourceReady, P.Bye)):
            assert h == P.encode(msg).hex(), f"{type(msg).__name__}: not the same bytes"


def test_python_messages_decode_in_javascript(js: dict) -> None:
    for msg, d in zip(MESSAGES, js["decoded"][: len(MESSAGES)], strict=True):
        assert "error" not in d, (msg, d)
        assert d["type"] == type(msg).__name__
        want = dataclasses.asdict(msg)
        got = _from_js(d)
        assert got == want, (want, got)


def test_both_refuse_the_same_malformed_messages(js: dict) -> None:
    for data, d in zip(BAD, js["decoded"][len(MESSAGES):], strict=True):
        assert d.get("error") == _python_reason(data), (data, d)


def test_source_chunks_reassemble_in_python(js: dict) -> None:
    image = bytes.fromhex(js["job"]["source_image"])
    asm = S.SourceAssembler()
    out = None
    chunks = [P.decode(bytes.fromhex(h)) for h in js["source_chunks"]]
    assert len(chunks) == -(-len(image) // (16 * 1024)) and all(c.image_id == 3 for c in chunks)
    assert [P.encode(c) for c in chunks] == [P.encode(c) for c in S.split_source(image, 3, 16 * 1024)]
    for c in chunks:
        out = asm.add(c)
    assert out == image and hashlib.sha256(out).digest()[:16] == chunks[0].digest
