"""Network namespaces for real-network tests and benchmarks (Linux, root only).

Two context managers; both always delete every namespace they created, also when
the body raises or setup fails half-way:

- :func:`two_hosts` — two namespaces joined by one veth pair (``10.77.0.1/24`` and
  ``10.77.0.2/24`` by default).
- :func:`impaired_link` — two end namespaces joined *through* a middle namespace
  that impairs every packet for real::

      [a] a0 ──veth── m0 [middle] m1 ──veth── b0 [b]
      10.77.1.1/24    (no IP, no forwarding)     10.77.1.2/24

Why this design (the kernel here has no ``tc netem``):

- **Loss** is an nftables rule in the middle namespace, a ``netdev`` table with an
  ``ingress`` chain on each middle veth end: ``meta protocol ip numgen random mod
  100 < N drop``. Only IPv4 is dropped, so ARP (needed to get going) is never lost.
- **Delay/jitter** is a small user-space L2 bridge (:func:`_bridge_main`, run inside
  the middle namespace as ``python -m bench.netns _bridge ...``) with ``AF_PACKET``
  sockets on ``m0`` and ``m1``. It holds each frame for ``delay + U(0, jitter)``
  (so the added one-way delay is never below ``delay_ms``; frames reorder when
  jitter exceeds their spacing, as on a real path) and then writes it out of the
  other end. The sockets are bound to ``ETH_P_IP`` and ``ETH_P_ARP`` rather than
  ``ETH_P_ALL`` on purpose: protocol-bound packet sockets are delivered *after* the
  netdev ingress hook, so they never see what nftables dropped (``ETH_P_ALL`` taps
  run before it) and they do not see their own transmitted frames.
- No NFQUEUE: no maintained Python binding is installed, and a bridge needs nothing
  beyond the standard library.
- The end veths have TX checksum offload and TSO/GSO switched off (legacy ethtool
  ioctls, no ``ethtool`` binary here): otherwise frames reach the bridge with a
  partial checksum (or as 64 KiB TCP super-packets), and, re-sent from user space,
  would be dropped by the receiving stack.

The bridge adds roughly 0.1–1 ms of scheduling noise and handles some 10k
packets/s on this machine: plenty for keypoint streams and WebRTC signalling, not a
line-rate emulator. Run commands inside a namespace with :func:`netns_exec` /
:func:`netns_popen` (``ip netns exec NAME ...``).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import fcntl
import heapq
import logging
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = [
    "Hosts",
    "ImpairedLink",
    "NetnsUnavailable",
    "impaired_link",
    "list_netns",
    "netns_exec",
    "netns_popen",
    "require_root",
    "two_hosts",
]


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be created here (not root, or ``ip``/``nft`` missing)."""


def require_root(need_nft: bool = True) -> None:
    """Raise :class:`NetnsUnavailable` with a clear reason unless we can build namespaces."""
    if not sys.platform.startswith("linux"):
        raise NetnsUnavailable("network namespaces need Linux")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (run as root or skip the namespace tests)")
    missing = [t for t in (["ip", "nft"] if need_nft else ["ip"]) if shutil.which(t) is None]
    if missing:
        raise NetnsUnavailable(f"missing tool(s) {', '.join(missing)} (install iproute2 / nftables)")


