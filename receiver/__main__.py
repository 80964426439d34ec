"""kpcast receiver: answer calls, render the caller's face from keypoints, write it to a sink.

Usage:
  python -m receiver                                   # 127.0.0.1:8080, bundled weights, no output
  python -m receiver --size 128                        # a fixed output size (default: auto, adapting)
  python -m receiver --sink file:out/call.mp4 --stats-dir out/stats
  python -m receiver --host 0.0.0.0 --port 8080 --token SECRET --sink window
  python -m receiver --refine-regions                  # redraw eyes and mouth (models/weights/region_refiner.pt)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from models.checkpoint import CheckpointError
from models.fomm.io import SHIPPED_SIZES
from receiver.batching import batch_sizes_for
from receiver.loading import load_render_models
from receiver.regions import add_refine_regions_argument
from receiver.render import pick_device, prewarm_concurrent
from receiver.server import ReceiverServer, ServerConfig
from receiver.session import DEFAULT_FORECASTER, SessionConfig
from receiver.sinks import SinkError, check_sink_spec
from shared.ice import addresses_for_host, restrict_host_addresses
from shared.ice_servers import IceServerError, add_ice_server_arguments, options_from_args

log = logging.getLogger("receiver")


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m receiver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="listen address (also restricts ICE to it)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--size", default="auto", choices=["auto", *map(str, SHIPPED_SIZES)],
                   help="output size: the shipped model of that size; auto (default) = the largest that renders "
                        "at >= 36 fps on this machine (always the largest on a GPU)")
    p.add_argument("--weights", default=None, help="a motion model checkpoint (overrides --size)")
    p.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=None,
                   help="change each call's render tier during the call when rendering cannot hold its frame rate "
                        "(receiver.adapt; default: on with --size auto on a CPU, off otherwise); --size N --adapt "
                        "starts at N")
    p.add_argument("--sink", default="null", help="null | window | vcam[:DEVICE] (needs pyvirtualcam) | file:PATH")
    p.add_argument("--token", default=os.environ.get("KPCAST_TOKEN"), help="shared secret (or $KPCAST_TOKEN)")
    p.add_argument("--playout", choices=["clock", "immediate"], default="clock",
                   help="clock: steady fps with concealment; immediate: render each frame on arrival")
    p.add_argument("--forecaster", default=DEFAULT_FORECASTER,
                   help=f"concealment: last, linear, damped, gru, vrnn, grunf, grusnf (default: {DEFAULT_FORECASTER}: "
                        "none of the others beats it by 10 %% on held-out keypoints, docs/RESULTS.md Forecast)")
    p.add_argument("--lookahead-ms", type=float, default=0.0, help="render ahead by this much (latency hiding)")
    p.add_argument("--max-delay-ms", type=float, default=SessionConfig.max_delay_ms, metavar="MS",
                   help="low-delay playout: the jitter buffer never holds frames longer than this; a later frame "
                        "is shown as the stream predicts it when due (default %(default)g; 1000: the buffer follows "
                        "the 95th percentile of arrivals, for the smoothest picture at the highest latency)")
    p.add_argument("--early-render", action=argparse.BooleanOptionalAction, default=SessionConfig.early_render,
                   help="clock playout: render a frame whose keypoints are in about one render before it is due and "
                        "show it when due (default on; --no-early-render: start each render when its frame is due)")
    p.add_argument("--max-calls", type=int, default=4, help="concurrent calls")
    p.add_argument("--max-batch", type=int, default=ServerConfig.max_batch,
                   help="render up to this many concurrent calls' frames in one run (default: %(default)s; "
                        "1: one by one)")
    p.add_argument("--render-workers", type=int, default=None,
                   help="render threads: frames of concurrent calls render side by side, each on one core "
                        "(default: this machine's cores, at most 4)")
    p.add_argument("--setup-timeout", type=float, default=SessionConfig.setup_timeout_s, metavar="SECONDS",
                   help="hang up on a peer that has not finished setting up its call this long after it was "
                        "answered, or after its last message while its source image is not in (default: "
                        "%(default)g; as long as the sender's connect timeout, since a lossy path may be "
                        "retransmitting the handshake)")
    p.add_argument("--stop-after-calls", type=int, help="exit after this many calls ended")
    p.add_argument("--stats-dir", help="write each call's stats JSON here")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let pages from this origin (e.g. https://app.example.org, or *) use POST /offer and "
                        "GET /stats (repeatable; default: none, same-origin only)")
    p.add_argument("--frames-log", help="write every shown frame (seq, kind, keypoints, times) to this .npz "
                                        "at the end of each call (for offline error analysis)")
    p.add_argument("--ice-address", action="append", help="restrict ICE to this local address (repeatable)")
    add_ice_server_arguments(p)
    p.add_argument("--threads", type=int, default=2, help="torch threads for rendering")
    p.add_argument("--eager-render", action="store_true", help="render with eager PyTorch, not ONNX Runtime")
    p.add_argument("--no-int8", action="store_true",
                   help="float32 convolutions in the ONNX Runtime renderer (default: int8 where the weights ship "
                        "calibration ranges, models/weights/*.int8.json)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    add_refine_regions_argument(p)
    a = p.parse_args(argv)
    if a.max_batch < 1:
        p.error("--max-batch must be >= 1")
    if a.render_workers is not None and a.render_workers < 1:
        p.error("--render-workers must be >= 1")
    if not a.setup_timeout > 0:  # also refuses nan; 0 would hang up on every peer at once
        p.error("--setup-timeout must be > 0")
    try:
        ice = options_from_args(a)
    except IceServerError as e:
        p.error(str(e))
    if not a.max_delay_ms >= 0:
        p.error("--max-delay-ms must be >= 0")
    session = SessionConfig(sink=a.sink, playout=a.playout, forecaster=a.forecaster, lookahead_ms=a.lookahead_ms,
                            frames_log=a.frames_log, setup_timeout_s=a.setup_timeout, max_delay_ms=a.max_delay_ms,
                            early_render=a.early_render)
    cfg = ServerConfig(a.host, a.port, a.token, a.max_calls, a.stop_after_calls, a.stats_dir, session,
                       fast_render=not a.eager_render, int8_render=not a.no_int8, ice=ice,
                       cors_origins=a.cors_origin, max_batch=a.max_batch, refine_regions=a.refine_regions)
    if a.render_workers is not None:
        cfg.render_workers = a.render_workers
    return cfg, a


async def serve(cfg: ServerConfig, a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    if cfg.session.playout == "clock":
        from models.forecast import load_forecaster
        # fail now, not at the first call, and before the models load and are timed (seconds)
        load_forecaster(cfg.session.forecaster)
    device = a.device or pick_device()
    rm = load_render_models(a.weights, a.size, a.adapt, device, cfg.fast_render, cfg.int8_render, cfg.refine_regions)
    model, tiers = rm.model, rm.tiers
    log.info("model %s (%dx%d) on %s, %.0f fps at batch 1", rm.weights, model.config.size, model.config.size, device,
             rm.fps)
    if cfg.fast_render and cfg.max_calls > 1 and cfg.max_batch > 1:
        # the graphs concurrent calls render with, now rather than while the calls start (calls start
        # on this model; other tiers build theirs when a call steps to them)
        batches = batch_sizes_for(cfg.max_calls, cfg.max_batch, cfg.render_workers)
        took = prewarm_concurrent(model, batches, int8=cfg.int8_render)
        if took:
            log.info("concurrent-call graphs (single-threaded, batches %s) ready in %.1f s", batches, took)
    restrict_host_addresses(a.ice_address or addresses_for_host(cfg.host))
    server = ReceiverServer(model, cfg, tiers, regions=rm.regions)
    await server.start()
    print(f"receiver ready on http://{cfg.host}:{cfg.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.done.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg, a = parse_args(argv)
    try:
        check_sink_spec(cfg.session.sink)
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(serve(cfg, a))
    except (CheckpointError, SinkError, ValueError) as e:
        print(f"receiver: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"receiver: cannot listen on {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
