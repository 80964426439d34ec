"""sender.priority: the sending half's workers run below the renderer, and only they do."""

import os
import threading

import pytest

from sender.priority import MAX_NICE, lower_this_thread, worker_pool

pytestmark = pytest.mark.skipif(not hasattr(threading, "get_native_id") or not hasattr(os, "setpriority"),
                                reason="per-thread priority is a Linux feature")


def _nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_worker_pool_lowers_its_own_thread_only():
    before = _nice_of_this_thread()
    pool = worker_pool("t-extract", 5)
    try:
        inside = pool.submit(_nice_of_this_thread).result()
        name = pool.submit(lambda: threading.current_thread().name).result()
    finally:
        pool.shutdown(wait=True)
    assert inside == min(MAX_NICE, before + 5)
    assert name.startswith("t-extract")
    assert _nice_of_this_thread() == before  # the caller (the renderer's process) keeps its priority


def test_no_nice_leaves_the_worker_alone():
    before = _nice_of_this_thread()
    pool = worker_pool("t-plain", 0)
    try:
        assert pool.submit(_nice_of_this_thread).result() == before
    finally:
        pool.shutdown(wait=True)


def test_nice_is_capped_at_19():
    def run() -> tuple[int, int]:
        return lower_this_thread(40), _nice_of_this_thread()

    t_out: list[tuple[int, int]] = []
    t = threading.Thread(target=lambda: t_out.append(run()))
    t.start()
    t.join()
    assert t_out == [(MAX_NICE, MAX_NICE)]


def test_a_negative_nice_is_refused():
    with pytest.raises(ValueError, match="nice must be >= 0"):
        worker_pool("t-bad", -1)
