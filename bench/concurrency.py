"""Several calls on one receiver: do they all keep their frame rate?

Usage:
  python -m bench.concurrency [--calls 4] [--frames 300] [--fps 30] [--weights PATH] [--json OUT] [--png PLOT]

Starts one receiver (clock playout) and N senders on 127.0.0.1. The senders replay keypoints
recorded from the bundled clip (``sender --replay-keypoints``), frame the centre square and never
refresh their source, so that N keypoint detectors, face detectors and refresh renders do not
compete with the receiver for this machine's CPU: in a real deployment each sender is another machine.

Reports, per call, rendered fps and stalls (gaps > 100 ms between rendered frames) over the
**window when every call was up** (from ``--settle-s`` after the last call's first frame to the first
call's last), the same over each whole call, real vs concealed frames, and how many frames the
receiver rendered together on average (``--max-batch``). The window leaves out the senders' start-up
(seconds of CPU each) and each call's first fraction of a second, when its clock playout shows its
first frame while the jitter buffer fills (a 80-150 ms gap in every call, concurrent or alone:
seen in frames logs of 4-call runs, the receiver's event loop idle meanwhile); the whole-call
columns keep both.
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
    except Exception:  # it never started: nothing to kill
        return
    proc.kill()
    proc.wait()


# what the senders leave out, standing in for other machines (see the module doc)
LIGHT_SENDER = ["--framing", "centre", "--refresh", "off"]
STALL_S = 0.1
SETTLE_S = 0.5  # a call's playout start-up (first frame held while the buffer fills), see the module doc


def _render_times(path: Path) -> np.ndarray:
    """Seconds (wall clock) at which a call's frames were rendered (not shown again) from its frames log."""
    with np.load(path) as z:
        return z["rendered_us"][~z["repeated"]].astype(np.float64) / 1e6


def overlap(renders: list[np.ndarray], settle_s: float = 0.0) -> tuple[float, float] | None:
    """The window when every call was rendering: ``settle_s`` after the last first frame, to the first
    last frame (None if there is none)."""
    if not renders or any(len(t) < 2 for t in renders):
        return None
    start, end = max(t[0] for t in renders) + settle_s, min(t[-1] for t in renders)
    return (start, end) if end > start else None


