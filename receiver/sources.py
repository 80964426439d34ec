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
- A named image that will not come is given up (counted: ``given_up``), and its frames are then
  dropped like those of a replaced image (:data:`GIVEN_UP`): images complete in id order (one
  reliable, ordered channel; the session decodes only the newest of those that completed while
  another was decoding), so once image ``k`` is ready no older named one that is not will ever
  be; and when ``max_ahead`` images are named and not in use, those named more than
  ``PENDING_TTL_S`` ago without arriving make room for a new one. Without this, frames naming
  images that never came filled the table for good, and the frames of the image that did come
  were refused.

Untagged frames (``image_id`` absent: an older sender) belong to whatever image is held, and a
call that has never tagged switches images as soon as they are ready, as before.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from shared.errors import ProtocolError

log = logging.getLogger(__name__)

MAX_IMAGES_AHEAD = 4  # images named but not yet in use: a peer cannot make this grow
# With the table full, a named image that has not arrived this long makes room for a new one. A source
# image is tens of KB: seconds late is lost (a sender names a new image only after sending the last one).
PENDING_TTL_S = 5.0
GIVEN_UP = -1  # image_for's answer for a frame of a given-up image: older than any, so dropped as old


class SourceRouter:
    """Bookkeeping of one call's source images (no pixels, no threads)."""

    def __init__(self, max_ahead: int = MAX_IMAGES_AHEAD, pending_ttl_s: float = PENDING_TTL_S) -> None:
        self.max_ahead = max_ahead
        self.pending_ttl_s = pending_ttl_s
        self.held: int | None = None  # the image the renderer uses (None before the first)
        self.tagged = False  # the sender names images in its keypoint messages
        self._starts: dict[int, int] = {}  # image id (>= held) -> smallest seq that named it
        self._named_at: dict[int, float] = {}  # image id in _starts -> when it was first named (monotonic)
        # given-up image id -> its start: its seqs stay its own (GIVEN_UP), or they would be drawn on the
        # image before it; at most max_ahead of them
        self._given_up: dict[int, int] = {}
        self._ready: dict[int, Any] = {}  # complete images not in use yet (Renderer.prepare results)
        self.counts = {"old_image": 0, "switches": 0, "given_up": 0}

    def restart(self) -> None:
        """The sender restarted its sequence numbers (a new Hello): forget which seqs belong where."""
        self._starts.clear()
        self._named_at.clear()
        self._given_up.clear()

    def admit(self, seq: int, image_id: int | None, now: float | None = None) -> bool:
        """A received frame naming ``image_id``: False when its image is already replaced or given up
        (drop it). ``now``: monotonic seconds (default: the clock's).

        Raises ProtocolError when the naming contradicts itself (ids must grow with seq), or names a
        new image while ``max_ahead`` are named, not in use, and none of them is overdue.
        """
        if image_id is None:
            return True
        self.tagged = True
        if (self.held is not None and image_id < self.held) or image_id in self._given_up:
            self.counts["old_image"] += 1
            return False
        for k, start in (*self._starts.items(), *self._given_up.items()):
            if (k > image_id and start <= seq) or (k < image_id and seq <= start):
                raise ProtocolError("field", f"image_id {image_id} at seq {seq} contradicts image {k} from seq {start}")
        if image_id not in self._starts:
            if len(self._starts) >= self.max_ahead:
                now = time.monotonic() if now is None else now
                for k in [k for k, t in self._named_at.items() if now - t > self.pending_ttl_s]:
                    self._give_up(k, f"named {now - self._named_at[k]:.1f} s ago and not here")
            if len(self._starts) >= self.max_ahead:
                raise ProtocolError("field", f"more than {self.max_ahead} source images named and not in use")
            self._starts[image_id] = seq
            self._named_at[image_id] = time.monotonic() if now is None else now
        elif seq < self._starts[image_id]:
            self._starts[image_id] = seq
        return True

    def _give_up(self, image_id: int, why: str) -> None:
        """Image ``image_id`` will not be shown: its frames are dropped from now on (not the held one, nor
        one that is ready)."""
        if image_id == self.held or image_id in self._ready or image_id not in self._starts:
            return
        self._given_up[image_id] = self._starts.pop(image_id)
        del self._named_at[image_id]
        for k in sorted(self._given_up)[:-self.max_ahead]:  # the oldest: long past the playout
            del self._given_up[k]
        self.counts["given_up"] += 1
        log.info("source image %d given up (%s): its frames are dropped", image_id, why)

    def image_for(self, seq: int) -> int | None:
        """The image frame ``seq`` is to be rendered against (the held one for untagged streams);
        :data:`GIVEN_UP` when it is a given-up image's."""
        best, best_start = self.held, None
        for k, start in (*self._starts.items(), *self._given_up.items()):
            if start <= seq and (best_start is None or start > best_start):
                best, best_start = k, start
        return GIVEN_UP if best in self._given_up else best

    def is_old(self, seq: int) -> bool:
        """Frame ``seq`` belongs to an image older than the one in use, or to one given up."""
        k = self.image_for(seq)
        return k is not None and self.held is not None and k < self.held

    def add_ready(self, image_id: int, prepared: Any) -> None:
        """A complete, encoded image; kept until its frames are due (at most the newest two). Older named
        images that are not ready never will be (images complete in id order): given up."""
        self._ready[image_id] = prepared
        for k in sorted(self._ready)[:-2]:
            del self._ready[k]
        for k in [k for k in self._starts if k < image_id]:
            self._give_up(k, f"image {image_id} came first")

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
        self._named_at = {k: t for k, t in self._named_at.items() if k in self._starts}
        self._given_up = {k: s for k, s in self._given_up.items() if k > image_id}
