"""The kpcast wire protocol: versioned msgpack messages on WebRTC data channels.

Every message is a msgpack array ``[version, type, *fields]``. The decoder is the
one place that trusts nothing a peer sends: every failure raises
:class:`ProtocolError` with a short machine-readable ``reason`` that the receiver
counts, and nothing else escapes it.

Messages
--------
- ``Hello``: protocol version, model id, frame size, fps, keypoint codec, decimation.
- ``SourceChunk``: one piece of the JPEG source image (split under the peer's max
  message size, reassembled by :class:`SourceAssembler` and checked by SHA-256).
  :func:`source_image_size` reads the image's dimensions from its header, so a picture
  too large to decode safely is refused before any decoder allocates its pixels.
- ``KeypointBatch``: one or more keypoint frames (``seq0 + i*step``), each a
  60-value vector quantised by a :class:`Codec` (``--codec q8|f16`` streams).
- ``CodedKeypoints``: one frame of the closed-loop predictive stream (``Codec.PRED``, the
  sender's default, ``shared.kpcodec``): a keyframe or a residual against the prediction
  both ends make from the decoded history; frames the receiver can predict are not sent.
- ``KeyframeRequest`` (receiver -> sender, control channel): the predictive chain broke.
- ``SourceReady`` (receiver -> sender, control channel): a source image is decoded and encoded;
  the sender starts its frames only then, so none queue behind the image at the start of a call.
- ``Heartbeat``, ``SourceRequest``, ``Bye``: liveness and control.

Source image ids on keypoint messages
-------------------------------------
``KeypointBatch`` and ``CodedKeypoints`` may end with one optional field, ``image_id``: the
``SourceChunk.image_id`` of the source image the keypoints were captured for (the sender sends
a new image when it re-frames or refreshes; keypoints of a new framing are meaningless against
the old picture). It is an optional *trailing* field rather than a version bump: a message
without it decodes as before (``image_id=None``: "whatever source image the receiver holds"),
so version-2 peers that do not tag keep working. When present it must be an int in
``[0, 2**62]`` (msgpack nil, bools, floats, negatives: ``ProtocolError("field")``). Arrays are::

    [2, 3, seq0, step, ts0_us, interval_us, codec, payload(, image_id)]   # KeypointBatch
    [2, 7, seq, seq - prev_seq, key, ts_us, payload(, image_id)]          # CodedKeypoints

The receiver renders a tagged frame only against the image it names: frames for an image that
is not complete yet wait (the last picture is held), frames for an image older than the one in
use are dropped. Ids grow with the capture sequence, and the sender makes the first frame that
names a new image a keyframe, so the predictive chain never predicts across two images. After a
re-frame the keypoints must name the new image at once; after a refresh (same framing, so the
keypoints fit both pictures) the Python sender keeps naming the previous one for 0.3 s, so the
receiver has the new image ready before the first frame that needs it.

Redundancy on coded keypoints
-----------------------------
A ``CodedKeypoints`` message may carry, after its ``image_id``, the frame it follows (the coded
frame ``prev_seq``) once more: ``[seq - prev_seq of that frame, key, payload]``. One lost message
otherwise breaks the closed-loop chain until a requested keyframe arrives (a round trip of
concealed frames); with the previous frame inside the next message, a single loss is repaired one
message later, usually inside the jitter buffer. It costs its payload bytes (~25 B) but no message
(each costs ~95 B of transport), and the sender adds it only after a loss was reported
(``sender.kpsend``)::

    [2, 7, seq, seq - prev_seq, key, ts_us, payload, image_id, [back, key, payload]]

Version 2 added the predictive stream; a peer speaking another version is refused
with ``ProtocolError("version")`` ("unsupported protocol version"), and
:func:`legacy_bye` says so to a version-1 peer in a form it can read.

Keypoint vector layout (60 = 10 keypoints x (x, y) + 10 Jacobians x 4):
``[x0, y0, ..., x9, y9, J0_00, J0_01, J0_10, J0_11, ..., J9_11]``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import numpy as np

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
LEGACY_VERSIONS = (1,)  # versions whose Bye layout [version, 6, reason] we can still write
NUM_KP = 10
KP_DIM = 6 * NUM_KP
MAX_MESSAGE_BYTES = 64 * 1024  # peers without a max-message-size SDP line allow 64 KiB
MAX_SOURCE_BYTES = 2 * 1024 * 1024  # a JPEG source image larger than this is refused
# Decoded pixels of a source image: the largest receiver renders 256x256, so 2048x2048 is already
# generous; a header may claim up to 65535x65535 (12 GB of pixels) in a few hundred bytes.
MAX_SOURCE_PIXELS = 2048 * 2048
MAX_JPEG_SCANS = 64  # progressive JPEGs use ~10; each scan re-walks every coefficient (a CPU bomb)
MAX_FRAMES_PER_BATCH = 64
COORD_LIMIT = 1.0 + 1e-3  # keypoints are soft-argmax means of a grid in [-1, 1]
JACOBIAN_LIMIT = 16.0  # local affines larger than this are not a face moving
DIGEST_BYTES = 16


class MsgType(enum.IntEnum):
    HELLO = 1
    SOURCE_CHUNK = 2
    KEYPOINTS = 3
    HEARTBEAT = 4
    SOURCE_REQUEST = 5
    BYE = 6
    CODED_KEYPOINTS = 7
    KEYFRAME_REQUEST = 8
    SOURCE_READY = 9


class ProtocolError(ValueError):
    """A message was rejected; ``reason`` is one of a small fixed set, for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- codecs


