"""Run the real sender and receiver CLIs as subprocesses (optionally inside a network namespace)."""

from __future__ import annotations

import subprocess
import sys

from bench.calls import ROOT, env, start_receiver, stop

__all__ = ["ROOT", "env", "start_receiver", "stop", "run_sender"]


def run_sender(args: list[str], netns: str | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sender", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout_s)
