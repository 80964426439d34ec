"""Test scaffolding shared by the test modules: the repository's paths, free local ports, waiting for a condition."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT: Path = Path(__file__).resolve().parents[1]  # the repository's root (the tests' cwd and PYTHONPATH)
DEMO_CLIP: Path = ROOT / "assets" / "demo_face.mp4"  # the bundled face clip
WEIGHTS: Path = ROOT / "models" / "weights"  # the shipped checkpoints (fomm_face64.pt, ...)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(cond: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> Any:
    """Call ``cond`` every ``interval_s`` until it is truthy or ``timeout_s`` has passed; its last value."""
    deadline = time.monotonic() + timeout_s
    v = None
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval_s)
    return v


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll ``cond`` until it returns something truthy (returned); fail the test with ``what`` on timeout."""
    v = poll(cond, timeout_s, interval_s)
    if not v:
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
    return v


async def until(cond: Callable[[], object], what: str, timeout_s: float = 20.0, interval_s: float = 0.02) -> None:
    """Async :func:`wait_for`: poll ``cond`` every ``interval_s`` on the running loop; fail with ``what`` on timeout."""

    async def spin() -> None:
        while not cond():
            await asyncio.sleep(interval_s)

    try:
        await asyncio.wait_for(spin(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
