"""The kpcast wire protocol: versioned msgpack messages on WebRTC data channels.

Every message is a msgpack array ``[version, type, *fields]``. The decoder is the
one place that trusts nothing a peer sends: every failure raises
:class:`ProtocolError` with a short machine-readable ``reason`` that the receiver
counts, and nothing else escapes it.

Messages
--------
- ``Hello``: protocol version, model id, frame size, fps (``MIN_FPS``..``MAX_FPS``), keypoint codec, decimation.
- ``SourceChunk``: one piece of the JPEG source image (split under the peer's max
  message size, reassembled and checked by SHA-256 in ``shared.source_image``, which also
  reads the image's dimensions from its header, so a picture too large to decode safely is
  refused before any decoder allocates its pixels).
- ``KeypointBatch``: one or more keypoint frames (``seq0 + i*step``), each a
  60-value vector quantised by a ``Codec`` (``--codec q8|f16`` streams; ``shared.kpvector``).
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

The keypoint vector's layout and codecs live in ``shared.kpvector``; ``ProtocolError`` (what every
refusal raises) in ``shared.errors``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass

import msgpack
import numpy as np

from shared.errors import ProtocolError
from shared.kpvector import (
    MAX_RESIDUAL_BYTES,
    NUM_KP,
    Codec,
    decode_residual,
    decode_vectors,
    encode_vector,
    frame_bytes,
)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
LEGACY_VERSIONS = (1,)  # versions whose Bye layout [version, 6, reason] we can still write
MAX_MESSAGE_BYTES = 64 * 1024  # peers without a max-message-size SDP line allow 64 KiB
MAX_FRAMES_PER_BATCH = 64
MAX_SOURCE_BYTES = 2 * 1024 * 1024  # an encoded source image larger than this is refused
DIGEST_BYTES = 16  # SourceChunk.digest: the first bytes of the image's SHA-256
# The frame rate a Hello may announce. The receiver ticks its playout clock and sizes its render
# budget at this rate: 240 fps had one call rendered at ~42 fps while a normal call beside it stalled,
# and 0.001 fps held a slot while showing nothing. Senders thin faster inputs (sender.pacing).
MIN_FPS = 1.0
MAX_FPS = 60.0


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


# --------------------------------------------------------------------------- messages

PREDICTORS = ("last", "linear")  # closed-loop predictors (shared.kpcodec.predict)
MAX_PRED_GAP = 64  # largest max_gap a Hello may announce (frames skipped in a row)


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
        fps = _float(f[2], MIN_FPS, MAX_FPS, "fps")  # (a bool is not a rate, as in JavaScript)
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
        return Hello(model, size, fps, codec, kp_every, num_kp, ts_base, pred)
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
