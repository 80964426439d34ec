"""Test helpers: a deterministic lossy/jittery fake link, a fake clock, synthetic motion,
stand-in forecasters and a discrete-event driver for the playout (no real sleeps)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pytest

FPS = 30.0


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> float:
        self.now += dt
        return self.now


@dataclass(order=True)
class Arrival:
    arrival_s: float
    seq: int
    capture_us: int = field(compare=False)
    vector: np.ndarray = field(compare=False, repr=False)


class FakeLink:
    """Deterministic network model: per-frame loss, base delay, uniform jitter, duplicates.

    ``send(seq, t, vector)`` with ``t`` the true (receiver-clock) send time; the frame's
    capture stamp uses a sender clock ``offset_s + t * (1 + drift)``. Explicit ``drop`` seqs
    and ``extra_delay_ms`` per seq model bursts and late frames. Arrivals come out in
    arrival order from :meth:`deliver`.
    """

    def __init__(self, loss: float = 0.0, delay_ms: float = 20.0, jitter_ms: float = 0.0,
                 seed: int = 0, duplicate: float = 0.0, drift: float = 0.0, offset_s: float = 5000.0,
                 drop: Iterable[int] = (), extra_delay_ms: dict[int, float] | None = None) -> None:
        self.loss, self.delay_s, self.jitter_s = loss, delay_ms / 1000.0, jitter_ms / 1000.0
        self.duplicate, self.drift, self.offset_s = duplicate, drift, offset_s
        self.drop = set(drop)
        self.extra = {k: v / 1000.0 for k, v in (extra_delay_ms or {}).items()}
        self.rng = np.random.default_rng(seed)
        self._heap: list[Arrival] = []
        self.sent = 0
        self.lost = 0

    def capture_us(self, t: float) -> int:
        return round((self.offset_s + t * (1.0 + self.drift)) * 1e6)

    def send(self, seq: int, t: float, vector: np.ndarray) -> None:
        self.sent += 1
        u_loss, u_jit, u_dup, u_jit2 = self.rng.random(4)  # always draw 4: loss doesn't shift the stream
        if seq in self.drop or u_loss < self.loss:
            self.lost += 1
            return
        cap = self.capture_us(t)
        a = t + self.delay_s + u_jit * self.jitter_s + self.extra.get(seq, 0.0)
        heapq.heappush(self._heap, Arrival(a, seq, cap, vector))
        if u_dup < self.duplicate:
            heapq.heappush(self._heap, Arrival(a + u_jit2 * 0.05, seq, cap, vector))

    def deliver(self, until_s: float) -> list[Arrival]:
        out = []
        while self._heap and self._heap[0].arrival_s <= until_s:
            out.append(heapq.heappop(self._heap))
        return out


def smooth_motion(n: int, fps: float = FPS, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    """(n, 60) float32 keypoints moving smoothly (sums of slow sinusoids), Jacobians near identity."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64)[:, None] / fps
    base = rng.uniform(-0.5, 0.5, size=(1, 20))
    freq = rng.uniform(0.2, 0.8, size=(1, 20))
    phase = rng.uniform(0, 2 * np.pi, size=(1, 20))
    coords = base + amp * np.sin(2 * np.pi * freq * t + phase)
    eye = np.tile(np.array([1.0, 0.0, 0.0, 1.0]), 10)[None, :]
    jac = eye + 0.05 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6, size=(1, 40)))
    return np.concatenate([coords, jac], axis=1).astype(np.float32)


class LastStandIn:
    """Same interface as models.forecast 'last'."""

    def forecast(self, history: np.ndarray, steps: int, samples: int = 1) -> np.ndarray:
        return np.broadcast_to(history[-1], (samples, steps, history.shape[1])).astype(np.float32).copy()


class LinearStandIn:
    """Same interface as models.forecast 'linear': constant velocity from the last two frames."""

    def __init__(self) -> None:
        self.calls = 0

    def forecast(self, history: np.ndarray, steps: int, samples: int = 1) -> np.ndarray:
        self.calls += 1
        h = np.asarray(history, dtype=np.float32)
        vel = h[-1] - h[-2] if len(h) >= 2 else np.zeros_like(h[-1])
        k = np.arange(1, steps + 1, dtype=np.float32)[:, None]
        out = h[-1][None, :] + k * vel[None, :]
        return np.broadcast_to(out, (samples, steps, h.shape[1])).copy()


def forecaster(name: str):
    """The real forecaster if models.forecast provides it, else the local stand-in."""
    try:
        from models.forecast import load_forecaster

        return load_forecaster(name)
    except ImportError:
        return {"last": LastStandIn, "linear": LinearStandIn}[name]()


@dataclass
class SimResult:
    frames: list  # PlayoutFrame per tick (None before the first frame)
    ticks: list[float]
    pushed: int
    rejected: int


def simulate(playout, motion: np.ndarray, link: FakeLink, fps: float = FPS, kp_every: int = 1,
             tick_fps: float | None = None, tick_jitter_ms: float = 0.0, tick_phase: float = 0.37,
             set_truth: bool = True, seed: int = 1, t0: float = 100.0) -> SimResult:
    """Send ``motion`` over ``link`` at ``fps`` and tick ``playout`` at ``tick_fps``; no sleeping.

    Frame i is captured at t0 + i/fps (true time); only seqs that are multiples of ``kp_every``
    are sent. Ticks run until all frames have had time to arrive. Truth is supplied for
    every seq (as the bench would) when ``set_truth``.
    """
    rng = np.random.default_rng(seed)
    tick_fps = tick_fps or fps
    n = len(motion)
    for i in range(n):
        if i % kp_every == 0:
            link.send(i, t0 + i / fps, motion[i])
    end = t0 + n / fps + 0.5
    frames, ticks = [], []
    pushed = rejected = 0
    k = 0
    truth_next = 0
    while True:
        t = t0 + (k + tick_phase) / tick_fps + rng.uniform(0, tick_jitter_ms / 1000.0)
        if t > end:
            break
        while set_truth and truth_next < n and t0 + truth_next / fps <= t:  # the bench knows the truth
            playout.set_truth(truth_next, motion[truth_next])
            truth_next += 1
        for a in link.deliver(t):
            pushed += 1
            rejected += not playout.push(a.seq, a.capture_us, a.vector, a.arrival_s)
        frames.append(playout.tick(t))
        ticks.append(t)
        k += 1
    return SimResult(frames, ticks, pushed, rejected)


def _netns_unavailable() -> str:
    from bench.netns import NetnsUnavailable, require_root

    try:
        require_root()
    except NetnsUnavailable as e:
        return str(e)
    return ""


_NETNS_MISSING = _netns_unavailable()
# Tests that build network namespaces: skipped (with the reason) only where root, ip or nft are missing.
needs_netns = pytest.mark.skipif(bool(_NETNS_MISSING), reason=f"needs root with ip and nft: {_NETNS_MISSING}")


def tiny_motion_model(size: int, seed: int = 0):  # returns a models.fomm.MotionModel (torch imported late)
    """A tiny untrained motion model whose refiner changes the picture (an untrained refiner adds
    nothing, so a render path that dropped it would pass unnoticed)."""
    import torch

    from models.fomm import FommConfig, MotionModel

    torch.manual_seed(seed)
    m = MotionModel(FommConfig.tiny(size)).eval()
    if m.refiner is not None:
        with torch.no_grad():
            for p in m.refiner.net[-1].parameters():
                p.normal_(0, 0.1)
    return m
