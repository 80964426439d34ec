"""What goes on the wire: keypoint streams simulated message by message, and their cost in transport bytes.

The benches that count keypoint-stream bytes share these (``bench.bandwidth``, ``bench.expression``,
``bench.closed_loop``, ``bench.call_picture``, ``bench.browser``, ``bench.playout``):

- ``stream_messages`` / ``receive``: the vector streams (codec F16/Q8, every k-th frame, B frames
  per ``KeypointBatch`` message), encoded exactly as ``shared.protocol`` sends them, and what a
  receiver reconstructs from them (linear interpolation; frames after the last sent one hold it);
- ``pred_stream_messages`` / ``receive_pred``: the closed-loop predictive stream (``shared.kpcodec``)
  through the sender's own ``PredictiveSender`` and the receiver's own ``PredictiveStream``, lossless;
- ``jpeg_source`` / ``one_off_messages``: the once-per-call Hello and JPEG source image
  (``SourceChunk`` messages);
- ``wire_kbps``: message bytes plus ``shared.kpvector.TRANSPORT_OVERHEAD_B`` (95 B per data-channel
  message: DTLS + SCTP + UDP + IPv4, measured for aiortc 1.16); ``SACK_BYTES_ON_WIRE``: the SCTP
  acknowledgement flowing back per message.

Clips are played at ``FPS`` (30) whatever their recorded rate; timestamps use a sender clock past
2^32 us (``TS_BASE_US``), so ts fields take their full 9 B in msgpack.
"""

from __future__ import annotations

import cv2
import numpy as np

from receiver.kpstream import PredictiveStream
from sender.kpsend import PredictiveSender
from shared import protocol, source_image
from shared.kpcodec import PredictiveConfig
from shared.kpvector import TRANSPORT_OVERHEAD_B, Codec
from shared.protocol import Hello, KeypointBatch

FPS = 30.0
JPEG_QUALITY = 90
TS_BASE_US = 5_000_000_000_000  # a sender clock that has passed 2^32 us, so ts fields take 9 B
SACK_BYTES_ON_WIRE = 92  # one SCTP SACK back per received message (aiortc), measured in the demo


def stream_messages(vectors: np.ndarray, codec: Codec, k: int, batch: int, fps: float = FPS,
                    ts_base_us: int = TS_BASE_US) -> list[bytes]:
    """Encoded KeypointBatch messages for a clip's keypoints (T,60): every k-th frame, B a message."""
    sent = list(range(0, len(vectors), k))
    out = []
    for i in range(0, len(sent), batch):
        group = sent[i:i + batch]
        msg = KeypointBatch.build(seq0=group[0], ts0_us=ts_base_us + round(group[0] * 1e6 / fps),
                                  vectors=[vectors[j] for j in group], codec=codec, step=k,
                                  interval_us=round(k * 1e6 / fps))
        out.append(protocol.encode(msg))
    return out


def receive(messages: list[bytes], n_frames: int) -> np.ndarray:
    """What the receiver reconstructs: decode every message, interpolate to all frames (T,60)."""
    seqs, vecs = [], []
    for data in messages:
        msg = protocol.decode(data)
        assert isinstance(msg, KeypointBatch)
        for seq, _ts, v in msg.frames():
            seqs.append(seq)
            vecs.append(v)
    seqs_a, vecs_a = np.asarray(seqs, dtype=np.float64), np.stack(vecs)
    t = np.arange(n_frames, dtype=np.float64)
    # np.interp holds the end values, i.e. frames after the last sent one repeat it
    return np.stack([np.interp(t, seqs_a, vecs_a[:, d]) for d in range(vecs_a.shape[1])], axis=1).astype(np.float32)


def pred_stream_messages(vectors: np.ndarray, cfg: PredictiveConfig, fps: float = FPS,
                         bundle: bool = False) -> tuple[list[bytes], dict]:
    """Encoded CodedKeypoints messages of a clip's keypoints (T,60), exactly as the sender's
    PredictiveSender sends them (times after the Hello's base, the last frame always sent).

    ``bundle``: two consecutive coded frames per message (``sender --bundle``); the frames then name
    their source image (``image_id`` 0), as the sender's always do, since a bundled frame travels as
    the message's RedundantFrame."""
    out: list[bytes] = []

    def send(msg: protocol.CodedKeypoints) -> int:
        out.append(protocol.encode(msg))
        return len(out[-1])

    ps = PredictiveSender(send, cfg, ts_base_us=0, bundle=bundle)
    if bundle:
        ps.new_source(0)
    for i, v in enumerate(vectors):
        ps.frame(i, round(i * 1e6 / fps), v, i / fps)
    if len(vectors):
        ps.finish(len(vectors) - 1, round((len(vectors) - 1) * 1e6 / fps), vectors[-1], len(vectors) / fps)
    return out, ps.summary()


def receive_pred(messages: list[bytes], n_frames: int, cfg: PredictiveConfig, fps: float = FPS) -> np.ndarray:
    """What a lossless call shows: every frame decoded by the receiver's PredictiveStream (T,60).

    A skipped frame is shown, at its own time, as the prediction the playout makes before the
    next message arrives; ``PredictiveStream`` decodes it to the same integers (tests/test_playout).
    """
    stream = PredictiveStream(cfg, fps)
    got: dict[int, np.ndarray] = {}
    for data in messages:
        msg = protocol.decode(data)
        assert isinstance(msg, protocol.CodedKeypoints)
        for f in stream.push(msg):
            got[f.seq] = f.vector
    if sorted(got) != list(range(n_frames)):
        raise RuntimeError(f"the predictive stream decoded {len(got)} of {n_frames} frames")
    return np.stack([got[i] for i in range(n_frames)]).astype(np.float32)


def jpeg_source(frame: np.ndarray, quality: int = JPEG_QUALITY) -> tuple[bytes, np.ndarray]:
    """JPEG bytes of an RGB uint8 frame, and the decoded image the receiver will use."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    jpeg = buf.tobytes()
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    return jpeg, np.ascontiguousarray(decoded)


def one_off_messages(jpeg: bytes, size: int, codec: Codec, k: int,
                     pred: PredictiveConfig | None = None) -> list[bytes]:
    """Hello + the source image's SourceChunk messages, sent once per call."""
    hello = Hello(model="kp-" + "0" * 12, size=size, fps=FPS, codec=int(codec), kp_every=k,  # a detector id's length
                  ts_base_us=TS_BASE_US, pred=pred.params() if pred is not None else None)
    return [protocol.encode(hello)] + [protocol.encode(c) for c in source_image.split_source(jpeg, image_id=1)]


def wire_kbps(msg_bytes: int, msgs: int, seconds: float) -> float:
    """kbps on the wire of ``msgs`` messages of ``msg_bytes`` bytes in all, each plus its transport overhead."""
    return (msg_bytes + TRANSPORT_OVERHEAD_B * msgs) * 8 / seconds / 1000
