"""A two-way call (``python -m kpcast call``) between two network namespaces: what each direction got.

Usage:
  sudo .venv/bin/python -m bench.two_way [--frames 300] [--fps 30] [--size auto] [--codec pred]
      [--refine-regions auto|off] [--views GRAB.jpg] [--json OUT] [--png OUT]

The listening side runs in host ``a``, the calling side in host ``b`` (``bench.netns.two_hosts``: a
clean veth link), each with the README's defaults and a file as its camera: the bundled clip on one
side, its mirror image on the other, ``--frames`` frames at ``--fps``, ``--sink null``. Both sides share
this machine's cores, so each has about half of them: harsher than a real call between two machines.

Per direction (sender → the side that shows it), from both sides' ``--stats-json``:
- ``fps``: new frames rendered per second (``rendered_fps``), ``shown``: frames rendered, ``stalls``
  (gaps > 100 ms between rendered frames), ``> 200 ms``: those over 200 ms (from each side's
  ``--frames-log``), ``max gap``;
- ``latency`` p50 / p95 (capture at the sender → rendered; one host clock);
- ``kbps``: the sender's keypoint message bytes + 95 B a message over the media duration;
- ``extract_ms``: the sender's keypoint extraction p50; ``render_ms``: the renderer's p50;
- the tier the showing side started at and ended at, and its tier changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.common import format_table, new_figure, write_json
from bench.netns import NetnsUnavailable, require_root, two_hosts
from shared.kpvector import TRANSPORT_OVERHEAD_B

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "assets" / "demo_face.mp4"
PORT = 8080  # fresh namespaces: nothing else listens there
TOKEN = "bench-two-way"
READY = "kpcast: waiting for a call"


def mirrored_clip(src: Path, dst: Path, frames: int | None = None) -> Path:
    """``src`` (its first ``frames`` frames) flipped left-right: another face for the other side (a source
    image that crossed the wrong way shows in the hashes)."""
    cap = cv2.VideoCapture(str(src))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    out = None
    n = 0
    while frames is None or n < frames:
        n += 1
        ok, frame = cap.read()
        if not ok:
            break
        if out is None:
            out = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frame.shape[1], frame.shape[0]))
        out.write(np.ascontiguousarray(frame[:, ::-1]))
    cap.release()
    if out is None:
        raise SystemExit(f"cannot read {src}")
    out.release()
    return dst


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_WAIT_POLICY"] = "PASSIVE"
    e["PYTHONPATH"] = str(ROOT)
    return e


def run(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    other = mirrored_clip(Path(a.clip), work / "mirrored.mp4")
    def sink(side: str) -> list[str]:  # each side's own view (the other large, itself small) to a file, or nowhere
        return ["--sink", f"file:{(work / f'{side}_view.mp4').resolve()}" if a.views else "null"]

    common = ["--loop", "--max-frames", str(a.frames), "--fps", str(a.fps), "--token", TOKEN,
              "--codec", a.codec, "--refine-regions", a.refine_regions,
              *(["--threads", str(a.threads)] if a.threads else []),
              *(["--send-nice", str(a.send_nice)] if a.send_nice is not None else []),
              *(["--weights", a.weights] if a.weights else ["--size", str(a.size)])]
    with two_hosts() as h, open(work / "listener.log", "w") as llog:
        listen = [sys.executable, "-m", "kpcast", "call", "--listen", "--host", h.addr_a, "--port", str(PORT),
                  "--video", str(a.clip), "--stats-json", str(work / "listener.json"),
                  "--frames-log", str(work / "listener_frames.npz"), *sink("listener"), *common]
        lp = h.popen("a", listen, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=llog, text=True)
        try:
            deadline = time.monotonic() + 120
            assert lp.stdout is not None
            while READY not in (lp.stdout.readline() or ""):
                if lp.poll() is not None or time.monotonic() > deadline:
                    tail = (work / "listener.log").read_text()[-2000:]
                    raise RuntimeError(f"the listening side did not start: {tail}")
            connect = [sys.executable, "-m", "kpcast", "call", "--connect", f"http://{h.addr_a}:{PORT}",
                       "--video", str(other), "--stats-json", str(work / "connector.json"),
                       "--frames-log", str(work / "connector_frames.npz"), *sink("connector"), *common]
            with open(work / "connector.log", "w") as clog:
                cp = h.popen("b", connect, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=clog)
                cp.wait(a.frames / a.fps * 4 + 120)
            lp.wait(60)
        finally:
            for p in (lp, locals().get("cp")):
                if p is not None and p.poll() is None:
                    p.kill()
    sides = {n: json.loads((work / f"{n}.json").read_text()) for n in ("listener", "connector")}
    rows = []
    for sender, shower in (("listener", "connector"), ("connector", "listener")):
        sent, got = sides[sender]["sent"], sides[shower]["received"]
        media_s = sent.get("frames_captured", 0) / a.fps if a.fps else 0.0
        wire = sent.get("keypoint_message_bytes", 0) + TRANSPORT_OVERHEAD_B * sent.get("messages_sent", 0)
        changes = got.get("tier_changes") or []
        rows.append({
            "direction": f"{sender} -> {shower}",
            "frames_sent": sent.get("frames_sent"), "frames_captured": sent.get("frames_captured"),
            "shown": got.get("frames_rendered"), "fps": got.get("rendered_fps"), "stalls": got.get("stalls"),
            "latency_ms_p50": got.get("latency_ms_p50"), "latency_ms_p95": got.get("latency_ms_p95"),
            "kbps": wire * 8 / 1000 / media_s if media_s else None,
            "extract_ms_p50": sent.get("extract_ms_p50"), "render_ms_p50": got.get("render_ms_p50"),
            "tier_start": changes[0].get("from") if changes else got.get("render_size"),
            "tier_end": got.get("render_size"), "tier_changes": len(changes),
            "regions": got.get("regions"), "max_gap_ms": got.get("max_gap_ms"),
            "stalls_over_200ms": _long_gaps(work / f"{shower}_frames.npz", 200.0),
            "source_match": bool(got.get("source_sha256")) and got.get("source_sha256") == sent.get("source_sha256"),
        })
    return {"frames": a.frames, "fps": a.fps, "size": a.size, "codec": a.codec, "refine_regions": a.refine_regions,
            "directions": rows, "exit_codes": {n: s["exit_code"] for n, s in sides.items()},
            "ended_by": {n: s["ended_by"] for n, s in sides.items()}}


def view_grab(work: Path, out: str, at: float = 0.6) -> None:
    """One frame of each side's view file (``--views``), side by side, each labelled with its side."""
    tiles = []
    for side in ("listener", "connector"):
        cap = cv2.VideoCapture(str(work / f"{side}_view.mp4"))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.set(cv2.CAP_PROP_POS_FRAMES, max(0, int(n * at)))
        ok, frame = cap.read()
        cap.release()
        if not ok:
            raise RuntimeError(f"no frames in {side}_view.mp4")
        frame = cv2.copyMakeBorder(frame, 28, 0, 0, 0, cv2.BORDER_CONSTANT, value=(255, 255, 255))
        cv2.putText(frame, f"{side}'s window", (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(frame)
    h = min(t.shape[0] for t in tiles)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(out, np.concatenate([t[:h] for t in tiles], 1), [cv2.IMWRITE_JPEG_QUALITY, 85])


def _long_gaps(frames_log: Path, over_ms: float) -> int | None:
    """Gaps longer than ``over_ms`` between two newly rendered frames in a call's frames log (repeats of the
    last picture do not end a gap); None without the log."""
    if not frames_log.exists():
        return None
    with np.load(frames_log) as f:
        shown = f["rendered_us"][~f["repeated"]]
    return int((np.diff(shown) > over_ms * 1000).sum())


COLS = [("direction", "direction"), ("shown", "shown"), ("fps", "fps"), ("stalls", "stalls"),
        ("> 200 ms", "stalls_over_200ms"), ("max gap ms", "max_gap_ms"),
        ("lat p50", "latency_ms_p50"), ("lat p95", "latency_ms_p95"), ("kbps", "kbps"),
        ("extract ms", "extract_ms_p50"), ("render ms", "render_ms_p50"), ("tier start", "tier_start"),
        ("tier end", "tier_end"), ("changes", "tier_changes"), ("source ok", "source_match")]


def plot(res: dict[str, Any], path: str) -> None:
    fig, ax = new_figure(7, 4)
    rows = res["directions"]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["fps"] or 0 for r in rows], 0.4, label="fps shown")
    ax2 = ax.twinx()
    ax2.bar(x + 0.2, [r["latency_ms_p50"] or 0 for r in rows], 0.4, color="tab:orange", label="latency p50 (ms)")
    ax.axhline(res["fps"], color="k", ls="--", lw=1)
    ax.set_xticks(x, [r["direction"] for r in rows])
    ax.set_ylabel("frames shown per second")
    ax2.set_ylabel("latency p50, ms")
    ax.set_title(f"two-way call, {res['frames']} frames at {res['fps']:g} fps, both sides on one machine")
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.two_way", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--size", default="auto", help="kpcast call --size on both sides")
    p.add_argument("--weights", help="kpcast call --weights on both sides (instead of --size)")
    p.add_argument("--codec", default="pred", choices=["pred", "q8", "f16"])
    p.add_argument("--send-nice", type=int, help="kpcast call --send-nice on both sides (default: kpcast's)")
    p.add_argument("--threads", type=int, default=0, help="kpcast call --threads (the renderer's) on both sides; "
                   "0: its default")
    p.add_argument("--refine-regions", default="auto", help="kpcast call --refine-regions on both sides")
    p.add_argument("--clip", default=str(CLIP))
    p.add_argument("--workdir", default="out/bench/two_way_work")
    p.add_argument("--views", help="also write each side's view (the other large, itself small) to the work folder "
                                   "and one frame of both, side by side, to this .jpg")
    p.add_argument("--json")
    p.add_argument("--png")
    a = p.parse_args(argv)
    try:
        require_root()
    except NetnsUnavailable as e:
        print(f"bench.two_way: needs network namespaces: {e}", file=sys.stderr)
        return 2
    res = run(a, Path(a.workdir))
    print(f"\ntwo-way call between two namespaces on this machine: {a.frames} frames at {a.fps:g} fps each way, "
          f"--size {a.size}, --codec {a.codec}, --refine-regions {a.refine_regions}")
    print(format_table([c[0] for c in COLS], [[r.get(k) for _, k in COLS] for r in res["directions"]]))
    print(f"exit codes {res['exit_codes']}, ended by {res['ended_by']}")
    if a.json:
        write_json(a.json, res)
    if a.png:
        plot(res, a.png)
    if a.views:
        view_grab(Path(a.workdir), a.views)
    return 0 if all(c == 0 for c in res["exit_codes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
