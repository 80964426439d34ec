"""Helpers for tests against a live receiver: long-running senders, polling its HTTP endpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.harness import ROOT
from tests.procs import env


def start_sender(port: int, weights: Path, clip: Path, *extra: str, log_path: Path | None = None) -> subprocess.Popen:
    """A sender that keeps the call alive (looping the clip) until the test stops it."""
    cmd = [sys.executable, "-m", "sender", "--receiver", f"http://127.0.0.1:{port}", "--video", str(clip),
           "--weights", str(weights), "--loop", "--max-frames", "100000", "--fps", "20", *extra]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=log)


def get(url: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    """(HTTP status, parsed JSON body or None)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, None


def post(url: str, body: bytes, headers: dict[str, str] | None = None, timeout_s: float = 10.0) -> int:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def active_calls(port: int, token: str | None = None) -> list[dict]:
    q = f"?token={token}" if token else ""
    status, body = get(f"http://127.0.0.1:{port}/stats{q}")
    assert status == 200, body
    return body["active"]


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