def window_stats(times: np.ndarray, window: tuple[float, float] | None) -> dict[str, Any]:
    """Rendered fps and stalls (gaps > 100 ms) of one call within ``window``."""
    if window is None:
        return {"fps": None, "stalls": 0}
    t = times[(times >= window[0]) & (times <= window[1])]
    gaps = np.diff(t)
    return {"fps": (len(t) - 1) / (window[1] - window[0]) if len(t) > 1 else 0.0,
            "stalls": int((gaps > STALL_S).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--weights", default=None)
    p.add_argument("--max-batch", type=int, default=4,
                   help="the receiver's --max-batch (1: every frame rendered on its own, as before batching)")
    p.add_argument("--render-workers", type=int, default=None,
                   help="the receiver's --render-workers (default: its own; 1: one frame at a time, as before)")
    p.add_argument("--settle-s", type=float, default=SETTLE_S,
                   help="seconds after the last call's first frame before the all-up window starts")
    p.add_argument("--clip", default=str(ROOT / "assets" / "demo_face.mp4"))
    p.add_argument("--keep", metavar="DIR", help="keep the receiver's log, stats and frames logs in DIR")
    p.add_argument("--json")
    p.add_argument("--png")
    a = p.parse_args(argv)
    if a.settle_s < 0:
        p.error("--settle-s must be >= 0")
    weights = common.resolve_weights(a.weights)
    py = [sys.executable, "-m"]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(1) as pool:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # The receiver under test starts (seconds: imports, model, render timing) while the keypoints
        # are recorded; nothing is measured before both are done.
        port = free_port()
        workers = ["--render-workers", str(a.render_workers)] if a.render_workers else []
        starting = pool.submit(start_receiver, ["--port", str(port), "--weights", str(weights), "--max-batch",
                                                str(a.max_batch), *workers, "--max-calls",
                                                str(a.calls), "--stop-after-calls", str(a.calls), "--stats-dir",
                                                str(work), "--frames-log", str(work / "frames.npz")],
                               log_path=work / "receiver.log")
        # keypoints of the clip, recorded once by a real sender into a throwaway receiver (in real
        # time: no more of the clip than the calls will replay, since the replay loops what there is)
        try:
            rec_port = free_port()
            rec = start_receiver(["--port", str(rec_port), "--weights", str(weights), "--playout", "immediate",
                                  "--stop-after-calls", "1"])
            subprocess.run(py + ["sender", "--receiver", f"http://127.0.0.1:{rec_port}", "--video", a.clip,
                                 "--weights", str(weights), "--max-frames", str(a.frames), "--truth-out",
                                 str(work / "kp.npz"), *LIGHT_SENDER], cwd=ROOT, check=True, capture_output=True)
            stop(rec, 30)
        except BaseException:
            _abandon(starting)  # it would wait for calls that never come
            raise
        rec = starting.result()
        senders = [subprocess.Popen(py + ["sender", "--receiver", f"http://127.0.0.1:{port}", "--video", a.clip,
                                          "--loop", "--max-frames", str(a.frames), "--fps", str(a.fps),
                                          "--weights", str(weights), "--replay-keypoints", str(work / "kp.npz"),
                                          *LIGHT_SENDER, "--pacing", "off", "--threads", "1"],
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for _ in range(a.calls)]
        codes = [s.wait(timeout=120 + 2 * a.frames / a.fps) for s in senders]
        stop(rec, 60)
        # call_<n>.json and its frames log (frames.npz, frames_2.npz, ...: receiver --frames-log)
        ended = [n for n in range(1, a.calls + 1) if (work / f"call_{n}.json").exists()]
        calls = [json.loads((work / f"call_{n}.json").read_text()) for n in ended]
        renders = [_render_times(work / ("frames.npz" if n == 1 else f"frames_{n}.npz")) for n in ended]
    window = overlap(renders, a.settle_s)
    in_window = [window_stats(t, window) for t in renders]
    rows: list[dict[str, Any]] = [{
        "call": c["call_id"], "fps_all_up": w["fps"], "stalls_all_up": w["stalls"],
        "rendered_fps": c["rendered_fps"], "stalls": c["stalls"], "max_gap_ms": c["max_gap_ms"],
        "real": c["frames_real"], "concealed": c["frames_concealed"], "interpolated": c["frames_interpolated"],
        "predicted": c["frames_predicted"],
        "render_ms_p50": c["render_ms_p50"], "batch_mean": c.get("render_batch_mean"),
        "latency_ms_p50": c["latency_ms_p50"],
        "latency_ms_p95": c["latency_ms_p95"]} for c, w in zip(calls, in_window, strict=True)]
    result = {"calls": a.calls, "fps": a.fps, "frames": a.frames, "weights": str(weights), "max_batch": a.max_batch,
              "render_workers": a.render_workers, "settle_s": a.settle_s,
              "sender_exit_codes": codes,
              "window_s": (window[1] - window[0]) if window else 0.0,
              "per_call": rows, "min_rendered_fps": min((r["rendered_fps"] or 0) for r in rows) if rows else 0,
              "total_stalls": int(sum(r["stalls"] for r in rows)),
              "min_fps_all_up": min((r["fps_all_up"] or 0) for r in rows) if rows else 0,
              "stalls_all_up": int(sum(r["stalls_all_up"] for r in rows))}
    headers = list(rows[0]) if rows else ["call"]
    print(common.format_table(headers, [[r[h] for h in headers] for r in rows]))
    print(f"{a.calls} calls at {a.fps:.0f} fps, max batch {a.max_batch}, render workers "
          f"{a.render_workers or 'default'}: while all were up "
          f"(from {a.settle_s:g} s after the last one's first frame) "
          f"({result['window_s']:.1f} s) min rendered fps {result['min_fps_all_up']:.1f}, stalls "
          f"{result['stalls_all_up']}; over whole calls min {result['min_rendered_fps']:.1f} fps, "
          f"stalls {result['total_stalls']}")
    if a.json:
        common.write_json(a.json, result)
    if a.png:
        fig, ax = common.new_figure(6, 3.5)
        ax.bar(np.arange(len(rows)), [r["fps_all_up"] or 0 for r in rows])
        ax.axhline(a.fps, color="k", ls="--", label="call fps")
        ax.set_xlabel("call")
        ax.set_ylabel("rendered fps, all calls up")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=120)
    return 0 if all(c == 0 for c in codes) and len(rows) == a.calls else 1


if __name__ == "__main__":
    sys.exit(main())
