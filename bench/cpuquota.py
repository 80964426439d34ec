"""Run a process under a CPU quota (cgroup v1 ``cpu`` or v2 ``cpu.max``): a slower machine on demand.

A quota of ``share`` lets the process's threads together use ``share`` of one core per 100 ms
period; past it they all wait for the next period, as on a machine that many times slower
(in bursts). Needs root and a writable cpu controller; :func:`available` says whether this
machine has one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CPU_V1 = Path("/sys/fs/cgroup/cpu")
CPU_V2 = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


def cgroup_root() -> Path | None:
    """The cpu controller's root folder, or None where quotas cannot be set."""
    if os.geteuid() != 0:
        return None
    if (CPU_V1 / "cpu.cfs_quota_us").exists():
        return CPU_V1
    ctl = CPU_V2 / "cgroup.controllers"
    if ctl.exists() and "cpu" in ctl.read_text().split():
        return CPU_V2
    return None


def available() -> bool:
    return cgroup_root() is not None


class Quota:
    """A cgroup holding one process; ``set(share)`` changes its quota (None: unlimited)."""

    def __init__(self, root: Path, group: Path) -> None:
        self.root, self.group = root, group

    def set(self, share: float | None) -> None:
        quota = -1 if share is None else max(1000, int(share * PERIOD_US))
        if self.root == CPU_V1:
            (self.group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.group / "cpu.max").write_text(f"{'max' if quota < 0 else quota} {PERIOD_US}")


@contextmanager
def cpu_quota(pid: int, share: float | None) -> Iterator[Quota]:
    """Run ``pid`` (all its threads) under a quota of ``share`` of one core until the block ends."""
    root = cgroup_root()
    if root is None:
        raise RuntimeError("CPU quotas need root and a writable cpu cgroup controller")
    group = root / f"kpcast_{uuid.uuid4().hex[:6]}"
    group.mkdir()
    q = Quota(root, group)
    try:
        q.set(share)
        (group / "cgroup.procs").write_text(str(pid))
        yield q
    finally:
        try:
            (root / "cgroup.procs").write_text(str(pid))
        except OSError:
            pass  # the process has exited
        group.rmdir()
