"""Hostile peers against a real receiver: does it survive, stay responsive, and let go of its slots?

Usage:
  python -m bench.hostile [--attacks NAME ...] [--weights PATH] [--max-calls 4] [--frames 90] [--fps 15]
                          [--playout clock|immediate] [--setup-timeout SECONDS] [--json OUT] [--png PLOT]
                          [--list]

One receiver process (``python -m receiver``, restarted if an attack kills it) faces each attack of
``bench.attacks.CATALOGUE`` in turn. Per attack:

- **survived**: the receiver process is still running and answers ``/health`` afterwards;
- **slot held**: from when the attacker took its slot (its offer answered, or its first request
  sent) until the receiver had let go of it (``/health`` shows no call; for HTTP-only attacks: the
  last answer, since a slot is given back before the answer is sent);
- **RSS**: the receiver's peak resident memory during the attack (``VmHWM``, reset through
  ``/proc/PID/clear_refs`` before each attack; sampled ``VmRSS`` where that is not allowed), and
  its RSS after the call that follows;
- **/health max**: the slowest of ``GET /health`` probes sent every 50 ms from a separate thread
  while the attack runs (an event loop frozen by the attack shows here);
- **slots free**: after the attack, ``max-calls + 1`` offers whose body is held back: the ones
  not refused at once (503) hold a slot, then get a body that answers 400;
- **call after**: a real ``python -m sender`` call on the bundled clip (``--framing centre``):
  frames the receiver rendered ÷ frames the sender captured, which must be ≥ 95 %.

Exit status 0 when every attack was survived, left every slot free and was followed by a good call.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import common
from bench.attacks import BY_NAME, CATALOGUE, Attack, Outcome, Target
from bench.calls import ROOT, env, free_port, start_receiver, stop
from shared.ice import restrict_host_addresses
from shared.signaling import OFFER_PATH

log = logging.getLogger(__name__)

CLIP = ROOT / "assets" / "demo_face.mp4"
MIN_RENDERED = 0.95  # of the frames the normal call captured
FREE_TIMEOUT_S = 40.0  # an attack whose slot is not freed by then is reported as holding it
ATTACK_TIMEOUT_S = 60.0
HEALTH_INTERVAL_S = 0.05
MIN_WATCH_S = 2.0  # /health and RSS are watched at least this long from the start of each attack
HEALTH_TIMEOUT_S = 10.0
TARGETS = {"health_max_ms": 200.0, "rss_growth_mb": 50.0, "rendered": MIN_RENDERED}


# --------------------------------------------------------------------------- the receiver's memory


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/PID/status in kB (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS, so the next reading is this attack's peak."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Monitor:
    """``/health`` latency and the receiver's RSS, sampled from a thread while an attack runs.

    A thread with blocking HTTP rather than a task, so that the harness's own event loop, busy
    with the attacker's aiortc peers, does not delay the probes; a fresh connection per probe,
    as a load balancer would make.
    """

    def __init__(self, host: str, port: int, pid: int) -> None:
        self.host, self.port, self.pid = host, port, pid
        self.latencies_ms: list[float] = []
        self.failures = 0
        self.rss_max_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(HEALTH_TIMEOUT_S + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=HEALTH_TIMEOUT_S)
                conn.request("GET", "/health")
                ok = conn.getresponse().status == 200
                conn.close()
            except (OSError, http.client.HTTPException):
                ok = False
            self.latencies_ms.append((time.perf_counter() - t0) * 1000)
            self.failures += not ok
            self.rss_max_kb = max(self.rss_max_kb, proc_status_kb(self.pid, "VmRSS") or 0)
            self._stop.wait(HEALTH_INTERVAL_S)

    def report(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {"health_probes": len(lat), "health_failures": self.failures,
                "health_max_ms": lat[-1] if lat else None, "health_p50_ms": lat[len(lat) // 2] if lat else None}


# --------------------------------------------------------------------------- talking to the receiver


@dataclass
class Receiver:
    """The receiver process under attack, restarted when an attack kills it."""

    args: list[str]
    log_path: Path
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    port: int = 0
    restarts: int = -1

    def start(self) -> None:
        self.port = free_port()
        self.proc = start_receiver(["--host", self.host, "--port", str(self.port), *self.args],
                                   log_path=self.log_path.with_suffix(f".{self.restarts + 1}.log"))
        self.restarts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        return stop(self.proc, 30)


async def get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as r:
            return await r.json() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def wait_no_calls(http: aiohttp.ClientSession, rec: Receiver, timeout_s: float) -> float | None:
    """Monotonic time at which ``/health`` first showed no call, or None (timeout, or the receiver died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and rec.alive:
        h = await get_json(http, rec.url + "/health")
        if h is not None and h.get("calls") == 0:
            return time.monotonic()
        await asyncio.sleep(0.05)
    return None


async def probe_slots(host: str, port: int, max_calls: int) -> int:
    """How many offers the receiver would take right now (pending offers included, which /health
    does not show): ``max_calls + 1`` requests send headers only; those not refused at once hold a
    slot each, and are then sent a body that cannot become a call (answered 400)."""
    body = b'{"sdp": "v=0", "type": "offer"}'
    head = (f"POST {OFFER_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    conns = []
    try:
        for _ in range(max_calls + 1):
            r, w = await asyncio.open_connection(host, port)
            w.write(head)
            await w.drain()
            conns.append((r, w, asyncio.ensure_future(r.readline())))
        await asyncio.sleep(0.5)  # the refusals (503) come at once; the rest wait for their body
        held = [c for c in conns if not c[2].done()]
        for _, w, _ in held:
            w.write(body)
            await w.drain()
        statuses = [int((await asyncio.wait_for(line, 10)).split()[1]) for _, _, line in conns]
        return sum(s != 503 for s in statuses)
    except (OSError, TimeoutError, ValueError, IndexError):
        return -1
    finally:
        for _, w, line in conns:
            line.cancel()
            w.close()


async def normal_call(http: aiohttp.ClientSession, rec: Receiver, weights: Path, frames: int, fps: float,
                      work: Path, min_rendered: float = MIN_RENDERED) -> dict[str, Any]:
    """A real sender call; the receiver's account of it comes from /stats."""
    before = (await get_json(http, rec.url + "/stats") or {}).get("calls_finished", 0)
    out = work / "sender.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "sender", "--receiver", rec.url, "--video", str(CLIP), "--weights", str(weights),
           "--max-frames", str(frames), "--fps", str(fps), "--framing", "centre", "--stats-json", str(out)]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, env=env(), stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60 + 3 * frames / fps)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
    # The call's frames are those the sender captured: a predictive keypoint stream does not send
    # the frames the receiver can predict, so "sent" would undercount what there was to render.
    result: dict[str, Any] = {"sender_rc": proc.returncode, "frames": 0, "frames_rendered": 0, "rendered": 0.0}
    if proc.returncode != 0:
        result["sender_error"] = err.decode(errors="replace")[-500:]
    if out.exists():
        sent = json.loads(out.read_text())
        result["frames"], result["frames_sent"] = sent["frames_captured"], sent["frames_sent"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and rec.alive:  # the receiver drains, then hangs up
        s = await get_json(http, rec.url + "/stats")
        if s is not None and s["calls_finished"] > before and not s["active"]:
            new = s["finished"][-(s["calls_finished"] - before):]
            got = max(new, key=lambda c: c["frames_received"])
            result.update({k: got.get(k) for k in ("frames_rendered", "frames_received", "frames_real",
                                                    "frames_concealed", "frames_interpolated", "frames_dropped",
                                                    "frames_rejected", "end_reason", "playout")})
            break
        await asyncio.sleep(0.1)
    if result["frames"]:
        result["rendered"] = result["frames_rendered"] / result["frames"]
    result["ok"] = proc.returncode == 0 and result["frames"] > 0 and result["rendered"] >= min_rendered
    return result


def describe(outcome: Outcome, calls: list[dict[str, Any]]) -> str:
    """What the receiver did, in a few words: HTTP answers, and how each call the attack made ended."""
    parts = [outcome.note] if outcome.note and outcome.note != "-" else []
    if outcome.statuses:
        parts.append(" ".join(f"{n}x{s}" for s, n in sorted(outcome.statuses.items())))
    by_end: dict[str, list[dict[str, Any]]] = {}
    for c in calls:  # calls that ended alike are summed: an attack may make several
        by_end.setdefault(c["end_reason"], []).append(c)
    for end, group in by_end.items():
        rejected: Counter = Counter()
        for c in group:
            rejected.update(c.get("rejected_by_reason") or {})
        why = f" [rejected {', '.join(f'{k} {v}' for k, v in rejected.most_common(2))}]" if rejected else ""
        times = f" x{len(group)}" if len(group) > 1 else ""
        parts.append(f"{end}{times}{why}, {sum(c['frames_received'] for c in group)} frames in")
    return "; ".join(parts) or "-"


# --------------------------------------------------------------------------- one attack


async def run_attack(attack: Attack, rec: Receiver, target: Target, http: aiohttp.ClientSession, weights: Path,
                     frames: int, fps: float, work: Path, min_rendered: float = MIN_RENDERED) -> dict[str, Any]:
    assert rec.proc is not None
    pid = rec.proc.pid
    before = (await get_json(http, rec.url + "/stats") or {}).get("calls_finished", 0)
    rss_before = proc_status_kb(pid, "VmRSS")
    hwm = reset_peak(pid)
    error = None
    outcome = Outcome()
    t0 = time.monotonic()
    with Monitor(rec.host, rec.port, pid) as monitor:
        try:
            outcome = await asyncio.wait_for(attack.run(target), ATTACK_TIMEOUT_S)
        except Exception as e:  # the attack failing (e.g. refused) is a result, not a harness error
            error = f"{type(e).__name__}: {e}"[:200]
        freed = await wait_no_calls(http, rec, FREE_TIMEOUT_S)
        # keep probing a while: what an attack sets off (a decode, a forecast) may come after it returns
        await asyncio.sleep(max(0.0, t0 + MIN_WATCH_S - time.monotonic()))
    peak_kb = proc_status_kb(pid, "VmHWM") if hwm else None
    peak_kb = max(peak_kb or 0, monitor.rss_max_kb) or None
    await outcome.cleanup()
    alive_after_attack = rec.alive
    start = outcome.taken_at if outcome.taken_at is not None else t0
    end = outcome.freed_at if outcome.freed_at is not None and outcome.taken_at is None else freed
    slots = await probe_slots(rec.host, rec.port, target.max_calls) if rec.alive else 0
    stats = await get_json(http, rec.url + "/stats") or {}
    n_new = stats.get("calls_finished", before) - before
    calls = stats.get("finished", [])[-n_new:] if n_new > 0 else []
    call = (await normal_call(http, rec, weights, frames, fps, work, min_rendered) if rec.alive
            else {"ok": False, "rendered": 0.0})
    survived = alive_after_attack and rec.alive and await get_json(http, rec.url + "/health") is not None
    row = {"attack": attack.name, "does": attack.does, "expect": attack.expect, "survived": survived,
           "did": describe(outcome, calls) if error is None else f"attack failed: {error}",
           "slot_held_s": end - start if end is not None else None, "slot_freed": freed is not None,
           "rss_before_mb": _mb(rss_before), "rss_peak_mb": _mb(peak_kb),
           "rss_peak_delta_mb": _mb(peak_kb - rss_before) if peak_kb and rss_before else None,
           "rss_after_mb": _mb(proc_status_kb(pid, "VmRSS")), "peak_from": "VmHWM" if hwm else "sampled VmRSS",
           **monitor.report(), "slots_free": slots, "http_statuses": dict(outcome.statuses),
           "attacker_calls": calls, "call_after": call}
    # an attack that could not be carried out tested nothing: not a pass
    row["ok"] = bool(error is None and outcome.held and survived and slots == target.max_calls and call["ok"]
                     and freed is not None)
    if not survived:
        log.error("%s: the receiver did not survive (exit %s)", attack.name, rec.proc.poll())
    return row


def _mb(kb: int | None) -> float | None:
    return kb / 1024 if kb is not None else None


# --------------------------------------------------------------------------- the catalogue


async def run_all(attacks: list[Attack], weights: Path, max_calls: int, playout: str, frames: int, fps: float,
                  work: Path, setup_timeout_s: float | None = None,
                  min_rendered: float = MIN_RENDERED) -> list[dict[str, Any]]:
    from models.fomm.io import detector_id, load_motion_model

    restrict_host_addresses(["127.0.0.1"])  # the attacker's aiortc peers, like every local call
    detector = detector_id(load_motion_model(weights)[0])
    extra = [] if setup_timeout_s is None else ["--setup-timeout", str(setup_timeout_s)]
    rec = Receiver(["--weights", str(weights), "--max-calls", str(max_calls), "--playout", playout, *extra],
                   work / "receiver.log")
    rows = []
    rec.start()
    try:
        async with aiohttp.ClientSession() as http:
            for attack in attacks:
                if not rec.alive:
                    rec.start()
                target = Target(rec.host, rec.port, detector, max_calls)
                log.info("attack %s: %s", attack.name, attack.does)
                row = await run_attack(attack, rec, target, http, weights, frames, fps, work, min_rendered)
                row["receiver_restarts"] = rec.restarts
                rows.append(row)
                print(f"{attack.name:<18} survived={row['survived']} did: {row['did']}", flush=True)
    finally:
        rec.close()
        restrict_host_addresses(None)
    return rows


def summary(rows: list[dict[str, Any]], max_calls: int) -> dict[str, Any]:
    after = [r["rss_after_mb"] for r in rows if r["rss_after_mb"] is not None]
    health = [r["health_max_ms"] for r in rows if r["health_max_ms"] is not None]
    return {"attacks": len(rows), "crashes": sum(not r["survived"] for r in rows),
            "slots_not_freed": sum(not r["slot_freed"] or r["slots_free"] != max_calls for r in rows),
            "calls_under_min_rendered": sum(not r["call_after"]["ok"] for r in rows),
            "health_max_ms": max(health) if health else None,
            "rss_growth_mb": after[-1] - after[0] if len(after) > 1 else None,
            "passed": all(r["ok"] for r in rows)}


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["attack", "survived", "receiver did", "slot held s", "RSS peak MB", "+MB", "/health max ms",
               "slots free", "call after %"]
    cells = [[r["attack"], r["survived"], r["did"], r["slot_held_s"], r["rss_peak_mb"], r["rss_peak_delta_mb"],
              r["health_max_ms"], r["slots_free"], 100 * r["call_after"]["rendered"]] for r in rows]
    return common.format_table(headers, cells)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    fig, ax = common.new_figure(10, 4.5)
    x = list(range(len(rows)))
    ax.bar(x, [r["health_max_ms"] or 0 for r in rows], color="tab:blue", label="/health max (ms)")
    ax.axhline(TARGETS["health_max_ms"], color="tab:blue", ls="--", lw=1)
    ax.set_ylabel("/health max during the attack (ms)")
    ax.set_xticks(x, [r["attack"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(x, [r["rss_peak_delta_mb"] or 0 for r in rows], "o", color="tab:red", label="peak RSS growth (MB)")
    ax2.set_ylabel("peak RSS above the start of the attack (MB)")
    for i, r in enumerate(rows):
        if not r["ok"]:
            ax.annotate("FAIL", (i, 0), ha="center", va="bottom", color="red", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(loc="upper center", ncol=2, frameon=False)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", nargs="+", choices=list(BY_NAME), help="a subset, in this order (default: all)")
    p.add_argument("--weights", default=None, help="motion model for the receiver and the normal calls "
                                                   "(default: the shipped 64x64 model)")
    p.add_argument("--max-calls", type=int, default=4)
    p.add_argument("--playout", choices=["clock", "immediate"], default="clock")
    p.add_argument("--frames", type=int, default=90, help="frames of each normal call")
    p.add_argument("--fps", type=float, default=15.0, help="frame rate of each normal call")
    p.add_argument("--setup-timeout", type=float, default=None, metavar="SECONDS",
                   help="the receiver's --setup-timeout, which bounds how long the attacks that vanish or stay "
                        "silent hold their slot (default: the receiver's own default)")
    p.add_argument("--min-rendered", type=float, default=MIN_RENDERED,
                   help="share of the honest call's frames that must be rendered after each attack (default "
                        "%(default)s; a test on a loaded machine asks less: rendering is CPU time)")
    p.add_argument("--logs", help="keep the receiver's logs in this folder (default: a temporary one)")
    p.add_argument("--list", action="store_true", help="print the catalogue and exit")
    p.add_argument("--json")
    p.add_argument("--png")
    a = p.parse_args(argv)
    if a.list:
        print(common.format_table(["attack", "does", "a receiver that holds"],
                                  [[x.name, x.does, x.expect] for x in CATALOGUE]))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    weights = common.resolve_weights(a.weights)
    attacks = [BY_NAME[n] for n in a.attacks] if a.attacks else CATALOGUE
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.logs) if a.logs else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        rows = asyncio.run(run_all(attacks, weights, a.max_calls, a.playout, a.frames, a.fps, work,
                                   a.setup_timeout, a.min_rendered))
        elapsed = time.monotonic() - t0
    result = {"weights": str(weights), "max_calls": a.max_calls, "playout": a.playout, "frames": a.frames,
              "fps": a.fps, "setup_timeout_s": a.setup_timeout, "elapsed_s": elapsed,
              "targets": {**TARGETS, "rendered": a.min_rendered},
              "summary": summary(rows, a.max_calls), "attacks": rows}
    print(table(rows))
    s = result["summary"]
    print(f"{s['attacks']} attacks in {elapsed:.0f} s: {s['crashes']} crashes, slowest /health "
          f"{common.fmt(s['health_max_ms'])} ms, RSS growth {common.fmt(s['rss_growth_mb'])} MB, "
          f"{s['calls_under_min_rendered']} calls under {a.min_rendered:.0%} rendered, "
          f"{'PASS' if s['passed'] else 'FAIL'}")
    if a.json:
        common.write_json(a.json, result)
    if a.png:
        plot(rows, a.png)
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