class Codec(enum.IntEnum):
    """How a 60-value keypoint vector is quantised.

    F16: every value float16 (120 B/frame).
    Q8: coordinates as uint16 over [-1, 1] (step 3e-5); Jacobian entries as int8 on a
        logarithmic scale over [-JAC_RANGE, JAC_RANGE] (80 B/frame): steps of ~0.014 near 0
        growing to ~3% of the value for large entries. Trained detectors put a quarter of
        their Jacobian entries beyond +-2, so a linear int8 scale would be either coarse or
        clipped; relative precision is what the warp J_s J_d^-1 needs.
    PRED: not a per-vector codec: the closed-loop predictive stream of ``CodedKeypoints``
        messages (``shared.kpcodec``; keyframes are Q8 vectors, the rest residuals or nothing).
    """

    F16 = 0
    Q8 = 1
    PRED = 2


VECTOR_CODECS = (Codec.F16, Codec.Q8)  # the codecs a KeypointBatch payload can use
PREDICTORS = ("last", "linear")  # closed-loop predictors (shared.kpcodec.predict)
MAX_PRED_GAP = 64  # largest max_gap a Hello may announce (frames skipped in a row)
MAX_RESIDUAL_BYTES = 4 * KP_DIM  # a residual of a keypoint vector is never longer

JAC_RANGE = 16.0
_JAC_KNEE = 0.5  # the log scale is ~linear below this magnitude
_JAC_NORM = float(np.log1p(JAC_RANGE / _JAC_KNEE))
_NC = 2 * NUM_KP  # number of coordinate values


def _jac_to_q8(j: np.ndarray) -> np.ndarray:
    j = np.clip(j, -JAC_RANGE, JAC_RANGE)
    return np.round(127 * np.sign(j) * np.log1p(np.abs(j) / _JAC_KNEE) / _JAC_NORM).astype("i1")


def _q8_to_jac(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.float32)
    j = (np.sign(q) * _JAC_KNEE * np.expm1(np.abs(q) / 127 * _JAC_NORM)).astype(np.float32)
    # float32 rounding puts +-127 at 16.000002, past JACOBIAN_LIMIT: the decoder would refuse a
    # sender's own keyframe whenever a Jacobian entry reached 15.78. The scale ends at JAC_RANGE.
    return np.clip(j, -JAC_RANGE, JAC_RANGE)


def frame_bytes(codec: Codec) -> int:
    """Bytes of one vector in a KeypointBatch payload (F16 and Q8 only)."""
    sizes = {Codec.F16: 2 * KP_DIM, Codec.Q8: 2 * _NC + (KP_DIM - _NC)}
    if codec not in sizes:
        raise ValueError(f"codec {codec} does not code single vectors")
    return sizes[Codec(codec)]