def _run(args: Sequence[str], check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), check=False, capture_output=True, text=True, input=input, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_exec(ns: str, args: Sequence[str], timeout: float | None = 60, check: bool = True,
               **kw) -> subprocess.CompletedProcess:
    """Run ``args`` inside namespace ``ns`` and wait; returns the completed process (text output)."""
    proc = subprocess.run(["ip", "netns", "exec", ns, *args], check=False, capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"[{ns}] {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def netns_popen(ns: str, args: Sequence[str], **kw) -> subprocess.Popen:
    """Start ``args`` inside namespace ``ns`` (caller terminates it)."""
    return subprocess.Popen(["ip", "netns", "exec", ns, *args], **kw)


def list_netns() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _unique(prefix: str) -> str:
    # Short (interface names are at most 15 chars) and unique across concurrent users.
    return f"{prefix}{uuid.uuid4().hex[:6]}"


class _Cleanup:
    """Collects namespaces; deleting a namespace also deletes the veth ends inside it."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add_ns(self, name: str) -> str:
        _run(["ip", "netns", "add", name])
        self.names.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def close(self) -> None:
        for name in reversed(self.names):
            proc = _run(["ip", "netns", "del", name], check=False)
            if proc.returncode != 0 and name in list_netns():
                log.error("could not delete namespace %s: %s", name, proc.stderr.strip())
        self.names.clear()


def _veth(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    # Create both ends directly inside their namespaces: nothing is ever left in the root one.
    _run(["ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b])


def _up(ns: str, ifname: str, addr: str | None = None) -> None:
    if addr:
        _run(["ip", "-n", ns, "addr", "add", addr, "dev", ifname])
    _run(["ip", "-n", ns, "link", "set", ifname, "up"])


def _disable_ipv6(ns: str) -> None:
    # IPv6 router/neighbour chatter would otherwise cross the bridge and skew packet counts.
    netns_exec(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"], check=False)
    netns_exec(ns, ["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"], check=False)


@dataclass(frozen=True)
class Hosts:
    """Two connected namespaces: ``a``/``b`` names, ``addr_a``/``addr_b`` IPv4 addresses."""

    a: str
    b: str
    addr_a: str
    addr_b: str
    if_a: str
    if_b: str

    def exec(self, which: str, args: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return netns_exec(self.a if which == "a" else self.b, args, **kw)

    def popen(self, which: str, args: Sequence[str], **kw) -> subprocess.Popen:
        return netns_popen(self.a if which == "a" else self.b, args, **kw)


@contextlib.contextmanager
def two_hosts(subnet: str = "10.77.0", prefix: str = "kp") -> Iterator[Hosts]:
    """Two namespaces joined by a veth pair; ``{subnet}.1`` and ``{subnet}.2`` (/24)."""
    require_root(need_nft=False)
    tag = _unique(prefix)
    ns_a, ns_b = f"{tag}a", f"{tag}b"
    cleanup = _Cleanup()
    try:
        cleanup.add_ns(ns_a)
        cleanup.add_ns(ns_b)
        _veth(ns_a, "a0", ns_b, "b0")
        _up(ns_a, "a0", f"{subnet}.1/24")
        _up(ns_b, "b0", f"{subnet}.2/24")
        yield Hosts(ns_a, ns_b, f"{subnet}.1", f"{subnet}.2", "a0", "b0")
    finally:
        cleanup.close()


# --------------------------------------------------------------------------- ethtool ioctls

_SIOCETHTOOL = 0x8946
_ETHTOOL_STXCSUM = 0x17
_ETHTOOL_SSG = 0x19
_ETHTOOL_STSO = 0x1F
_ETHTOOL_SGSO = 0x24
_ETHTOOL_SGRO = 0x2C


def _ethtool_set(ifname: str, cmd: int, value: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        buf = array.array("I", [cmd, value])
        addr, _ = buf.buffer_info()
        ifreq = struct.pack("16sP", ifname.encode(), addr) + b"\0" * 16
        fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, ifreq)
    finally:
        sock.close()


def _offloads_off_main(ifnames: Sequence[str]) -> None:
    """Inside a namespace: TX checksum, SG, TSO, GSO and GRO off on each interface."""
    for name in ifnames:
        for cmd in (_ETHTOOL_STSO, _ETHTOOL_SGSO, _ETHTOOL_SGRO, _ETHTOOL_SSG, _ETHTOOL_STXCSUM):
            try:
                _ethtool_set(name, cmd, 0)
            except OSError as e:  # some flags are fixed on some kernels; the checksum one matters
                if cmd == _ETHTOOL_STXCSUM:
                    raise
                log.debug("ethtool cmd %#x on %s: %s", cmd, name, e)


# --------------------------------------------------------------------------- impaired link

@dataclass(frozen=True)
class ImpairedLink(Hosts):
    """Two end namespaces (``a``, ``b``) joined through ``middle`` that drops and delays packets."""

    middle: str = ""
    loss: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0


_ETH_P_IP = 0x0800
_ETH_P_ARP = 0x0806


def _nft_loss_rules(table: str, ifaces: Sequence[str], loss_pct: int) -> str:
    chains = []
    for i, ifname in enumerate(ifaces):
        rule = f"meta protocol ip numgen random mod 100 < {loss_pct} drop" if loss_pct > 0 else ""
        chains.append(
            f"  chain in{i} {{\n    type filter hook ingress device \"{ifname}\" priority 0; policy accept;\n"
            f"    {rule}\n  }}\n")
    return f"table netdev {table} {{\n{''.join(chains)}}}\n"


@contextlib.contextmanager
def impaired_link(loss: float = 0.1, delay_ms: float = 40.0, jitter_ms: float = 50.0,
                  seed: int | None = None, subnet: str = "10.77.1", prefix: str = "kp",
                  ready_timeout_s: float = 10.0) -> Iterator[ImpairedLink]:
    """Two namespaces joined through an impairing middle namespace (both directions impaired).

    ``loss`` is a probability in [0, 1] (applied in whole percent by nftables), ``delay_ms``
    the fixed one-way delay added by the middle, ``jitter_ms`` the width of the uniform extra
    delay on top of it, ``seed`` seeds the jitter (nftables' random numbers are not seedable).
    """
    require_root()
    if not 0.0 <= loss <= 1.0:
        raise ValueError(f"loss must be in [0, 1], got {loss}")
    if delay_ms < 0 or jitter_ms < 0:
        raise ValueError("delay_ms and jitter_ms must be >= 0")
    tag = _unique(prefix)
    ns_a, ns_m, ns_b = f"{tag}a", f"{tag}m", f"{tag}b"
    cleanup = _Cleanup()
    bridge: subprocess.Popen | None = None
    try:
        for ns in (ns_a, ns_m, ns_b):
            cleanup.add_ns(ns)
            _disable_ipv6(ns)
        _veth(ns_a, "a0", ns_m, "m0")
        _veth(ns_m, "m1", ns_b, "b0")
        netns_exec(ns_m, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"], check=False)
        for ns, ifname in ((ns_a, "a0"), (ns_b, "b0")):
            netns_exec(ns, [sys.executable, "-m", "bench.netns", "_offloads_off", ifname], cwd=_repo_root())
        _up(ns_a, "a0", f"{subnet}.1/24")
        _up(ns_b, "b0", f"{subnet}.2/24")
        _up(ns_m, "m0")
        _up(ns_m, "m1")
        netns_exec(ns_m, ["nft", "-f", "-"], input=_nft_loss_rules("kpimpair", ["m0", "m1"],
                                                                      round(loss * 100)))
        args = [sys.executable, "-m", "bench.netns", "_bridge", "m0", "m1",
                "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms)]
        if seed is not None:
            args += ["--seed", str(seed)]
        bridge = netns_popen(ns_m, args, cwd=_repo_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        _wait_ready(bridge, ready_timeout_s)
        yield ImpairedLink(ns_a, ns_b, f"{subnet}.1", f"{subnet}.2", "a0", "b0",
                           middle=ns_m, loss=loss, delay_ms=delay_ms, jitter_ms=jitter_ms)
    finally:
        if bridge is not None:
            _stop(bridge)
        cleanup.close()


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wait_ready(proc: subprocess.Popen, timeout_s: float) -> None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        _stop(proc)
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"impairment bridge did not start: {line!r} {err[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for f in (proc.stdout, proc.stderr):
        if f:
            f.close()


# --------------------------------------------------------------------------- the bridge process

def _packet_socket(ifname: str, proto: int) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
    s.bind((ifname, proto))
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return s


def _bridge_main(if_a: str, if_b: str, delay_ms: float, jitter_ms: float, seed: int | None) -> None:
    """Forward frames between two interfaces, each held for delay + U(0, jitter)."""
    rng = random.Random(seed)
    out_a = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # proto 0: send only, never receives
    out_a.bind((if_a, 0))
    out_b = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    out_b.bind((if_b, 0))
    inputs = {}
    for ifname, out in ((if_a, out_b), (if_b, out_a)):
        for proto in (_ETH_P_IP, _ETH_P_ARP):
            s = _packet_socket(ifname, proto)
            inputs[s.fileno()] = (s, out)
    stop = False

    def _term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    poller = select.poll()
    for fd in inputs:
        poller.register(fd, select.POLLIN)
    heap: list[tuple[float, int, bytes, socket.socket]] = []
    n = 0
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, frame, out = heapq.heappop(heap)
            try:
                out.send(frame)
            except OSError as e:  # e.g. EMSGSIZE or ENOBUFS: a real link would drop it too
                log.debug("bridge send failed: %s", e)
        # Bounded wait: Python retries poll() after a signal, so SIGTERM is only noticed here.
        timeout_ms = 100.0 if not heap else min(100.0, max(0.0, (heap[0][0] - time.monotonic()) * 1000.0))
        events = poller.poll(timeout_ms)
        for fd, _ in events:
            s, out = inputs[fd]
            while True:
                try:
                    frame, addr = s.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[2] == socket.PACKET_OUTGOING:
                    continue
                hold = (delay_ms + rng.uniform(0.0, jitter_ms)) / 1000.0
                n += 1
                heapq.heappush(heap, (time.monotonic() + hold, n, frame, out))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.netns", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("_bridge", help="(internal) run the delay bridge in the current namespace")
    b.add_argument("if_a")
    b.add_argument("if_b")
    b.add_argument("--delay-ms", type=float, default=0.0)
    b.add_argument("--jitter-ms", type=float, default=0.0)
    b.add_argument("--seed", type=int, default=None)
    o = sub.add_parser("_offloads_off", help="(internal) switch off checksum/segmentation offloads")
    o.add_argument("ifnames", nargs="+")
    sub.add_parser("list", help="list namespaces")
    a = p.parse_args(argv)
    if a.cmd == "_bridge":
        _bridge_main(a.if_a, a.if_b, a.delay_ms, a.jitter_ms, a.seed)
    elif a.cmd == "_offloads_off":
        _offloads_off_main(a.ifnames)
    else:
        print("\n".join(list_netns()))


if __name__ == "__main__":
    main()
