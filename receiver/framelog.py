"""The frames log: every frame a call showed, with the time each receiver stage took (a bench aid).

Off by default (``SessionConfig.frames_log``). When on, the call keeps one :class:`FrameRecord`
per shown frame and writes them as one ``.npz`` of named columns when it ends, so keypoint error
against the sender's ``--truth-out`` (``bench.playout``) and the per-stage latency (``bench.latency``)
can be computed offline.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.kpvector import KP_DIM

KINDS = ("real", "concealed", "interpolated", "predicted")  # ``kind`` codes in the log
MAX_ARRIVALS = 4096  # remembered arrival times before the oldest are forgotten


@dataclass(frozen=True)
class FrameRecord:
    """One shown frame; times are wall clock in microseconds, 0 where a stage did not happen."""

    seq: int
    kind: int  # index into KINDS (0 for frames shown on arrival)
    vector: np.ndarray  # the keypoints shown, (60,) float32
    capture_us: int  # sender clock
    rendered_us: int  # when it was shown
    repeated: bool  # the last picture shown again, not rendered
    lookahead: int = 0  # frames the playout rendered ahead
    blend: float = 0.0  # correction blend weight of a forecast frame
    target_delay_ms: float = 0.0  # the jitter buffer's target delay at the time
    arrival_us: int = 0  # 0 for frames that never arrived (concealed, repeated)
    render_start_us: int = 0
    tick_ms: float = 0.0  # the playout decision (buffer + forecast)
    render_ms: float = 0.0
    sink_ms: float = 0.0
    reused: bool = False  # a new frame shown as the picture on screen (its keypoints'), not rendered


# (column, dtype) in the .npz, in FrameRecord's field order
_DTYPES = {"seq": np.int64, "kind": np.int8, "vector": np.float32, "capture_us": np.int64, "rendered_us": np.int64,
           "repeated": bool, "lookahead": np.int32, "blend": np.float32, "target_delay_ms": np.float32,
           "arrival_us": np.int64, "render_start_us": np.int64, "tick_ms": np.float32, "render_ms": np.float32,
           "sink_ms": np.float32, "reused": bool}


class FramesLog:
    """The shown frames of one call, and the arrival time of each frame received."""

    def __init__(self) -> None:
        self.records: list[FrameRecord] = []
        self._arrival_us: dict[int, int] = {}

    def arrived(self, seq: int) -> None:
        self._arrival_us[seq] = time.time_ns() // 1000

    def shown(self, seq: int, kind: str | None, vector: np.ndarray, capture_us: int, repeated: bool,
              **stages: float) -> None:
        """Append one shown frame (``kind`` None: shown on arrival, no playout); ``stages``: the
        optional :class:`FrameRecord` fields (lookahead, blend, target_delay_ms, times)."""
        arrival = self._arrival_us.get(seq, 0) if not repeated else 0
        if len(self._arrival_us) > MAX_ARRIVALS:  # bounded: forget arrivals far behind what is shown
            self._arrival_us = {s: t for s, t in self._arrival_us.items() if s > seq - 1024}
        self.records.append(FrameRecord(
            seq=seq, kind=KINDS.index(kind) if kind is not None else 0,
            vector=np.asarray(vector, np.float32).reshape(-1), capture_us=int(capture_us),
            rendered_us=time.time_ns() // 1000, repeated=repeated, arrival_us=arrival, **stages))

    def write(self, path: Path) -> None:
        cols = {}
        for f in dataclasses.fields(FrameRecord):
            values = [getattr(r, f.name) for r in self.records]
            cols[f.name] = np.asarray(values, _DTYPES[f.name])
        cols["vector"] = cols["vector"].reshape(-1, KP_DIM)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **cols, kinds=np.asarray(KINDS))
