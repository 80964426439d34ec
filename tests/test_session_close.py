"""receiver.session.CallSession.close: a second caller waits for the close under way to finish.

A two-way call (``kpcast.call``) closes its receiving session when its own input ends; when the other side's
Bye had closed that session a few milliseconds before, the second close returned at once and the process
exited while the first was still writing the frames log (a fresh-clone run with a busy core lost it)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.fuzz import make_session


async def test_a_second_close_returns_once_the_first_has_finished(tmp_path: Path) -> None:
    log = tmp_path / "frames.npz"
    with ThreadPoolExecutor(max_workers=1) as ex:
        s = make_session(ex, playout="clock", frames_log=str(log))
        assert s.frames_log is not None
        write = s.frames_log.write

        def slow_write(path: Path) -> None:  # a busy machine: the log takes a while to write
            time.sleep(0.3)
            write(path)

        s.frames_log.write = slow_write  # type: ignore[method-assign]
        first = asyncio.ensure_future(s.close("bye: done"))
        await asyncio.sleep(0.05)
        assert s.closed.is_set() and not log.exists()  # the first close is under way
        await s.close("our input ended")
        assert log.exists()  # written before the second close returned
        assert s.stats.end_reason == "bye: done"  # the first reason stands
        await first
        await s.close("again")  # after the end: returns at once
