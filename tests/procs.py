"""Run the real sender and receiver CLIs: as subprocesses (optionally in a network namespace), or in this process."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from collections.abc import Callable

from bench.calls import env, start_receiver, stop
from tests.harness import ROOT

__all__ = ["env", "start_receiver", "stop", "run_sender", "sender_main", "receiver_main", "kpcast_main"]


def run_sender(args: list[str], netns: str | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sender", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout_s)


def sender_main(args: list[str]) -> tuple[int, str]:
    """``python -m sender ARGS`` in this process: (its exit status, what it wrote to stderr).

    For the refusals that come before any network (a bad input, checkpoint or keypoints file): the
    same ``main`` a sender process runs, without the seconds a new process spends importing torch
    and aiortc. The sender's global settings (torch threads, ICE addresses) are put back after.
    """
    from sender.__main__ import main

    return _in_process(main, args)


def receiver_main(args: list[str]) -> tuple[int, str]:
    """``python -m receiver ARGS`` in this process, like :func:`sender_main`: for the refusals that
    come before it listens (a bad sink, forecaster or checkpoint)."""
    from receiver.__main__ import main

    return _in_process(main, args)


def kpcast_main(args: list[str]) -> tuple[int, str]:
    """``python -m kpcast ARGS`` in this process, like :func:`sender_main` (argument errors exit through
    argparse: their status is returned, not raised)."""
    from kpcast.__main__ import main

    def run(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as e:
            return int(e.code or 0)

    return _in_process(run, args)


def _in_process(main: Callable[[list[str]], int], args: list[str]) -> tuple[int, str]:
    import torch

    from shared.ice import restrict_host_addresses

    err = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(args)
    finally:
        torch.set_num_threads(threads)  # each CLI sets its own thread count (for the whole process)
        restrict_host_addresses(None)
    return rc, err.getvalue()
