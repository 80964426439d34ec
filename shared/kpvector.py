"""The 60-value keypoint vector: its layout, its quantisers and the residual bitstream.

Layout (10 keypoints x (x, y), then 10 Jacobians x 4)::

    [x0, y0, ..., x9, y9, J0_00, J0_01, J0_10, J0_11, ..., J9_11]

Everything here is pure numpy and shared by the message layer (``shared.protocol``, which
carries vectors in ``KeypointBatch`` payloads and validates ``CodedKeypoints``) and the
closed-loop predictive codec (``shared.kpcodec``, which codes the Jacobians on the Q8 scale
and residuals as Exp-Golomb codes). Neither of those is imported here.

- :class:`Codec` and the per-vector codecs (``encode_vector`` / ``decode_vectors``: F16, Q8);
- ``jac_to_q8`` / ``q8_to_jac``: the logarithmic int8 scale of Jacobian entries;
- ``encode_residual`` / ``decode_residual``: 60 integer residuals as zig-zag Exp-Golomb codes;
- ``TRANSPORT_OVERHEAD_B``: what a data-channel message costs on the wire beyond its bytes.
"""

from __future__ import annotations

import enum

import numpy as np

from shared.errors import ProtocolError

NUM_KP = 10
KP_DIM = 6 * NUM_KP  # values in a keypoint vector
NC = 2 * NUM_KP  # coordinate values at the front of a vector; 4 * NUM_KP Jacobian entries follow
COORD_LIMIT = 1.0 + 1e-3  # keypoints are soft-argmax means of a grid in [-1, 1]
JACOBIAN_LIMIT = 16.0  # local affines larger than this are not a face moving
MAX_RESIDUAL_BYTES = 4 * KP_DIM  # a residual of a keypoint vector is never longer
# IPv4 20 + UDP 8 + DTLS record ~29 + SCTP common header 12 + DATA chunk 16, padded: measured ~95 B
# per data-channel message with aiortc 1.16. Every wire-rate figure (stats, rate control, benches)
# adds this per message.
TRANSPORT_OVERHEAD_B = 95
_MAX_EG = 24  # an Exp-Golomb prefix longer than this is not a residual of a keypoint


# --------------------------------------------------------------------------- per-vector codecs


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

JAC_RANGE = 16.0
_JAC_KNEE = 0.5  # the log scale is ~linear below this magnitude
_JAC_NORM = float(np.log1p(JAC_RANGE / _JAC_KNEE))


def jac_to_q8(j: np.ndarray) -> np.ndarray:
    j = np.clip(j, -JAC_RANGE, JAC_RANGE)
    return np.round(127 * np.sign(j) * np.log1p(np.abs(j) / _JAC_KNEE) / _JAC_NORM).astype("i1")


def q8_to_jac(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.float32)
    j = (np.sign(q) * _JAC_KNEE * np.expm1(np.abs(q) / 127 * _JAC_NORM)).astype(np.float32)
    # float32 rounding puts +-127 at 16.000002, past JACOBIAN_LIMIT: the decoder would refuse a
    # sender's own keyframe whenever a Jacobian entry reached 15.78. The scale ends at JAC_RANGE.
    return np.clip(j, -JAC_RANGE, JAC_RANGE)


def frame_bytes(codec: Codec) -> int:
    """Bytes of one vector in a KeypointBatch payload (F16 and Q8 only)."""
    sizes = {Codec.F16: 2 * KP_DIM, Codec.Q8: 2 * NC + (KP_DIM - NC)}
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
    coords = np.clip(v[:NC], -1.0, 1.0)
    jac = v[NC:]
    if codec == Codec.F16:
        return np.concatenate([coords, np.clip(jac, -JACOBIAN_LIMIT, JACOBIAN_LIMIT)]).astype("<f2").tobytes()
    if codec == Codec.Q8:
        q_c = np.round((coords + 1.0) / 2.0 * 65535).astype("<u2")
        return q_c.tobytes() + jac_to_q8(jac).tobytes()
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
        coords = raw[:, : 2 * NC].copy().view("<u2").astype(np.float32) / 65535 * 2.0 - 1.0
        jac = q8_to_jac(raw[:, 2 * NC:].copy().view("i1"))
        out = np.concatenate([coords, jac], axis=1)
    if not np.isfinite(out).all():
        raise ProtocolError("nonfinite", "keypoints contain NaN or inf")
    if np.abs(out[:, :NC]).max() > COORD_LIMIT:
        raise ProtocolError("range", "keypoint coordinate outside [-1, 1]")
    if np.abs(out[:, NC:]).max() > JACOBIAN_LIMIT:
        raise ProtocolError("range", "Jacobian entry out of range")
    return out


# --------------------------------------------------------------------------- entropy coding


class _BitWriter:
    def __init__(self) -> None:
        self.acc = 0
        self.n = 0

    def put(self, value: int, bits: int) -> None:
        self.acc = (self.acc << bits) | value
        self.n += bits

    def exp_golomb(self, v: int, k: int) -> None:
        """Order-k Exp-Golomb code of v >= 0."""
        x = v + (1 << k)
        length = x.bit_length()
        self.put(0, length - 1 - k)
        self.put(x, length)

    def bytes(self) -> bytes:
        pad = (-self.n) % 8
        return ((self.acc << pad) if self.n else 0).to_bytes((self.n + pad) // 8, "big")


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self.val = int.from_bytes(data, "big")
        self.total = 8 * len(data)
        self.pos = 0

    def get(self, bits: int) -> int:
        if self.pos + bits > self.total:
            raise ValueError("residual bitstream ends early")
        self.pos += bits
        return (self.val >> (self.total - self.pos)) & ((1 << bits) - 1)

    def exp_golomb(self, k: int) -> int:
        zeros = 0
        while self.get(1) == 0:
            zeros += 1
            if zeros > _MAX_EG:
                raise ValueError("residual code too long")
        rest = self.get(zeros + k)
        return ((1 << (zeros + k)) | rest) - (1 << k)


def _zigzag(r: np.ndarray) -> list[int]:
    return [int(2 * x) if x >= 0 else int(-2 * x - 1) for x in r]


def _unzigzag(u: int) -> int:
    return u >> 1 if u % 2 == 0 else -((u + 1) >> 1)


def _eg_bits(u: int, k: int) -> int:
    return 2 * (u + (1 << k)).bit_length() - 1 - k


# two groups with their own statistics: the 20 coordinates and the 40 Jacobian entries
_GROUPS = ((0, NC), (NC, KP_DIM))


def encode_residual(r: np.ndarray) -> bytes:
    """60 int residuals -> bytes: per group a 3-bit Exp-Golomb order, then the codes."""
    w = _BitWriter()
    for a, b in _GROUPS:
        u = _zigzag(r[a:b])
        k = min(range(8), key=lambda k: sum(_eg_bits(x, k) for x in u))
        w.put(k, 3)
        for x in u:
            w.exp_golomb(x, k)
    return w.bytes()


def decode_residual(data: bytes) -> np.ndarray:
    """Inverse of ``encode_residual``; raises ValueError on a bitstream that is not one."""
    if not data or len(data) > MAX_RESIDUAL_BYTES:
        raise ValueError("residual payload size")
    rd = _BitReader(data)
    out = []
    for a, b in _GROUPS:
        k = rd.get(3)
        out += [_unzigzag(rd.exp_golomb(k)) for _ in range(b - a)]
    if rd.total - rd.pos >= 8:
        raise ValueError("trailing bytes after the residual")
    return np.array(out, np.int32)
