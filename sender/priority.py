"""Thread priority of the sender's own work when it shares its cores with a renderer (``kpcast call``).

On one machine a two-way call both extracts this side's keypoints and renders the other side's face.
When the cores are short, a late render is a frozen picture here, while a late extraction only costs the
other side one fresh frame (its playout conceals it, as it conceals loss). So the sending half's worker
threads (extraction, face framing, the refresh estimate) can run ``nice`` steps below the render threads:
the scheduler hands the renderer the core first. Linux applies ``setpriority`` with a thread id to that
thread alone; elsewhere the call is a no-op with a warning.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

MAX_NICE = 19


def lower_this_thread(by: int) -> int:
    """Raise the calling thread's nice value by ``by`` (capped at 19); return the new value, or the old
    one when the platform cannot (a warning says so). ``by`` <= 0 changes nothing."""
    if by <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
    tid = threading.get_native_id()
    old = os.getpriority(os.PRIO_PROCESS, tid)
    new = min(MAX_NICE, old + by)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, new)
    except OSError as e:  # raising one's own nice is always allowed on Linux: this is another platform's answer
        log.warning("could not lower the priority of thread %s: %s", threading.current_thread().name, e)
        return old
    return new


def worker_pool(name: str, nice: int = 0) -> ThreadPoolExecutor:
    """One worker thread named ``name``, ``nice`` steps below the threads that made it."""
    if nice < 0:
        raise ValueError(f"nice must be >= 0 (a thread may only lower its own priority), not {nice}")
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                              initializer=lower_this_thread if nice else None, initargs=(nice,) if nice else ())
