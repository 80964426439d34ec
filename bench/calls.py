"""Running the real receiver and sender CLIs as subprocesses, for the benchmarks and the tests."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = "receiver ready"  # printed by `python -m receiver` once it listens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(threads: int | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_WAIT_POLICY"] = "PASSIVE"
    e["PYTHONPATH"] = str(ROOT)
    if threads is not None:
        e["OMP_NUM_THREADS"] = str(threads)
    return e


def wait_ready(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Read the receiver's stdout until it says it is ready (or exits, or the time runs out)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        line = proc.stdout.readline()
        if READY in line:
            return
        if not line and proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before it was ready")
    proc.kill()
    raise TimeoutError("receiver did not become ready")


def start_receiver(args: list[str], log_path: Path | None = None, netns: str | None = None,
                   timeout_s: float = 60.0) -> subprocess.Popen:
    """Start ``python -m receiver ARGS`` (optionally in a network namespace) and wait until it is ready."""
    cmd = [sys.executable, "-m", "receiver", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=log, text=True)
    wait_ready(proc, timeout_s)
    return proc


def stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> int:
    """Wait for a process to exit; terminate, then kill, if it doesn't in time. Returns its exit code."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
