"""Run the real sender and receiver CLIs as subprocesses (optionally inside a network namespace)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_WAIT_POLICY"] = "PASSIVE"
    e["PYTHONPATH"] = str(ROOT)
    return e


def start_receiver(args: list[str], netns: str | None = None, log_path: Path | None = None,
                   timeout_s: float = 60.0) -> subprocess.Popen:
    """Start ``python -m receiver ARGS`` and wait until it prints that it is ready."""
    cmd = [sys.executable, "-m", "receiver", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "receiver ready" in line:
            return proc
        if not line and proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before it was ready")
    proc.kill()
    raise TimeoutError("receiver did not become ready")


def run_sender(args: list[str], netns: str | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sender", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout_s)


def stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            return proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
