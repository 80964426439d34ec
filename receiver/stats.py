"""Per-call statistics, dumped as JSON when the call ends."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.kpvector import TRANSPORT_OVERHEAD_B


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) if xs else None


@dataclass
class CallStats:
    call_id: str
    started: float = field(default_factory=time.time)
    ended: float | None = None
    messages_received: int = 0
    bytes_received: int = 0  # application bytes of every message, all channels
    keypoint_messages: int = 0
    keypoint_message_bytes: int = 0
    keypoint_payload_bytes: int = 0
    frames_received: int = 0  # keypoint frames accepted
    # new frames shown: each rendered, or (``frames_reused`` of them, clock playout) shown as the picture already
    # on screen because its keypoints are exactly those of that picture (a render would draw it again)
    frames_rendered: int = 0
    frames_reused: int = 0
    frames_real: int = 0  # clock playout: rendered from received keypoints
    frames_concealed: int = 0
    frames_interpolated: int = 0
    frames_repeated: int = 0  # a held frame shown again while the jitter buffer refills
    frames_dropped: int = 0  # accepted but never rendered (renderer behind, or superseded)
    # predictive calls (Codec.PRED): frames the sender skipped (decoded by prediction), frames shown
    # from the prediction (clock: kind "predicted"; immediate: skipped frames shown), keyframes
    frames_skipped: int = 0
    frames_predicted: int = 0
    keyframes_received: int = 0
    keyframe_requests: int = 0
    source_image_bytes: int = 0
    source_images: int = 0
    # source images in use after the first (receiver.sources): frames of a replaced image dropped,
    # and frames held back (the last picture shown again) because their image was not complete yet
    source_switches: int = 0
    frames_old_image: int = 0
    frames_source_wait: int = 0
    source_sha256: str = ""
    rejected: Counter = field(default_factory=Counter)
    latency_ms: list[float] = field(default_factory=list)  # capture (sender clock) -> rendered
    render_ms: list[float] = field(default_factory=list)
    render_times: list[float] = field(default_factory=list)  # monotonic time of each new frame shown (or reused)
    render_batch: list[int] = field(default_factory=list)  # frames rendered in the same run as each (receiver.batching)
    udp: dict[str, int] = field(default_factory=dict)
    hello: dict[str, Any] = field(default_factory=dict)
    end_reason: str = ""
    playout: dict[str, Any] = field(default_factory=dict)
    codec: dict[str, Any] = field(default_factory=dict)  # the predictive decoder's counts
    # render tier adaptation (receiver.adapt): the size rendered at now, and every change made
    render_size: int | None = None
    tier_changes: list[dict[str, Any]] = field(default_factory=list)
    # the region stage (--refine-regions, receiver.regions): frames redrawn / passed unchanged, None when off
    # (counted on the worker: a render still running when the call ended is counted here, not as rendered)
    regions: Any = None  # receiver.regions.RegionCounts, counted on the render workers

    def to_dict(self) -> dict[str, Any]:
        end = self.ended or time.time()
        duration = max(1e-6, end - self.started)
        times = np.asarray(self.render_times)
        gaps = np.diff(times) if len(times) > 1 else np.zeros(0)
        active = float(times[-1] - times[0]) if len(times) > 1 else 0.0
        wire_bytes = self.keypoint_message_bytes + TRANSPORT_OVERHEAD_B * self.keypoint_messages
        mean_render = float(np.mean(self.render_ms)) if self.render_ms else None
        return {
            "call_id": self.call_id,
            "duration_s": duration,
            "hello": self.hello,
            "messages_received": self.messages_received,
            "bytes_received": self.bytes_received,
            "keypoint_messages": self.keypoint_messages,
            "keypoint_payload_bytes": self.keypoint_payload_bytes,
            "keypoint_message_bytes": self.keypoint_message_bytes,
            "frames_received": self.frames_received,
            "frames_rendered": self.frames_rendered,
            "frames_reused": self.frames_reused,
            "frames_real": self.frames_real,
            "frames_concealed": self.frames_concealed,
            "frames_interpolated": self.frames_interpolated,
            "frames_repeated": self.frames_repeated,
            "frames_dropped": self.frames_dropped,
            "frames_skipped": self.frames_skipped,
            "frames_predicted": self.frames_predicted,
            "keyframes_received": self.keyframes_received,
            "keyframe_requests": self.keyframe_requests,
            # what the viewer shows of the stream's cost: messages (each paying the transport overhead)
            # and the bytes of each frame that was actually sent
            "keypoint_messages_per_s": self.keypoint_messages / duration,
            "bytes_per_sent_frame": (self.keypoint_message_bytes / (self.frames_received - self.frames_skipped)
                                     if self.frames_received > self.frames_skipped else None),
            "frames_rejected": int(sum(self.rejected.values())),
            "rejected_by_reason": dict(self.rejected),
            "source_image_bytes": self.source_image_bytes,
            "source_images": self.source_images,
            "source_switches": self.source_switches,
            "frames_old_image": self.frames_old_image,
            "frames_source_wait": self.frames_source_wait,
            "source_sha256": self.source_sha256,
            "latency_ms_p50": percentile(self.latency_ms, 50),
            "latency_ms_p95": percentile(self.latency_ms, 95),
            "render_ms_p50": percentile(self.render_ms, 50),
            "render_ms_p95": percentile(self.render_ms, 95),
            # throughput of the renderer itself (1 / mean render time) and the rate frames reached the sink
            "render_fps": 1000.0 / mean_render if mean_render else None,
            # other calls' frames rendered in the same run as this call's, on average (1: alone)
            "render_batch_mean": float(np.mean(self.render_batch)) if self.render_batch else None,
            "rendered_fps": (len(times) - 1) / active if active > 0 else None,
            "stalls": int((gaps > 0.1).sum()),
            "max_gap_ms": float(gaps.max() * 1000) if len(gaps) else None,
            # keypoint messages as sent on the wire: message bytes + fixed transport overhead per message
            "keypoint_wire_kbps": wire_bytes * 8 / 1000 / duration,
            "wire_overhead_bytes_per_message": TRANSPORT_OVERHEAD_B,
            "udp": self.udp,
            "end_reason": self.end_reason,
            "playout": self.playout,
            "codec": self.codec,
            "render_size": self.render_size,
            "tier_changes": list(self.tier_changes),
            "regions": self.regions.to_dict() if self.regions is not None else None,
        }
