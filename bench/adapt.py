"""The render tier adapting during one call while the receiver's CPU is taken away and given back.

Usage (root, for the CPU quota):
  python -m bench.adapt [--share 0.5] [--phases 10 20 30] [--fps 30] [--start 256]
      [--json out/bench/adapt.json] [--png out/bench/adapt.png]

A receiver (``--size START --adapt``) and a sender (bundled clip, looped, ``--fps``) on
127.0.0.1. The call runs three phases of ``--phases`` seconds: unlimited, the receiver under a
CPU quota of ``--share`` of one core (``bench.cpuquota``), unlimited again. ``/stats`` is sampled
every 0.5 s; reported per phase: rendered fps, the tier(s) rendered at, and the tier changes the
receiver made (time, from, to, reason, load), plus the call's stalls (gaps > 100 ms) from its
final stats. What to expect: the tier steps down within a few seconds of the quota and back up
some seconds after it is lifted (the step up waits 8 s of headroom by design).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import cpuquota
from bench.calls import env, free_port, start_receiver, stop
from bench.common import format_table, new_figure, write_json

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "assets" / "demo_face.mp4"
DETECTOR = ROOT / "models" / "weights" / "fomm_face64.pt"


def _active(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())["active"]


def run(share: float, phases: list[float], fps: float, start: int, work: Path) -> dict[str, Any]:
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    recv = start_receiver(["--port", str(port), "--size", str(start), "--adapt", "--max-calls", "1",
                           "--stats-dir", str(work), "--stop-after-calls", "1"], log_path=work / "receiver.log",
                          timeout_s=180)
    total = sum(phases) + 5
    send = subprocess.Popen([sys.executable, "-m", "sender", "--receiver", f"http://127.0.0.1:{port}",
                             "--video", str(CLIP), "--weights", str(DETECTOR), "--loop", "--fps", str(fps),
                             "--max-frames", str(int(total * fps))], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=open(work / "sender.log", "w"))  # noqa: SIM115
    samples: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(c["frames_rendered"] > 0 for c in _active(port)):
            time.sleep(0.2)
        t0 = time.monotonic()
        with cpuquota.cpu_quota(recv.pid, None) as quota:
            bounds = [sum(phases[:i + 1]) for i in range(len(phases))]
            phase = 0
            while phase < len(phases):
                t = time.monotonic() - t0
                if t >= bounds[phase]:
                    phase += 1
                    if phase < len(phases):
                        quota.set(share if phase == 1 else None)
                        log.info("phase %d: quota %s", phase, share if phase == 1 else "none")
                    continue
                calls = _active(port)
                if calls:
                    c = calls[0]
                    samples.append({"t": t, "phase": phase, "frames_rendered": c["frames_rendered"],
                                    "render_size": c["render_size"]})
                time.sleep(0.5)
    finally:
        send.terminate()
        send.wait(20)
        stop(recv, 60)
    call = json.loads((work / "call_1.json").read_text())
    rows = []
    for i, secs in enumerate(phases):
        ps = [s for s in samples if s["phase"] == i]
        fps_phase = ((ps[-1]["frames_rendered"] - ps[0]["frames_rendered"]) / (ps[-1]["t"] - ps[0]["t"])
                     if len(ps) > 1 and ps[-1]["t"] > ps[0]["t"] else None)
        rows.append({"phase": i, "seconds": secs, "quota": share if i == 1 else None, "rendered_fps": fps_phase,
                     "tiers": sorted({s["render_size"] for s in ps if s["render_size"]})})
    return {"share": share, "phases": phases, "fps": fps, "start": start, "rows": rows, "samples": samples,
            "tier_changes": call.get("tier_changes", []), "stalls": call.get("stalls"),
            "max_gap_ms": call.get("max_gap_ms"), "frames_rendered": call.get("frames_rendered"),
            "end_reason": call.get("end_reason")}


def table(res: dict[str, Any]) -> str:
    a = format_table(["phase", "seconds", "CPU quota", "rendered fps", "tiers"],
                     [[r["phase"], r["seconds"], r["quota"] if r["quota"] else "none", r["rendered_fps"],
                       " ".join(map(str, r["tiers"]))] for r in res["rows"]])
    b = format_table(["t s (call)", "from", "to", "reason", "load"],
                     [[c["t_s"], c["from"], c["to"], c["reason"], c["load"]] for c in res["tier_changes"]])
    return f"{a}\n\ntier changes:\n{b}\n\nstalls (> 100 ms): {res['stalls']}, longest gap {res['max_gap_ms']} ms"


def plot(res: dict[str, Any], path: str | Path) -> None:
    fig, ax = new_figure(9, 4)
    s = res["samples"]
    ax.step([x["t"] for x in s], [x["render_size"] for x in s], where="post", label="render tier")
    ax.set_ylabel("render tier (px)")
    ax.set_xlabel("s since the call rendered")
    b = res["phases"][0]
    ax.axvspan(b, b + res["phases"][1], color="tab:red", alpha=0.15, label=f"CPU quota {res['share']:g} core")
    ax2 = ax.twinx()
    t = [x["t"] for x in s]
    f = [0.0] + [(s[i]["frames_rendered"] - s[i - 1]["frames_rendered"]) / max(1e-6, s[i]["t"] - s[i - 1]["t"])
                 for i in range(1, len(s))]
    ax2.plot(t, f, color="tab:green", lw=1, label="rendered fps")
    ax2.set_ylabel("rendered fps")
    ax.legend(loc="lower left")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.adapt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--share", type=float, default=0.5, help="CPU quota in the middle phase, cores")
    p.add_argument("--phases", type=float, nargs=3, default=[10.0, 20.0, 30.0], help="seconds of each phase")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--start", type=int, default=256, choices=[64, 128, 256])
    p.add_argument("--workdir", default="out/bench/adapt_work")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not cpuquota.available():
        print("bench.adapt: needs root and a writable cpu cgroup controller", file=sys.stderr)
        return 2
    res = run(a.share, a.phases, a.fps, a.start, Path(a.workdir))
    print(table(res))
    if a.json:
        write_json(a.json, res)
    if a.png:
        plot(res, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
