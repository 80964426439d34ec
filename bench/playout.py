"""Playout over a real impaired network: a call between two namespaces through loss + delay + jitter.

Usage:
  sudo .venv/bin/python -m bench.playout [--loss 0.1] [--jitter-ms 50] [--delay-ms 40]
      [--forecaster linear] [--kp-every 1] [--lookahead-ms 0] [--frames 300] [--fps 30]
      [--weights PATH] [--json OUT] [--png PLOT] [--sweep]

Each condition builds ``bench.netns.impaired_link`` (receiver in host ``a``, sender in host
``b``, every packet in both directions through an nftables loss rule and a user-space
delay/jitter bridge), runs the real ``python -m receiver`` (clock playout, ``--frames-log``)
and ``python -m sender`` (bundled clip looped to ``--frames`` frames at ``--fps``,
``--truth-out``), and tears everything down again, also on errors. ``--sweep`` runs loss 0,
5 % and 10 % (``--jitter-ms``/``--delay-ms``), then decimation k=2 and render-ahead 40 ms at
10 % loss, and prints one table.

What is reported per condition (JSON keys in brackets):

- Frame counts from the receiver's call stats and frames log: rendered, real, concealed,
  interpolated, repeated (playout holds), late and dropped (playout), lost on the wire.
- ``rendered_fps``: new frames shown per second between the first and the last (repeated holds
  excluded; a frame whose keypoints are the picture's on screen is shown without a render, ``reused``,
  and counts); ``stalls``: gaps > 100 ms between new frames shown.
- ``target_delay_ms_p50``: the jitter buffer's target delay over the rendered frames.
- ``latency_ms_p50/p95``: glass-to-glass, sender capture time -> shown (all new frames shown, reused
  ones included; both ends share the host clock, namespaces don't change it).
- Keypoint error (mean distance over the 10 keypoints, [-1, 1] units) of what was rendered
  against the sender's true keypoints of that seq: per kind, and for the concealed seqs also
  what repeat-last would have given on the same seqs (the true keypoints of the last seq
  rendered as ``real`` before it, i.e. the last real keypoints the receiver had shown).
- With ``--lookahead-ms``: every shown frame is ``L`` seqs ahead of the playout point;
  ``lookahead_kp_error`` is its error vs the truth of its seq, ``lookahead_stale_kp_error`` what
  showing the playout-point frame instead would cost at the same moment (truth[s-L] vs truth[s]).
- ``kp_wire_kbps``: sender keypoint message bytes + 95 B/message overhead, over the media
  duration (frames / fps).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.calls import stop, wait_ready
from bench.common import format_table, new_figure, write_json
from bench.netns import NetnsUnavailable, impaired_link, netns_popen, require_root
from receiver.session import DEFAULT_FORECASTER, DEFAULT_MAX_DELAY_MS
from shared.kpvector import TRANSPORT_OVERHEAD_B

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = ROOT / "assets" / "demo_face.mp4"
STALL_S = 0.1
SHORT_RUN = 5  # concealed frames at the start of a concealment run that count as a "short gap"
PORT = 8080  # each condition has fresh namespaces, so a fixed port never collides
N_COORD = 20


@dataclass(frozen=True)
class Condition:
    name: str
    loss: float = 0.1
    delay_ms: float = 40.0
    jitter_ms: float = 50.0
    forecaster: str = DEFAULT_FORECASTER
    kp_every: int = 1
    lookahead_ms: float = 0.0
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS  # the receiver's --max-delay-ms (1000: buffered playout)


def kp_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise mean Euclidean distance over the 10 keypoints; (N,60) x (N,60) -> (N,)."""
    d = (np.asarray(a, np.float64)[..., :N_COORD] - np.asarray(b, np.float64)[..., :N_COORD])
    d = d.reshape(*d.shape[:-1], -1, 2)
    return np.sqrt((d * d).sum(-1)).mean(-1)


