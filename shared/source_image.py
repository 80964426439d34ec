"""The source image on the wire: split into ``SourceChunk`` messages, reassembled, sized safely.

A call starts with one source image (and the sender sends a new one when it re-frames or
refreshes). It travels as chunks that each fit a data-channel message; the receiver
reassembles them, checks the SHA-256 digest, and reads the image's dimensions from its
header (:func:`source_image_size`) before any decoder allocates what a hostile header claims.
"""

from __future__ import annotations

import hashlib

from shared.errors import ProtocolError
from shared.protocol import DIGEST_BYTES, MAX_SOURCE_BYTES, SourceChunk

# Decoded pixels of a source image: the largest receiver renders 256x256, so 2048x2048 is already
# generous; a header may claim up to 65535x65535 (12 GB of pixels) in a few hundred bytes.
MAX_SOURCE_PIXELS = 2048 * 2048
MAX_JPEG_SCANS = 64  # progressive JPEGs use ~10; each scan re-walks every coefficient (a CPU bomb)


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
