"""Which source image a keypoint frame belongs to, and when the receiver switches images.

The sender sends a new source image when it re-frames or refreshes, and from then on names it
in every keypoint message (``image_id``, see ``shared.protocol``). Keypoints of a new framing
are meaningless against the old picture, and the keypoint channel is unordered and unreliable
while the image travels on the reliable control channel and still has to be decoded and
encoded here. So the rule is: a tagged frame is rendered only against the image it names.

- Image ids grow with the capture sequence, so each image owns a run of sequence numbers
  starting at the smallest seq that named it: :meth:`SourceRouter.image_for` maps any seq the
  playout shows (received, predicted, concealed) to its image.
- A complete image whose frames are not due yet is kept ready (``add_ready``) and switched to
  when the first of its frames is rendered (``switch``), so old-image frames still in the
  jitter buffer are shown against the old image, not the new one.
- A frame of an image older than the one in use is dropped (counted: ``old_image``); one of an
  image that is not complete waits, the last picture held (counted by the session).

Untagged frames (``image_id`` absent: an older sender) belong to whatever image is held, and a
call that has never tagged switches images as soon as they are ready, as before.
"""

from __future__ import annotations

import logging
from typing import Any

from shared.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_IMAGES_AHEAD = 4  # images named but not yet in use: a peer cannot make this grow


class SourceRouter:
    """Bookkeeping of one call's source images (no pixels, no threads)."""

    def __init__(self, max_ahead: int = MAX_IMAGES_AHEAD) -> None:
        self.max_ahead = max_ahead
        self.held: int | None = None  # the image the renderer uses (None before the first)
        self.tagged = False  # the sender names images in its keypoint messages
        self._starts: dict[int, int] = {}  # image id (>= held) -> smallest seq that named it
        self._ready: dict[int, Any] = {}  # complete images not in use yet (Renderer.prepare results)
        self.counts = {"old_image": 0, "switches": 0}

    def restart(self) -> None:
        """The sender restarted its sequence numbers (a new Hello): forget which seqs belong where."""
        self._starts.clear()

    def admit(self, seq: int, image_id: int | None) -> bool:
        """A received frame naming ``image_id``: False when its image is already replaced (drop it).

        Raises ProtocolError when the naming contradicts itself (ids must grow with seq).
        """
        if image_id is None:
            return True
        self.tagged = True
        if self.held is not None and image_id < self.held:
            self.counts["old_image"] += 1
            return False
        for k, start in self._starts.items():
            if (k > image_id and start <= seq) or (k < image_id and seq <= start):
                raise ProtocolError("field", f"image_id {image_id} at seq {seq} contradicts image {k} from seq {start}")
        if image_id not in self._starts:
            if len(self._starts) >= self.max_ahead:
                raise ProtocolError("field", f"more than {self.max_ahead} source images named and not in use")
            self._starts[image_id] = seq
        elif seq < self._starts[image_id]:
            self._starts[image_id] = seq
        return True

    def image_for(self, seq: int) -> int | None:
        """The image frame ``seq`` is to be rendered against (the held one for untagged streams)."""
        best, best_start = self.held, None
        for k, start in self._starts.items():
            if start <= seq and (best_start is None or start > best_start):
                best, best_start = k, start
        return best

    def is_old(self, seq: int) -> bool:
        """Frame ``seq`` belongs to an image older than the one in use."""
        k = self.image_for(seq)
        return k is not None and self.held is not None and k < self.held

    def add_ready(self, image_id: int, prepared: Any) -> None:
        """A complete, encoded image; kept until its frames are due (at most the newest two)."""
        self._ready[image_id] = prepared
        for k in sorted(self._ready)[:-2]:
            del self._ready[k]

    def ready(self, image_id: int) -> Any | None:
        return self._ready.get(image_id)

    def switch(self, image_id: int) -> None:
        """The renderer now uses ``image_id``: older images and their seqs are forgotten."""
        if self.held is not None and image_id != self.held:
            self.counts["switches"] += 1
            log.info("source image %d in use (was %d)", image_id, self.held)
        self.held = image_id
        self._ready = {k: v for k, v in self._ready.items() if k > image_id}
        self._starts = {k: s for k, s in self._starts.items() if k >= image_id}
