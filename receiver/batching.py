"""Concurrent calls' frames rendered together: side by side on every core, and in batches.

Every call's render clock asks for its frame on its own (``RenderBatcher.render``). Frames are
rendered in **rounds**: a round takes every frame asked for so far, and the frames asked for
while it runs wait for the next. A frame asked for while nothing runs starts a round at once, so
a lone call is never held back waiting for company.

* **Side by side.** A round of one frame renders it with every core (the graph's intra-op
  threads). A round of several splits them across ``workers`` render threads, each rendering on a
  single-threaded copy of the graph (``FastRender.narrow``): these small convolutions barely use
  a second core from inside one render (one-off timing on 2 cores: 2 threads rendered 64x64 at
  1.0x the rate of 1 thread, two single-threaded renders side by side ~1.9x; bench.concurrency
  measures what a receiver gains).
* **Batched.** Within a worker, frames of the same model run as one graph: ONNX Runtime's
  ``models.fomm.batchgraph.BatchGraph`` (CPU) or eager ``render_tensors`` on stacked sources
  (GPU, or CPU without ONNX Runtime). Frames of different tiers, and batch sizes no graph has been
  built for yet, render one by one; a batch graph is built in the background the first time its
  size is wanted, so a new call never stalls the others.

With more than one caller, a round starts ``gather_s`` after the last one ended (a few ms, like
Triton's queue delay), even when nothing is waiting: the calls just served ask for their next
frame right away when they are behind, and without the pause the first of them would start a
round of one while the others queue behind it (four saturated calls settled into alternating
rounds of one and of three).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from concurrent.futures import Executor

import numpy as np

from receiver.render import RenderJob, run_sized

log = logging.getLogger(__name__)

CALLER_MEMORY_S = 1.0  # a caller that has not asked for this long no longer counts as one to gather


def batch_sizes_for(max_calls: int, max_batch: int, workers: int) -> list[int]:
    """The batch graphs ``plan`` asks for with ``max_calls`` calls in a round:
    the round split across ``workers`` threads, at most ``max_batch`` frames per run."""
    largest = min(max_batch, -(-max_calls // max(1, workers)))
    return list(range(2, largest + 1))


def plan(jobs: list[RenderJob], workers: int) -> list[list[int]]:
    """Split a round's jobs (their indices) across up to ``workers`` render threads.

    Eager jobs stay in one group (PyTorch already spreads one run over every core, and a GPU runs
    one stream). ONNX Runtime jobs are grouped by graph, so that they batch: graphs are packed onto
    the remaining workers, largest first onto the least loaded, and while there are fewer groups
    than workers the largest is halved."""
    eager = [i for i, j in enumerate(jobs) if j.fast is None]
    by_graph: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, j in enumerate(jobs):
        if j.fast is not None:
            by_graph[j.key].append(i)
    free = workers - (1 if eager else 0)
    if free < 1:  # one worker for both kinds: everything on it
        return [list(range(len(jobs)))]
    parts = sorted(by_graph.values(), key=len, reverse=True)
    while parts and len(parts) < free and len(parts[0]) > 1:
        big = parts.pop(0)
        parts += [big[:len(big) // 2], big[len(big) // 2:]]
        parts.sort(key=len, reverse=True)
    bins: list[list[int]] = [[] for _ in range(min(free, len(parts)))]
    for part in parts:
        min(bins, key=len).extend(part)
    return ([eager] if eager else []) + [b for b in bins if b]


class RenderBatcher:
    """Renders the frames all calls ask for, in rounds across ``workers`` threads of ``executor``
    (which must have that many), batching within each (see the module doc).

    ``max_batch``: the most frames in one graph run (a batch graph per size up to it is built on
    demand; 1 turns batching off); ``gather_s``: pause between one round and the next.
    """

    def __init__(self, executor: Executor, max_batch: int = 4, gather_s: float = 0.002, workers: int = 1) -> None:
        self.executor = executor
        self.max_batch = max(1, int(max_batch))
        self.workers = max(1, int(workers))
        self.gather_s = gather_s if self.max_batch > 1 or self.workers > 1 else 0.0
        self._pending: list[tuple[RenderJob, asyncio.Future[tuple[np.ndarray, int]]]] = []
        self._rounds: asyncio.Task | None = None
        self._callers: dict[int, float] = {}  # id(caller) -> when it last asked
        self.batches: dict[int, int] = defaultdict(int)  # frames per round -> how many rounds

    async def render(self, job: RenderJob, caller: object = None) -> np.ndarray:
        """The finished frame of ``job``, rendered with whatever else was asked for meanwhile;
        ``caller``: who asks (a call), so that a lone caller's rounds follow each other without the pause."""
        return (await self.render_counted(job, caller))[0]

    async def render_counted(self, job: RenderJob, caller: object = None) -> tuple[np.ndarray, int]:
        """``render``, and how many frames (this one included) were rendered in the same graph run."""
        fut: asyncio.Future[tuple[np.ndarray, int]] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self._callers[id(caller)] = now
        if len(self._callers) > 1:
            self._callers = {c: t for c, t in self._callers.items() if now - t < CALLER_MEMORY_S}
        self._pending.append((job, fut))
        if self._rounds is None or self._rounds.done():
            self._rounds = asyncio.ensure_future(self._run_rounds())
        return await fut

    async def _run_rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(j, f) for j, f in self._pending if not f.cancelled()]  # calls that hung up meanwhile
            self._pending = []
            if not batch:
                return
            self.batches[len(batch)] += 1
            jobs = [j for j, _ in batch]
            groups = plan(jobs, self.workers)
            narrow = len(groups) > 1
            try:
                runs = [loop.run_in_executor(self.executor, run_sized, [jobs[i] for i in g], self.max_batch, narrow)
                        for g in groups]
            except RuntimeError as e:  # the executor was shut down (the receiver is stopping)
                for _, fut in batch + self._pending:
                    if not fut.done():
                        fut.set_exception(e)
                self._pending = []
                return
            done = await asyncio.gather(*runs, return_exceptions=True)
            for g, results in zip(groups, done, strict=True):
                if isinstance(results, BaseException):
                    results = [(results, 1)] * len(g)
                for i, (r, together) in zip(g, results, strict=True):
                    fut = batch[i][1]
                    if fut.done():
                        continue
                    if isinstance(r, BaseException):
                        fut.set_exception(r)
                    else:
                        fut.set_result((r, together))
            if len(self._callers) > 1:  # a lone call has no one to wait for
                await asyncio.sleep(self.gather_s)