def _mean(x: np.ndarray | list[float]) -> float | None:
    x = np.asarray(x, np.float64)
    return float(x.mean()) if x.size else None


def _pct(x: np.ndarray | list[float], q: float) -> float | None:
    x = np.asarray(x, np.float64)
    return float(np.percentile(x, q)) if x.size else None


# --------------------------------------------------------------------------- analysis (no root needed)

def analyse(frames: dict[str, np.ndarray], truth: dict[str, np.ndarray], call: dict[str, Any],
            sender: dict[str, Any], cond: Condition, fps: float) -> dict[str, Any]:
    """Metrics of one call from the receiver's frames log + call stats and the sender's truth + stats."""
    kinds = [str(k) for k in frames["kinds"]]
    shown = ~frames["repeated"].astype(bool)
    seq = frames["seq"][shown].astype(np.int64)
    kind = np.array([kinds[int(k)] for k in frames["kind"][shown]], dtype=object)
    vec = frames["vector"][shown]
    look = frames["lookahead"][shown].astype(np.int64)
    tmap = {int(s): i for i, s in enumerate(truth["seq"])}
    tv = truth["vectors"].astype(np.float32)

    def truth_of(seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.array([tmap.get(int(s), -1) for s in seqs], dtype=np.int64)
        return idx >= 0, tv[np.clip(idx, 0, None)] if len(idx) else np.zeros((0, tv.shape[1]), np.float32)

    has, tvec = truth_of(seq)
    err = np.full(len(seq), np.nan)
    if has.any():
        err[has] = kp_error(vec[has], tvec[has])
    out: dict[str, Any] = {"shown_kp_error": _mean(err[has])}  # every shown frame, whatever its kind
    counts = {k: int((kind == k).sum()) for k in ("real", "concealed", "interpolated", "predicted")}
    for k in counts:
        m = (kind == k) & has
        out[f"{k}_kp_error"] = _mean(err[m])
        out[f"{k}_kp_error_n"] = int(m.sum())
    # Real frames right after a concealment carry a fading correction (the blend), so their
    # error depends on how much was concealed; the unblended ones are the wire's own error.
    blend = frames["blend"][shown] if "blend" in frames else np.zeros(len(seq), np.float32)
    m = (kind == "real") & has & (blend == 0)
    out["real_unblended_kp_error"] = _mean(err[m])
    out["real_unblended_kp_error_n"] = int(m.sum())

    # Repeat-last on the same concealed seqs: the truth of the last seq shown as real before it.
    # Only meaningful without render-ahead (then every shown frame is a playout-point frame).
    # ``run_pos`` is the frame's position in its run of consecutive concealed frames: forecasting
    # is meant for short gaps, so the first SHORT_RUN frames of each run are also reported apart.
    rl_err, fc_err, run_pos = [], [], []
    if cond.lookahead_ms <= 0:
        last_real: int | None = None
        pos = 0
        for i in range(len(seq)):
            pos = pos + 1 if kind[i] == "concealed" else 0
            if kind[i] == "real":
                last_real = int(seq[i])
            elif kind[i] == "concealed" and last_real is not None and has[i] and last_real in tmap:
                rl_err.append(float(kp_error(tv[tmap[last_real]][None], tvec[i][None])[0]))
                fc_err.append(float(err[i]))
                run_pos.append(pos)
    short = np.asarray(run_pos) <= SHORT_RUN
    out["concealed_paired_n"] = len(fc_err)
    out["concealed_kp_error_paired"] = _mean(fc_err)
    out["repeat_last_kp_error"] = _mean(rl_err)
    out["concealed_short_n"] = int(short.sum())
    out["concealed_kp_error_short"] = _mean(np.asarray(fc_err)[short]) if short.any() else None
    out["repeat_last_kp_error_short"] = _mean(np.asarray(rl_err)[short]) if short.any() else None
    out["concealed_run_max"] = int(max(run_pos)) if run_pos else 0

    # Render-ahead: every shown frame is L seqs ahead; compare with showing the playout-point truth.
    la = look > 0
    if la.any():
        m = la & has
        out["lookahead_kp_error"] = _mean(err[m])
        out["lookahead_kp_error_n"] = int(m.sum())
        base_has, base_vec = truth_of(seq - look)
        mm = m & base_has
        out["lookahead_stale_kp_error"] = _mean(kp_error(base_vec[mm], tvec[mm])) if mm.any() else None
        out["lookahead_forecast_kp_error"] = _mean(err[m & (kind == "concealed")])
        out["lookahead_frames"] = int(np.median(look[la]))
    else:
        out.update(lookahead_kp_error=None, lookahead_kp_error_n=0, lookahead_stale_kp_error=None,
                   lookahead_forecast_kp_error=None, lookahead_frames=0)

    # Timing from the frames log (wall-clock us, shared by all namespaces of this host).
    rend_s = frames["rendered_us"][shown].astype(np.float64) * 1e-6
    gaps = np.diff(rend_s) if len(rend_s) > 1 else np.zeros(0)
    real_cap = frames["capture_us"][shown][kind == "real"].astype(np.float64) * 1e-6
    real_seq = seq[kind == "real"]
    capture_fps = None
    if len(real_seq) > 2 and real_cap[-1] > real_cap[0]:
        capture_fps = float((real_seq[-1] - real_seq[0]) / (real_cap[-1] - real_cap[0]))
    pl = call.get("playout") or {}
    frames_sent = int(sender.get("frames_sent", 0))
    # the predictive codec sends only frames the receiver cannot predict; the others are decoded
    # by prediction when the next one arrives, so a lost frame is a lost message
    skipped = int(sender.get("frames_skipped", 0))
    lost = (frames_sent - int(call.get("keypoint_messages", 0)) if "frames_skipped" in sender
            else frames_sent - int(call.get("frames_received", 0)))
    last_seq = int(truth["seq"].max()) if len(truth["seq"]) else -1
    # after the sender's last frame the receiver conceals until the Bye (or the transport close)
    # arrives: counted, but apart, since no truth exists for those seqs
    out["concealed_after_end"] = int(((kind == "concealed") & (seq > last_seq)).sum())
    media_s = sender.get("frames_captured", 0) / fps if fps > 0 else 0.0
    wire_bytes = int(sender.get("keypoint_message_bytes", 0)) + TRANSPORT_OVERHEAD_B * int(
        sender.get("messages_sent", 0))
    out.update({
        "frames_captured": int(sender.get("frames_captured", 0)),
        "frames_sent": frames_sent,
        "frames_skipped": skipped,
        "frames_received": int(call.get("frames_received", 0)),
        "frames_lost": lost,
        "rendered": int(call.get("frames_rendered", 0)),
        "rendered_logged": int(shown.sum()),
        "real": counts["real"],
        "concealed": counts["concealed"],
        "interpolated": counts["interpolated"],
        "predicted": counts["predicted"],
        "call_concealed": int(call.get("frames_concealed", 0)),
        "call_interpolated": int(call.get("frames_interpolated", 0)),
        "repeated": int(call.get("frames_repeated", 0)),
        "reused": int(call.get("frames_reused", 0)),
        "late": int(pl.get("late", 0)),
        "dropped": int(pl.get("dropped", 0)) + int(call.get("frames_dropped", 0)),
        "playout_stalls": int(pl.get("stalls", 0)),
        "resyncs": int(pl.get("resyncs", 0)),
        "rendered_fps": call.get("rendered_fps"),
        "stalls": int((gaps > STALL_S).sum()),
        "max_gap_ms": float(gaps.max() * 1000) if len(gaps) else None,
        "target_delay_ms_p50": _pct(frames["target_delay_ms"][shown], 50),
        "target_delay_ms_final": pl.get("target_delay_ms"),
        "latency_ms_p50": call.get("latency_ms_p50"),
        "latency_ms_p95": call.get("latency_ms_p95"),
        "render_ms_p50": call.get("render_ms_p50"),
        "extract_ms_p50": sender.get("extract_ms_p50"),
        "capture_fps_actual": capture_fps,
        "call_fps": fps,
        "media_duration_s": media_s,
        "kp_messages": int(sender.get("messages_sent", 0)),
        "kp_message_bytes": int(sender.get("keypoint_message_bytes", 0)),
        "kp_wire_bytes": wire_bytes,
        "kp_wire_kbps": wire_bytes * 8 / 1000 / media_s if media_s > 0 else None,
        "source_sha256_match": bool(call.get("source_sha256")) and call.get("source_sha256") == sender.get(
            "source_sha256"),
        "end_reason": call.get("end_reason"),
    })
    return out


# --------------------------------------------------------------------------- one call through the link

def _env(threads: int) -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_WAIT_POLICY"] = "PASSIVE"
    e["OMP_NUM_THREADS"] = str(threads)
    e["PYTHONPATH"] = str(ROOT)
    return e


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def run_call(cond: Condition, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One call through a fresh impaired link; returns the analysed metrics (raises on failure)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    with impaired_link(loss=cond.loss, delay_ms=cond.delay_ms, jitter_ms=cond.jitter_ms, seed=a.seed) as link:
        recv_args = [sys.executable, "-m", "receiver", "--host", link.addr_a, "--port", str(PORT),
                     "--weights", str(a.weights), "--playout", "clock", "--forecaster", cond.forecaster,
                     "--lookahead-ms", str(cond.lookahead_ms), "--max-delay-ms", str(cond.max_delay_ms),
                     *([] if a.early_render is None else ["--early-render" if a.early_render else "--no-early-render"]),
                     "--stats-dir", str(work),
                     "--frames-log", str(work / "frames.npz"), "--stop-after-calls", "1",
                     "--threads", str(a.render_threads), "--device", "cpu",
                     # the receiver's side of the sender's --connect-timeout below: it hangs up on a peer
                     # that has sent nothing for its setup timeout (15 s), and a loaded run's data
                     # channels were still not open then
                     "--setup-timeout", "60"]
        rlog = open(work / "receiver.log", "w")  # noqa: SIM115
        recv = netns_popen(link.a, recv_args, cwd=ROOT, env=_env(a.render_threads), stdout=subprocess.PIPE,
                           stderr=rlog, text=True)
        try:
            wait_ready(recv, 60)
            send_args = [sys.executable, "-m", "sender", "--receiver", f"http://{link.addr_a}:{PORT}",
                         "--ice-address", link.addr_b, "--video", str(a.clip), "--loop",
                         # a pre-cropped clip: the whole frame is the picture (bench.call_picture scores it)
                         "--framing", "centre",
                         "--max-frames", str(a.frames), "--fps", str(a.fps), "--weights", str(a.weights),
                         "--threads", str(a.extract_threads),
                         # loss in both directions: the DTLS/SCTP handshakes' retransmissions back off
                         # (1, 2, 4, 8 s), and 15 s once did not suffice on a loaded machine; the bench
                         # measures the call, not how fast a lossy link connects
                         "--connect-timeout", "60",
                         # decimation is a q8 stream's option (the predictive default decides per frame)
                         *(["--codec", "q8", "--kp-every", str(cond.kp_every)] if cond.kp_every > 1 else []),
                         "--truth-out", str(work / "truth.npz"), "--stats-json", str(work / "sender.json")]
            with open(work / "sender.log", "w") as slog:
                send = netns_popen(link.b, send_args, cwd=ROOT, env=_env(a.extract_threads),
                                   stdout=subprocess.DEVNULL, stderr=slog)
                try:
                    rc = send.wait(a.frames / a.fps * 3 + 60)
                except subprocess.TimeoutExpired:
                    stop(send, 0)
                    raise RuntimeError(f"sender did not finish: {_tail(work / 'sender.log')}") from None
            if rc != 0:
                raise RuntimeError(f"sender failed ({rc}): {_tail(work / 'sender.log')}")
            rrc = stop(recv, 30)  # --stop-after-calls 1: it exits by itself after the call's drain
            if rrc != 0:
                raise RuntimeError(f"receiver exited with {rrc}: {_tail(work / 'receiver.log')}")
        finally:
            if recv.poll() is None:
                stop(recv, 0)
            if recv.stdout:
                recv.stdout.close()
            rlog.close()
    call_path = work / "call_1.json"
    if not call_path.exists():
        raise RuntimeError(f"the receiver wrote no call stats: {_tail(work / 'receiver.log')}")
    call = json.loads(call_path.read_text())
    sender = json.loads((work / "sender.json").read_text())
    with np.load(work / "frames.npz") as f:
        frames = {k: f[k] for k in f.files}
    with np.load(work / "truth.npz") as f:
        truth = {k: f[k] for k in f.files}
    res = analyse(frames, truth, call, sender, cond, float(sender.get("fps") or a.fps))
    if a.ssim_size:
        res.update(picture(a, frames, truth))
    res["wall_s"] = time.monotonic() - t0
    # e.g. the clip stopped decoding: the numbers describe a shorter call than asked for
    res["complete"] = res["frames_captured"] == a.frames
    return res


@functools.lru_cache(maxsize=1)  # one model and clip for every condition
def _picture_inputs(clip: str, size: int) -> tuple[Any, np.ndarray]:
    from bench.call_picture import read_clip
    from bench.common import load_model
    from models.fomm.io import weights_for_size

    return load_model(weights_for_size(size))[0], read_clip(clip, size)


def picture(a: argparse.Namespace, frames: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, Any]:
    """The call's picture re-rendered offline at ``--ssim-size`` (bench.call_picture)."""
    from bench.call_picture import score_call

    model, clip = _picture_inputs(str(a.clip), a.ssim_size)
    return score_call(model, clip, frames, truth, expression=a.ssim_size == 256)


# --------------------------------------------------------------------------- CLI

def conditions(a: argparse.Namespace) -> list[Condition]:
    base = Condition("", a.loss, a.delay_ms, a.jitter_ms, a.forecaster, a.kp_every, a.lookahead_ms, a.max_delay_ms)
    if a.delay_targets:
        links = [("", base)]
        if a.clean:
            links.append(("clean ", replace(base, loss=0.0, delay_ms=0.0, jitter_ms=0.0)))
        return [replace(link, name=f"{pre}max {t:g} ms" + (f" {f}" if a.forecasters else ""), max_delay_ms=t,
                        forecaster=f)
                for pre, link in links for f in (a.forecasters or [a.forecaster]) for t in a.delay_targets]
    if not a.sweep:
        name = f"loss{a.loss:.0%} k{a.kp_every} la{a.lookahead_ms:g}"
        return [replace(base, name=f"{name} max{a.max_delay_ms:g}")]
    plain = replace(base, kp_every=1, lookahead_ms=0.0)
    out = [replace(plain, name=f"loss {p:.0%}", loss=p) for p in (0.0, 0.05, 0.10)]
    out.append(replace(plain, name="loss 10% k=2", loss=0.10, kp_every=2))
    out.append(replace(plain, name="loss 10% la 40ms", loss=0.10, lookahead_ms=40.0))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.playout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", type=float, default=0.1, help="packet loss probability, both directions")
    p.add_argument("--jitter-ms", type=float, default=50.0, help="uniform extra one-way delay width")
    p.add_argument("--delay-ms", type=float, default=40.0, help="fixed one-way delay")
    p.add_argument("--forecaster", default=DEFAULT_FORECASTER, help="receiver concealment forecaster")
    p.add_argument("--kp-every", type=int, default=1, help="sender decimation k")
    p.add_argument("--lookahead-ms", type=float, default=0.0, help="receiver render-ahead")
    p.add_argument("--max-delay-ms", type=float, default=DEFAULT_MAX_DELAY_MS,
                   help="receiver --max-delay-ms (default: the receiver's; 1000: buffered playout)")
    p.add_argument("--delay-targets", type=float, nargs="*", default=[], metavar="MS",
                   help="one call per receiver --max-delay-ms value (e.g. 0 40 80 120 1000), same link")
    p.add_argument("--forecasters", nargs="*", default=[], metavar="NAME",
                   help="with --delay-targets: each target with each of these receiver forecasters")
    p.add_argument("--clean", action="store_true",
                   help="with --delay-targets: the same conditions again on a clean link (no delay, jitter, loss)")
    p.add_argument("--repeat", type=int, default=1, help="calls per condition (latency varies run to run)")
    p.add_argument("--frames", type=int, default=300, help="frames to stream (the clip is looped)")
    p.add_argument("--fps", type=float, default=30.0, help="call frame rate (sender --fps)")
    p.add_argument("--clip", default=str(DEFAULT_CLIP))
    p.add_argument("--weights", default=None, help="motion model (default: shipped weights)")
    p.add_argument("--seed", type=int, default=0, help="jitter seed (nftables loss is not seedable)")
    p.add_argument("--early-render", action=argparse.BooleanOptionalAction, default=None,
                   help="the receiver's --early-render / --no-early-render (default: the receiver's)")
    p.add_argument("--render-threads", type=int, default=2, help="receiver torch threads")
    p.add_argument("--extract-threads", type=int, default=2, help="sender --threads (its default)")
    p.add_argument("--workdir", default="out/bench/playout_work", help="per-condition logs and raw files")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="write a plot here")
    p.add_argument("--ssim-size", type=int, default=256, choices=[0, 64, 128, 256],
                   help="score the call's picture offline at this size (bench.call_picture); 0: off")
    p.add_argument("--sweep", action="store_true", help="loss 0/5/10%%, then k=2 and lookahead 40 ms at 10%%")
    a = p.parse_args(argv)
    if not 0.0 <= a.loss <= 1.0:
        p.error("--loss must be in [0, 1]")
    if a.frames < 10 or a.fps <= 0 or a.kp_every < 1 or a.repeat < 1:
        p.error("--frames must be >= 10, --fps > 0, --kp-every >= 1, --repeat >= 1")
    return a


TABLE_COLS = [
    ("condition", "name"), ("fps", "rendered_fps"), ("rend", "rendered"), ("real", "real"), ("conc", "concealed"),
    ("intp", "interpolated"), ("rep", "repeated"), ("reuse", "reused"), ("late", "late"), ("drop", "dropped"),
    ("lost", "frames_lost"),
    ("c_end", "concealed_after_end"), ("stalls", "stalls"), ("tgt_ms", "target_delay_ms_p50"),
    ("lat50", "latency_ms_p50"), ("lat95", "latency_ms_p95"), ("cap_fps", "capture_fps_actual"),
    ("rnd_ms", "render_ms_p50"), ("err_conc", "concealed_kp_error_paired"), ("err_rep", "repeat_last_kp_error"),
    ("err_c5", "concealed_kp_error_short"), ("err_r5", "repeat_last_kp_error_short"),
    ("err_intp", "interpolated_kp_error"), ("err_la", "lookahead_kp_error"), ("err_stale", "lookahead_stale_kp_error"),
    ("kbps", "kp_wire_kbps"), ("ssim", "ssim"), ("d_ssim", "ssim_vs_lossless"), ("ssim_kp", "ssim_truth_kp"),
    ("mouth_r", "mouth_corr"), ("eye_r", "eye_corr"), ("akd", "akd")]

SUMMARY_COLS = [("condition", "name"), ("runs", "runs"), ("fps_min", "fps_min"), ("stalls_max", "stalls_max"),
                ("lat50_max", "lat50_max"), ("lat95_max", "lat95_max"), ("lat50", "lat50_mean"),
                ("lat95", "lat95_mean"), ("ssim", "ssim_mean"), ("mouth_r", "mouth_corr_mean"),
                ("eye_r", "eye_corr_mean"), ("kp_err", "kp_error_mean")]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per condition over its repeated runs: the worst run's latency / fps / stalls and mean picture."""
    out = []
    for name in dict.fromkeys(r["name"] for r in runs):
        ok = [r for r in runs if r["name"] == name and "error" not in r]

        def vals(key: str, rows: list[dict[str, Any]] = ok) -> list[float]:
            return [float(r[key]) for r in rows if r.get(key) is not None]

        def agg(fn: Any, key: str) -> float | None:
            v = vals(key)
            return float(fn(v)) if v else None

        out.append({"name": name, "runs": len(ok), "failed": sum(1 for r in runs if r["name"] == name) - len(ok),
                    "fps_min": agg(min, "rendered_fps"), "stalls_max": agg(max, "stalls"),
                    "lat50_max": agg(max, "latency_ms_p50"), "lat95_max": agg(max, "latency_ms_p95"),
                    "lat50_mean": agg(np.mean, "latency_ms_p50"), "lat95_mean": agg(np.mean, "latency_ms_p95"),
                    "ssim_mean": agg(np.mean, "ssim"), "mouth_corr_mean": agg(np.mean, "mouth_corr"),
                    "eye_corr_mean": agg(np.mean, "eye_corr"), "kp_error_mean": agg(np.mean, "shown_kp_error"),
                    "forecaster": ok[0]["forecaster"] if ok else None,
                    "max_delay_ms": ok[0]["max_delay_ms"] if ok else None,
                    "clean": bool(ok) and ok[0]["loss"] == 0.0 and ok[0]["jitter_ms"] == 0.0})
    return out


def plot_tradeoff(summary: list[dict[str, Any]], path: str) -> None:
    """Latency (x) against the picture's keypoint error and SSIM (y), one curve per forecaster and link."""
    fig, _ = new_figure(11, 4.5)
    fig.clf()
    ax1, ax2 = fig.subplots(1, 2)
    for (fc, clean) in dict.fromkeys((r["forecaster"], r["clean"]) for r in summary):
        rows = sorted((r for r in summary if r["forecaster"] == fc and r["clean"] == clean
                       and r["lat50_mean"] is not None), key=lambda r: r["lat50_mean"])
        label = f"{fc}{' (clean link)' if clean else ''}"
        x = [r["lat50_mean"] for r in rows]
        ax1.plot(x, [r["kp_error_mean"] or np.nan for r in rows], "o-", label=label)
        ax2.plot(x, [r["ssim_mean"] or np.nan for r in rows], "o-", label=label)
        for r in rows:
            ax1.annotate(f"{r['max_delay_ms']:g}", (r["lat50_mean"], r["kp_error_mean"] or np.nan), fontsize=7)
    ax1.set_xlabel("latency p50, ms (mean over runs)")
    ax1.set_ylabel("keypoint error of shown frames")
    ax1.set_title("picture error vs latency (labels: --max-delay-ms)")
    ax2.set_xlabel("latency p50, ms")
    ax2.set_ylabel("SSIM of shown frames")
    ax2.set_title("SSIM vs latency")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot(runs: list[dict[str, Any]], path: str) -> None:
    fig, _ = new_figure(11, 4.5)
    fig.clf()  # two panels side by side instead of new_figure's single axes
    ax1, ax2 = fig.subplots(1, 2)
    names = [r["name"] for r in runs]
    x = np.arange(len(runs))
    series = [("forecaster (concealed)", "concealed_kp_error_paired"),
              ("repeat-last (same seqs)", "repeat_last_kp_error"),
              ("interpolated", "interpolated_kp_error"), ("render-ahead", "lookahead_kp_error"),
              ("no render-ahead (stale)", "lookahead_stale_kp_error")]
    w = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        vals = [r.get(key) if r.get(key) is not None else 0.0 for r in runs]
        if any(vals):
            ax1.bar(x + (i - len(series) / 2 + 0.5) * w, vals, w, label=label)
    ax1.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("keypoint error ([-1,1] units)")
    ax1.set_title("keypoint error vs sender truth")
    if ax1.get_legend_handles_labels()[0]:  # a short lossless run may have no concealed frames to plot
        ax1.legend(fontsize=7)
    fps = [r.get("rendered_fps") or 0.0 for r in runs]
    ax2.bar(x, fps, color="tab:green")
    ax2.axhline(runs[0].get("call_fps", 30.0), color="k", ls="--", lw=1, label="call fps")
    for xi, r in zip(x, runs, strict=True):
        ax2.text(xi, (r.get("rendered_fps") or 0.0) + 0.3, f"{r.get('stalls', 0)} stalls", ha="center", fontsize=7)
    ax2.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax2.set_ylabel("rendered fps")
    ax2.set_title("rendered fps (stalls = gaps > 100 ms)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = parse_args(argv)
    try:
        require_root()
    except NetnsUnavailable as e:
        print(f"bench.playout: needs network namespaces: {e}", file=sys.stderr)
        return 2
    from bench.common import resolve_weights

    a.weights = resolve_weights(a.weights)
    if not Path(a.clip).exists():
        print(f"bench.playout: clip not found: {a.clip}", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    failed = 0
    todo = [(cond, r) for cond in conditions(a) for r in range(a.repeat)]
    for i, (cond, rep) in enumerate(todo):
        log.info("condition %s (run %d of %d)", cond, rep + 1, a.repeat)
        try:
            res = run_call(cond, a, Path(a.workdir) / f"c{i}")
            res["run"] = rep
            if not res["complete"]:
                log.error("condition %s: the sender captured %d of %d frames", cond.name, res["frames_captured"],
                          a.frames)
                failed += 1
        except Exception as e:  # one broken condition should not lose the others
            log.error("condition %s failed: %s", cond.name, e)
            res = {"error": str(e)}
            failed += 1
        runs.append({**asdict(cond), **res})
    lossless = next((r.get("ssim") for r in runs if r.get("loss") == 0.0 and r.get("ssim") is not None), None)
    for r in runs:  # the picture's cost of the impairment: SSIM minus the lossless call's
        if lossless is not None and r.get("ssim") is not None:
            r["ssim_vs_lossless"] = r["ssim"] - lossless
    cols = [c for c in TABLE_COLS if any(r.get(c[1]) is not None for r in runs)]
    print(f"\nplayout over an impaired link ({a.frames} frames at {a.fps:g} fps, delay {a.delay_ms:g} ms, "
          f"jitter {a.jitter_ms:g} ms, weights {a.weights})")
    print(format_table([c[0] for c in cols], [[r.get(k) for _, k in cols] for r in runs]))
    summary = summarise(runs)
    if a.repeat > 1 or a.delay_targets:
        print(f"\nper condition over {a.repeat} run(s): worst run's fps / stalls / latency, mean latency and picture")
        print(format_table([c[0] for c in SUMMARY_COLS], [[r.get(k) for _, k in SUMMARY_COLS] for r in summary]))
    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "runs": runs,
              "summary": summary,
              "notes": {
                  "kp_error": "mean Euclidean distance over the 10 keypoints in [-1,1] units vs the sender's truth",
                  "repeat_last_kp_error": "same concealed seqs, truth of the last seq shown as real before each",
                  "kp_wire_kbps": "sender keypoint message bytes + 95 B/message, over frames/fps",
                  "latency": "sender capture wall clock -> render done at the receiver (same host clock)"}}
    if a.json:
        write_json(a.json, report)
    if a.png and any("error" not in r for r in runs):
        if a.delay_targets:
            plot_tradeoff(summary, a.png)
        else:
            plot([r for r in runs if "error" not in r], a.png)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
