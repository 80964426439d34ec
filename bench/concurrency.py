"""Several calls on one receiver: do they all keep their frame rate?

Usage:
  python -m bench.concurrency [--calls 4] [--frames 300] [--fps 30] [--weights PATH] [--json OUT] [--png PLOT]

Starts one receiver (clock playout) and N senders on 127.0.0.1. The senders replay keypoints
recorded from the bundled clip (``sender --replay-keypoints``) so that N keypoint detectors do not
compete with the receiver for this machine's CPU: in a real deployment each sender is another machine.
Reports, per call, rendered fps, stalls (gaps > 100 ms between rendered frames), and real vs concealed frames.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.calls import free_port, start_receiver, stop

ROOT = Path(__file__).resolve().parents[1]


def _abandon(starting: Future[subprocess.Popen]) -> None:
    """Kill a receiver that was being started, once it has (or has failed to)."""
    try:
        proc = starting.result()
    except Exception:  # noqa: BLE001 - it never started: nothing to kill
        return
    proc.kill()
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--weights", default=None)
    p.add_argument("--clip", default=str(ROOT / "assets" / "demo_face.mp4"))
    p.add_argument("--json")
    p.add_argument("--png")
    a = p.parse_args(argv)
    weights = common.resolve_weights(a.weights)
    py = [sys.executable, "-m"]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1) as pool:
        work = Path(tmp)
        # The receiver under test starts (seconds: imports, model, render timing) while the keypoints
        # are recorded; nothing is measured before both are done.
        port = free_port()
        starting = pool.submit(start_receiver, ["--port", str(port), "--weights", str(weights), "--max-calls",
                                                str(a.calls), "--stop-after-calls", str(a.calls), "--stats-dir",
                                                str(work)], log_path=work / "receiver.log")
        # keypoints of the clip, recorded once by a real sender into a throwaway receiver (in real
        # time: no more of the clip than the calls will replay, since the replay loops what there is)
        try:
            rec_port = free_port()
            rec = start_receiver(["--port", str(rec_port), "--weights", str(weights), "--playout", "immediate",
                                  "--stop-after-calls", "1"])
            subprocess.run(py + ["sender", "--receiver", f"http://127.0.0.1:{rec_port}", "--video", a.clip,
                                 "--weights", str(weights), "--max-frames", str(a.frames), "--truth-out",
                                 str(work / "kp.npz")], cwd=ROOT, check=True, capture_output=True)
            stop(rec, 30)
        except BaseException:
            _abandon(starting)  # it would wait for calls that never come
            raise
        rec = starting.result()
        senders = [subprocess.Popen(py + ["sender", "--receiver", f"http://127.0.0.1:{port}", "--video", a.clip,
                                          "--loop", "--max-frames", str(a.frames), "--fps", str(a.fps),
                                          "--weights", str(weights), "--replay-keypoints", str(work / "kp.npz")],
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for _ in range(a.calls)]
        codes = [s.wait(timeout=120 + 2 * a.frames / a.fps) for s in senders]
        stop(rec, 60)
        calls = [json.loads(f.read_text()) for f in sorted(work.glob("call_*.json"))]
    rows: list[dict[str, Any]] = [{
        "call": c["call_id"], "rendered_fps": c["rendered_fps"], "stalls": c["stalls"], "max_gap_ms": c["max_gap_ms"],
        "real": c["frames_real"], "concealed": c["frames_concealed"], "interpolated": c["frames_interpolated"],
        "predicted": c["frames_predicted"],
        "render_ms_p50": c["render_ms_p50"], "latency_ms_p50": c["latency_ms_p50"],
        "latency_ms_p95": c["latency_ms_p95"]} for c in calls]
    result = {"calls": a.calls, "fps": a.fps, "frames": a.frames, "weights": str(weights), "sender_exit_codes": codes,
              "per_call": rows, "min_rendered_fps": min((r["rendered_fps"] or 0) for r in rows) if rows else 0,
              "total_stalls": int(sum(r["stalls"] for r in rows))}
    headers = list(rows[0]) if rows else ["call"]
    print(common.format_table(headers, [[r[h] for h in headers] for r in rows]))
    print(f"{a.calls} calls at {a.fps:.0f} fps: min rendered fps {result['min_rendered_fps']:.1f}, "
          f"stalls {result['total_stalls']}")
    if a.json:
        common.write_json(a.json, result)
    if a.png:
        fig, ax = common.new_figure(6, 3.5)
        ax.bar(np.arange(len(rows)), [r["rendered_fps"] or 0 for r in rows])
        ax.axhline(a.fps, color="k", ls="--", label="call fps")
        ax.set_xlabel("call")
        ax.set_ylabel("rendered fps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
    return 0 if all(c == 0 for c in codes) and len(rows) == a.calls else 1


if __name__ == "__main__":
    sys.exit(main())
