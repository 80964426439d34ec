"""Frame records passed between the jitter buffer, the playout clock and the renderer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

FrameKind = Literal["real", "concealed", "interpolated", "predicted"]
KINDS: tuple[str, ...] = ("real", "concealed", "interpolated", "predicted")


@dataclass(frozen=True)
class KeypointFrame:
    """One received keypoint frame, as held by the jitter buffer."""

    seq: int
    capture_us: int  # sender capture clock
    vector: np.ndarray  # (60,) float32
    arrival_s: float  # local monotonic clock
    predicted: bool = False  # the sender skipped it: decoded by the closed-loop prediction, never sent


@dataclass(frozen=True)
class PlayoutFrame:
    """What the playout clock hands to the renderer on one tick.

    ``kind`` says where ``vector`` came from: ``real`` (received, possibly blended back
    from a concealment, see ``blend``), ``interpolated`` (between received neighbours,
    e.g. with decimation), ``concealed`` (forecast) or ``predicted`` (the predictive codec's
    own prediction for a frame not (yet) received: exactly what the sender assumed when it
    skipped the frame, see ``receiver.kpstream``). ``capture_us`` is the sender
    capture time of ``seq`` (estimated unless ``kind == "real"``), ``due_s`` the local time
    this seq was due for playout. ``repeated`` is True when the tick held the previous
    frame (playout slowed down to let the buffer grow). With render-ahead, ``seq`` is
    ``lookahead`` frames ahead of the jitter-buffer playout point and ``vector`` is a
    forecast unless that frame had already arrived.
    """

    seq: int
    vector: np.ndarray
    kind: FrameKind
    capture_us: int
    due_s: float
    rendered_s: float
    repeated: bool = False
    lookahead: int = 0
    blend: float = 0.0  # weight of the concealment correction still applied (0 = pure real)
    target_delay_ms: float = 0.0
    info: dict = field(default_factory=dict)