def encode_vector(vec: np.ndarray, codec: Codec = Codec.Q8) -> bytes:
    """Quantise one 60-value keypoint vector. Raises ValueError on wrong size or NaN/inf."""
    v = np.asarray(vec, dtype=np.float64).reshape(-1)
    if v.size != KP_DIM:
        raise ValueError(f"keypoint vector must have {KP_DIM} values, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError("keypoint vector contains NaN or inf")
    coords = np.clip(v[:_NC], -1.0, 1.0)
    jac = v[_NC:]
    if codec == Codec.F16:
        return np.concatenate([coords, np.clip(jac, -JACOBIAN_LIMIT, JACOBIAN_LIMIT)]).astype("<f2").tobytes()
    if codec == Codec.Q8:
        q_c = np.round((coords + 1.0) / 2.0 * 65535).astype("<u2")
        return q_c.tobytes() + _jac_to_q8(jac).tobytes()
    raise ValueError(f"unknown codec {codec}")


def decode_vectors(payload: bytes, codec: int) -> np.ndarray:
    """Payload of n frames -> (n, 60) float32. Raises ProtocolError."""
    if codec not in VECTOR_CODECS:
        raise ProtocolError("codec", f"codec {codec!r:.20} does not code single vectors")
    codec = Codec(codec)
    fb = frame_bytes(codec)
    if len(payload) == 0 or len(payload) % fb:
        raise ProtocolError("length", f"payload of {len(payload)} B is not a multiple of {fb} B")
    n = len(payload) // fb
    if codec == Codec.F16:
        out = np.frombuffer(payload, dtype="<f2").reshape(n, KP_DIM).astype(np.float32)
    else:
        raw = np.frombuffer(payload, dtype=np.uint8).reshape(n, fb)
        coords = raw[:, : 2 * _NC].copy().view("<u2").astype(np.float32) / 65535 * 2.0 - 1.0
        jac = _q8_to_jac(raw[:, 2 * _NC:].copy().view("i1"))
        out = np.concatenate([coords, jac], axis=1)
    if not np.isfinite(out).all():
        raise ProtocolError("nonfinite", "keypoints contain NaN or inf")
    if np.abs(out[:, :_NC]).max() > COORD_LIMIT:
        raise ProtocolError("range", "keypoint coordinate outside [-1, 1]")
    if np.abs(out[:, _NC:]).max() > JACOBIAN_LIMIT:
        raise ProtocolError("range", "Jacobian entry out of range")
    return out


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class PredParams:
    """The predictive codec's parameters, announced in the Hello so both ends share them.

    The decoder needs ``predictor`` and ``coord_step`` (its predictions must equal the
    encoder's bit for bit) and ``max_gap`` (a longer gap is a loss, not a skip);
    ``tolerance`` is the sender's starting value (rate control may change it, the receiver
    only reports it) and ``keyframe_interval`` tells the receiver how long a broken chain
    can last without a request. See ``shared.kpcodec.PredictiveConfig``.
    """

    predictor: str = "last"
    tolerance: float = 0.004
    coord_step: float = 1.0 / 512
    max_gap: int = 4
    keyframe_interval: int = 90


@dataclass(frozen=True)
class Hello:
    model: str
    size: int
    fps: float
    codec: int = int(Codec.Q8)
    kp_every: int = 1  # the sender sends every k-th frame's keypoints (KeypointBatch streams)
    num_kp: int = NUM_KP
    # Sender clock (us) that CodedKeypoints times count from: small numbers are fewer bytes.
    ts_base_us: int = 0
    pred: PredParams | None = None  # exactly when codec is Codec.PRED
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class SourceChunk:
    image_id: int
    index: int
    total: int
    total_bytes: int
    digest: bytes  # first 16 bytes of SHA-256 of the whole JPEG
    data: bytes


@dataclass(frozen=True)
class KeypointBatch:
    seq0: int  # capture-frame index of the first vector
    step: int  # seq of vector i is seq0 + i * step
    ts0_us: int  # sender capture time of the first vector (sender clock, microseconds)
    interval_us: int  # capture time between consecutive vectors
    codec: int
    payload: bytes
    image_id: int | None = None  # the source image these keypoints refer to (None: untagged)

    def frames(self) -> list[tuple[int, int, np.ndarray]]:
        """(seq, capture time in us, vector) for each frame; raises ProtocolError."""
        vecs = decode_vectors(self.payload, self.codec)
        return [(self.seq0 + i * self.step, self.ts0_us + i * self.interval_us, v) for i, v in enumerate(vecs)]

    @staticmethod
    def build(seq0: int, ts0_us: int, vectors: list[np.ndarray], codec: Codec = Codec.Q8,
              step: int = 1, interval_us: int = 0, image_id: int | None = None) -> KeypointBatch:
        payload = b"".join(encode_vector(v, codec) for v in vectors)
        return KeypointBatch(seq0, step, ts0_us, interval_us, int(codec), payload, image_id)


@dataclass(frozen=True)
class CodedKeypoints:
    """One frame of the predictive stream (a ``shared.kpcodec.CodedFrame`` plus its time).

    On the wire ``prev_seq`` travels as ``seq - prev_seq`` (0 before the first frame: only
    a keyframe may have no predecessor) and the capture time as ``ts_us``, microseconds
    after the Hello's ``ts_base_us``: both fit in one to five msgpack bytes.
    """

    seq: int
    prev_seq: int  # the previous coded frame, -1 for none
    key: bool  # payload is an absolute Q8 vector; else an Exp-Golomb residual
    ts_us: int  # capture time - Hello.ts_base_us (sender clock)
    payload: bytes
    image_id: int | None = None  # the source image these keypoints refer to (None: untagged)
    redundant: RedundantFrame | None = None  # the coded frame ``prev_seq`` once more (needs image_id)


@dataclass(frozen=True)
class RedundantFrame:
    """The previous coded frame, repeated inside a ``CodedKeypoints`` (its seq is the carrier's ``prev_seq``)."""

    prev_seq: int  # that frame's own previous coded frame, -1 for none
    key: bool
    payload: bytes


@dataclass(frozen=True)
class KeyframeRequest:
    """Receiver -> sender on the control channel: send the next frame as a keyframe."""

    last_seq: int = -1  # the newest frame the receiver decoded (for the sender's log)


@dataclass(frozen=True)
class SourceReady:
    """Receiver -> sender on the control channel: source image ``image_id`` can be rendered against."""

    image_id: int


@dataclass(frozen=True)
class Heartbeat:
    ts_us: int


@dataclass(frozen=True)
class SourceRequest:
    reason: str = ""


@dataclass(frozen=True)
class Bye:
    reason: str = ""


Message = (Hello | SourceChunk | KeypointBatch | CodedKeypoints | KeyframeRequest | SourceReady | Heartbeat
           | SourceRequest | Bye)


def encode(msg: Message) -> bytes:
    """Serialise a message to bytes."""
    v = PROTOCOL_VERSION
    if isinstance(msg, Hello):
        pred = None if msg.pred is None else [msg.pred.predictor, float(msg.pred.tolerance), float(msg.pred.coord_step),
                                              msg.pred.max_gap, msg.pred.keyframe_interval]
        body = [v, MsgType.HELLO, msg.model, msg.size, float(msg.fps), msg.codec, msg.kp_every, msg.num_kp,
                msg.ts_base_us, pred]
    elif isinstance(msg, SourceChunk):
        body = [v, MsgType.SOURCE_CHUNK, msg.image_id, msg.index, msg.total, msg.total_bytes, msg.digest, msg.data]
    elif isinstance(msg, KeypointBatch):
        body = [v, MsgType.KEYPOINTS, msg.seq0, msg.step, msg.ts0_us, msg.interval_us, msg.codec, msg.payload]
        if msg.image_id is not None:  # optional trailing field: absent means "any source"
            body.append(msg.image_id)
    elif isinstance(msg, CodedKeypoints):
        back = 0 if msg.prev_seq < 0 else msg.seq - msg.prev_seq
        body = [v, MsgType.CODED_KEYPOINTS, msg.seq, back, bool(msg.key), msg.ts_us, msg.payload]
        if msg.image_id is not None:
            body.append(msg.image_id)
        if msg.redundant is not None:
            r = msg.redundant
            if msg.image_id is None or msg.prev_seq < 0:
                raise ValueError("a redundant frame needs image_id and a previous frame")
            body.append([0 if r.prev_seq < 0 else msg.prev_seq - r.prev_seq, bool(r.key), r.payload])
    elif isinstance(msg, KeyframeRequest):
        body = [v, MsgType.KEYFRAME_REQUEST, msg.last_seq]
    elif isinstance(msg, Heartbeat):
        body = [v, MsgType.HEARTBEAT, msg.ts_us]
    elif isinstance(msg, SourceReady):
        body = [v, MsgType.SOURCE_READY, msg.image_id]
    elif isinstance(msg, SourceRequest):
        body = [v, MsgType.SOURCE_REQUEST, msg.reason]
    elif isinstance(msg, Bye):
        body = [v, MsgType.BYE, msg.reason]
    else:
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    return msgpack.packb([int(x) if isinstance(x, enum.IntEnum) else x for x in body], use_bin_type=True)


def _int(x: object, lo: int, hi: int, name: str) -> int:
    if type(x) is not int or not lo <= x <= hi:
        raise ProtocolError("field", f"{name} must be an int in [{lo}, {hi}], got {x!r:.40}")
    return x


def _bytes(x: object, max_len: int, name: str) -> bytes:
    if not isinstance(x, bytes) or len(x) > max_len:
        raise ProtocolError("field", f"{name} must be bytes of at most {max_len}")
    return x


def _str(x: object, max_len: int, name: str) -> str:
    if not isinstance(x, str) or len(x) > max_len:
        raise ProtocolError("field", f"{name} must be a string of at most {max_len} chars")
    return x


def _float(x: object, lo: float, hi: float, name: str) -> float:
    if type(x) not in (int, float) or not lo <= float(x) <= hi:  # NaN fails the comparison
        raise ProtocolError("field", f"{name} must be a number in [{lo}, {hi}], got {x!r:.40}")
    return float(x)


def _pred_params(x: object) -> PredParams:
    if not isinstance(x, list) or len(x) != 5:
        raise ProtocolError("field", "pred must be [predictor, tolerance, coord_step, max_gap, keyframe_interval]")
    predictor = _str(x[0], 16, "predictor")
    if predictor not in PREDICTORS:
        raise ProtocolError("field", f"unknown predictor {predictor!r:.20}")
    return PredParams(predictor, _float(x[1], 0.0, 1.0, "tolerance"), _float(x[2], 1e-5, 0.1, "coord_step"),
                      _int(x[3], 0, MAX_PRED_GAP, "max_gap"), _int(x[4], 1, 100_000, "keyframe_interval"))


_ARITY = {MsgType.HELLO: 10, MsgType.SOURCE_CHUNK: 8, MsgType.KEYPOINTS: 8, MsgType.HEARTBEAT: 3,
          MsgType.SOURCE_REQUEST: 3, MsgType.BYE: 3, MsgType.CODED_KEYPOINTS: 7, MsgType.KEYFRAME_REQUEST: 3,
          MsgType.SOURCE_READY: 3}
# Messages that may carry one more, optional, trailing field (image_id).
_OPTIONAL_TRAILING = {MsgType.KEYPOINTS, MsgType.CODED_KEYPOINTS}
I64 = 2 ** 62


def decode(data: bytes | str, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and validate one message. Raises ProtocolError, never anything else."""
    if isinstance(data, str):  # aiortc delivers text frames as str
        raise ProtocolError("malformed", "text message on a binary protocol")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("malformed", f"unexpected {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError("oversized", f"{len(data)} B > {max_bytes} B")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True,
                              max_array_len=16, max_map_len=16,
                              max_str_len=4096, max_bin_len=max_bytes)
    except Exception as e:  # msgpack raises a zoo of types on garbage
        raise ProtocolError("malformed", f"not msgpack: {type(e).__name__}") from None
    if not isinstance(obj, list) or len(obj) < 2:
        raise ProtocolError("malformed", "expected an array [version, type, ...]")
    if obj[0] != PROTOCOL_VERSION or type(obj[0]) is not int:
        raise ProtocolError("version", f"unsupported protocol version {obj[0]!r:.20} (this end speaks "
                                       f"{PROTOCOL_VERSION})")
    try:
        mtype = MsgType(obj[1])
    except (ValueError, TypeError):
        raise ProtocolError("type", f"unknown message type {obj[1]!r:.20}") from None
    n = _ARITY[mtype]
    extra = 2 if mtype == MsgType.CODED_KEYPOINTS else 1  # image_id, then the redundant frame
    if len(obj) != n and not (mtype in _OPTIONAL_TRAILING and n < len(obj) <= n + extra):
        raise ProtocolError("malformed", f"{mtype.name} needs {n} fields, got {len(obj)}")
    f = obj[2:]
    image_id = _int(f[n - 2], 0, I64, "image_id") if len(obj) > n else None
    if mtype == MsgType.HELLO:
        model = _str(f[0], 128, "model")
        size = _int(f[1], 16, 4096, "size")
        if not isinstance(f[2], (int, float)) or not (0 < float(f[2]) <= 240):
            raise ProtocolError("field", f"fps must be in (0, 240], got {f[2]!r:.20}")
        codec = _int(f[3], 0, 255, "codec")
        if codec not in {c.value for c in Codec}:
            raise ProtocolError("codec", f"unknown codec {codec}")
        kp_every = _int(f[4], 1, 64, "kp_every")
        num_kp = _int(f[5], 1, 64, "num_kp")
        if num_kp != NUM_KP:
            raise ProtocolError("field", f"num_kp {num_kp} unsupported (this end uses {NUM_KP})")
        ts_base = _int(f[6], 0, I64, "ts_base_us")
        pred = None if f[7] is None else _pred_params(f[7])
        if (codec == Codec.PRED) != (pred is not None):
            raise ProtocolError("field", "codec parameters come with the predictive codec, and only with it")
        if codec == Codec.PRED and kp_every != 1:
            raise ProtocolError("field", "the predictive codec decides per frame: kp_every must be 1")
        return Hello(model, size, float(f[2]), codec, kp_every, num_kp, ts_base, pred)
    if mtype == MsgType.SOURCE_CHUNK:
        image_id = _int(f[0], 0, I64, "image_id")
        total = _int(f[2], 1, 4096, "total")
        index = _int(f[1], 0, total - 1, "index")
        total_bytes = _int(f[3], 1, MAX_SOURCE_BYTES, "total_bytes")
        digest = _bytes(f[4], DIGEST_BYTES, "digest")
        if len(digest) != DIGEST_BYTES:
            raise ProtocolError("field", "digest must be 16 bytes")
        chunk = _bytes(f[5], max_bytes, "data")
        if not chunk:
            raise ProtocolError("field", "empty source chunk")
        return SourceChunk(image_id, index, total, total_bytes, digest, chunk)
    if mtype == MsgType.KEYPOINTS:
        seq0 = _int(f[0], 0, I64, "seq0")
        step = _int(f[1], 1, 64, "step")
        ts0 = _int(f[2], 0, I64, "ts0_us")
        interval = _int(f[3], 0, 10_000_000, "interval_us")
        codec = _int(f[4], 0, 255, "codec")
        payload = _bytes(f[5], max_bytes, "payload")
        batch = KeypointBatch(seq0, step, ts0, interval, codec, payload, image_id)
        vecs = decode_vectors(payload, codec)  # validates size, NaN/inf, ranges
        if len(vecs) > MAX_FRAMES_PER_BATCH:
            raise ProtocolError("length", f"{len(vecs)} frames in one message > {MAX_FRAMES_PER_BATCH}")
        return batch
    if mtype == MsgType.CODED_KEYPOINTS:
        msg = _coded_keypoints(f, image_id)
        if len(obj) == n + 2:
            r = f[n - 1]
            if not isinstance(r, list) or len(r) != 3:
                raise ProtocolError("field", "the redundant frame must be [back, key, payload]")
            if msg.prev_seq < 0:
                raise ProtocolError("field", "a frame without a previous one carries no redundant frame")
            prev = _coded_keypoints([msg.prev_seq, r[0], r[1], 0, r[2]], None)  # validated like any frame
            msg = dataclasses.replace(msg, redundant=RedundantFrame(prev.prev_seq, prev.key, prev.payload))
        return msg
    if mtype == MsgType.KEYFRAME_REQUEST:
        return KeyframeRequest(_int(f[0], -1, I64, "last_seq"))
    if mtype == MsgType.SOURCE_READY:
        return SourceReady(_int(f[0], 0, I64, "image_id"))
    if mtype == MsgType.HEARTBEAT:
        return Heartbeat(_int(f[0], 0, I64, "ts_us"))
    if mtype == MsgType.SOURCE_REQUEST:
        return SourceRequest(_str(f[0], 256, "reason"))
    return Bye(_str(f[0], 256, "reason"))


def _coded_keypoints(f: list, image_id: int | None) -> CodedKeypoints:
    seq = _int(f[0], 0, I64, "seq")
    back = _int(f[1], 0, seq, "seq - prev_seq")
    if type(f[2]) is not bool:
        raise ProtocolError("field", "key must be a bool")
    key = f[2]
    ts = _int(f[3], 0, I64, "ts_us")
    payload = _bytes(f[4], MAX_RESIDUAL_BYTES, "payload")
    if back == 0 and not key:
        raise ProtocolError("field", "only a keyframe may have no previous frame")
    if key:
        decode_vectors(payload, Codec.Q8)  # exactly one Q8 vector: size, NaN/inf, ranges
        if len(payload) != frame_bytes(Codec.Q8):
            raise ProtocolError("length", "a keyframe carries one Q8 vector")
    else:
        from shared.kpcodec import decode_residual  # lazily: kpcodec builds on this module

        try:
            decode_residual(payload)  # a valid bitstream of 60 residuals (their range is the decoder's call)
        except ValueError as e:
            raise ProtocolError("residual", str(e)) from None
    return CodedKeypoints(seq, seq - back if back else -1, key, ts, payload, image_id)


def legacy_bye(data: bytes | bytearray | memoryview, reason: str) -> bytes | None:
    """A Bye an older peer can read, when ``data`` is a message of a version we know the layout of.

    ``decode`` refuses other versions; this lets the receiver tell a version-1 sender why
    its call ends instead of leaving it to time out.
    """
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, max_array_len=16, max_map_len=16, max_str_len=4096,
                              max_bin_len=MAX_MESSAGE_BYTES)
    except Exception:  # not even msgpack: nobody to answer
        return None
    if not isinstance(obj, list) or not obj or type(obj[0]) is not int or obj[0] not in LEGACY_VERSIONS:
        return None
    return msgpack.packb([obj[0], int(MsgType.BYE), reason[:256]], use_bin_type=True)


# --------------------------------------------------------------------------- source image


def split_source(jpeg: bytes, image_id: int, chunk_bytes: int = 16 * 1024) -> list[SourceChunk]:
    """Split an encoded image into chunks that each fit one data-channel message."""
    if not jpeg:
        raise ValueError("empty source image")
    if len(jpeg) > MAX_SOURCE_BYTES:
        raise ValueError(f"source image of {len(jpeg)} B exceeds {MAX_SOURCE_BYTES} B")
    digest = hashlib.sha256(jpeg).digest()[:DIGEST_BYTES]
    parts = [jpeg[i:i + chunk_bytes] for i in range(0, len(jpeg), chunk_bytes)]
    return [SourceChunk(image_id, i, len(parts), len(jpeg), digest, p) for i, p in enumerate(parts)]


class SourceAssembler:
    """Reassembles source-image chunks; returns the image bytes once complete and verified.

    Only the newest image id is kept, so a stream of half-sent images cannot grow memory;
    ids only go up, so the newest completed one is all it needs to refuse a replay.
    """

    def __init__(self) -> None:
        self._id: int | None = None
        self._parts: dict[int, bytes] = {}
        self._size = 0  # bytes in _parts, kept as a sum: a peer may send thousands of tiny chunks
        self._meta: tuple[int, int, bytes] | None = None
        self.completed_id: int | None = None

    def add(self, chunk: SourceChunk) -> bytes | None:
        if chunk.image_id == self.completed_id:
            raise ProtocolError("duplicate", f"image {chunk.image_id} already complete")
        if self._id is not None and chunk.image_id < self._id:
            raise ProtocolError("stale", f"chunk of old image {chunk.image_id}")
        if chunk.image_id != self._id:
            self._id, self._parts, self._meta = chunk.image_id, {}, (chunk.total, chunk.total_bytes, chunk.digest)
            self._size = 0
        if (chunk.total, chunk.total_bytes, chunk.digest) != self._meta:
            raise ProtocolError("field", "chunk disagrees with earlier chunks of the same image")
        if chunk.index in self._parts:
            raise ProtocolError("duplicate", f"chunk {chunk.index} of image {chunk.image_id} twice")
        if self._size + len(chunk.data) > chunk.total_bytes:
            raise ProtocolError("length", "chunks exceed the announced image size")
        self._parts[chunk.index] = chunk.data
        self._size += len(chunk.data)
        if len(self._parts) < chunk.total:
            return None
        blob = b"".join(self._parts[i] for i in range(chunk.total))
        self._parts, self._size = {}, 0
        if len(blob) != chunk.total_bytes or hashlib.sha256(blob).digest()[:DIGEST_BYTES] != chunk.digest:
            raise ProtocolError("digest", "reassembled source image fails its checksum")
        self.completed_id = chunk.image_id
        return blob


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no segment length


def _jpeg_size(blob: bytes) -> tuple[int, int]:
    """(width, height) from the first SOF segment, the one libjpeg decodes with."""
    if blob.count(b"\xff\xda") > MAX_JPEG_SCANS:  # FF DA cannot occur inside entropy-coded data
        raise ProtocolError("source_image", f"JPEG with more than {MAX_JPEG_SCANS} scans")
    pos, n = 2, len(blob)
    while pos + 4 <= n:
        if blob[pos] != 0xFF:
            raise ProtocolError("source_image", "JPEG marker expected")
        marker = blob[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            break
        length = int.from_bytes(blob[pos + 2:pos + 4], "big")
        if length < 2:
            raise ProtocolError("source_image", "JPEG segment length < 2")
        if marker in _JPEG_SOF:
            if length < 8 or pos + 9 > n:
                raise ProtocolError("source_image", "truncated JPEG frame header")
            h = int.from_bytes(blob[pos + 5:pos + 7], "big")
            w = int.from_bytes(blob[pos + 7:pos + 9], "big")
            return w, h
        pos += 2 + length
    raise ProtocolError("source_image", "JPEG without a frame header")


def _webp_size(blob: bytes) -> tuple[int, int]:
    kind = blob[12:16]
    if kind == b"VP8 " and len(blob) >= 30 and blob[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(blob[26:28], "little") & 0x3FFF, int.from_bytes(blob[28:30], "little") & 0x3FFF
    if kind == b"VP8L" and len(blob) >= 25 and blob[20] == 0x2F:
        bits = int.from_bytes(blob[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(blob) >= 30:
        return int.from_bytes(blob[24:27], "little") + 1, int.from_bytes(blob[27:30], "little") + 1
    raise ProtocolError("source_image", "WebP without a frame header")


def source_image_size(blob: bytes, max_pixels: int = MAX_SOURCE_PIXELS) -> tuple[int, int]:
    """(width, height) of a JPEG, PNG or WebP source image, read from its header alone.

    Raises ProtocolError("source_image") for any other format, a header without dimensions,
    or more than ``max_pixels``: decoders allocate what the header claims before they notice
    the data is missing, so this check has to come before decoding, not after.
    """
    b = bytes(blob)
    if b.startswith(b"\xff\xd8\xff"):
        w, h = _jpeg_size(b)
    elif b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) >= 24 and b[12:16] == b"IHDR":
        w, h = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
    elif b.startswith(b"RIFF") and b[8:12] == b"WEBP":
        w, h = _webp_size(b)
    else:
        raise ProtocolError("source_image", "source image must be a JPEG, PNG or WebP")
    if w <= 0 or h <= 0:
        raise ProtocolError("source_image", f"source image header claims {w}x{h}")
    if w * h > max_pixels:
        raise ProtocolError("source_image", f"source image of {w}x{h} exceeds {max_pixels} pixels")
    return w, h


# --------------------------------------------------------------------------- receiving side helpers


class SequenceFilter:
    """Rejects duplicate keypoint frames and frames older than ``window`` behind the newest."""

    def __init__(self, window: int = 256) -> None:
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Forget every sequence number (the sender restarted its stream with a new Hello)."""
        self.newest: int | None = None
        self._seen: set[int] = set()

    def check(self, seq: int) -> None:
        if self.newest is not None and seq <= self.newest - self.window:
            raise ProtocolError("stale", f"seq {seq} is {self.newest - seq} behind")
        if seq in self._seen:
            raise ProtocolError("duplicate", f"seq {seq} seen before")
        self._seen.add(seq)
        if self.newest is None or seq > self.newest:
            self.newest = seq
            floor = seq - self.window
            if len(self._seen) > 2 * self.window:
                self._seen = {s for s in self._seen if s > floor}


@dataclass
class RejectCounter:
    """Counts rejected messages by reason and logs them without flooding the log."""

    counts: Counter = field(default_factory=Counter)
    log_interval_s: float = 2.0
    _last_log: float = 0.0

    def reject(self, err: ProtocolError) -> None:
        self.counts[err.reason] += 1
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_s:
            self._last_log = now
            log.warning("rejected message (%s); totals so far %s", err, dict(self.counts))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
