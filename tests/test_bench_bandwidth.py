"""bench.bandwidth end to end on a tiny random model and two synthetic clips: the JSON must
agree with the protocol bytes and with its own definitions."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from bench import bandwidth, common, h264, wire_sim
from models.data import load_clips, load_frames
from shared import protocol, source_image
from shared.protocol import Codec, Hello

try:  # run as `python -m pytest` from the repo root (the project's way) ...
    from tests.test_bench_quality import SIZE, make_clips, make_model
except ImportError:  # ... or with tests/ itself on sys.path
    from test_bench_quality import SIZE, make_clips, make_model  # type: ignore[no-redef]

CALL_S = 60.0
FPS = 30.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    tmp = tmp_path_factory.mktemp("bench_bandwidth")
    data, weights = make_clips(tmp / "data", frames=16), make_model(tmp / "m.pt")
    out = tmp / "b.json"
    bandwidth.main(["--data", str(data), "--weights", str(weights), "--json", str(out), "--png", str(tmp / "b.png"),
                    "--split", "all", "--call-seconds", str(CALL_S), "--decimations", "1", "2",
                    "--batches", "1", "3", "--pred", "max:0.01:4"])
    assert (tmp / "b.png").stat().st_size > 0
    return json.loads(out.read_text()), data, weights


def clips_and_keypoints(data: Path, weights: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    model, _, _ = common.load_model(weights)
    frames = load_frames(load_clips(data, ["face"]), SIZE)
    return frames, [common.detect_keypoints(model, f) for f in frames]


def test_json_shape(run: tuple[dict, Path, Path]) -> None:
    res = run[0]
    assert res["clips"] == 2 and res["size"] == SIZE
    assert res["overhead_bytes_per_msg"] == 95 and "aiortc" in res["overhead_note"]
    assert len(res["configs"]) == 2 * 2 * 2 + 2  # codecs x decimations x batches + the default and one --pred
    for c in res["configs"]:
        assert {"kbps_wire", "payload_bytes_per_msg", "msgs_per_s", "ssim", "psnr", "added_delay_ms",
                "kbps_reverse_est", "ratio_equal_ssim_wire", "ratio_equal_ssim_payload"} <= set(c)
    assert {"kbps_wire", "ssim", "psnr", "added_delay_ms"} <= set(res["keypoints"])
    assert {"ratio_equal_ssim", "ratio_equal_ssim_wire", "ratio_equal_ssim_payload"} <= set(res)
    assert [p["crf"] for p in res["h264_curve"]] == list(bandwidth.CRFS)
    assert res["assumptions"]


def test_bytes_are_the_encoded_messages(run: tuple[dict, Path, Path]) -> None:
    res, data, weights = run
    _frames, kps = clips_and_keypoints(data, weights)
    for c in res["configs"]:
        if c["codec"] == "PRED":
            cfg = bandwidth.PredSpec.parse(c["name"].removeprefix("PRED:")).cfg
            msgs = [m for kp in kps for m in wire_sim.pred_stream_messages(kp, cfg)[0]]
            assert c["msgs_total"] == len(msgs) == c["frames_sent"]
            assert c["msg_bytes_total"] == sum(len(m) for m in msgs)
            assert c["frames_sent"] + c["frames_skipped"] == c["frames_total"]
            assert all(isinstance(protocol.decode(m), protocol.CodedKeypoints) for m in msgs)
            continue
        msgs = [m for kp in kps for m in wire_sim.stream_messages(kp, Codec[c["codec"]], c["k"], c["batch"])]
        assert c["msgs_total"] == len(msgs)
        assert c["msg_bytes_total"] == sum(len(m) for m in msgs)
        assert c["payload_bytes_per_msg"] == pytest.approx(c["msg_bytes_total"] / c["msgs_total"])
        # every message is a valid KeypointBatch of the right codec and carries every k-th frame
        seqs = [s for m in msgs[: len(msgs) // 2 or 1] for s, _, _ in protocol.decode(m).frames()]
        assert seqs[: 3] == [0, c["k"], 2 * c["k"]][: len(seqs[:3])]


def test_receiver_reconstruction_follows_the_wire() -> None:
    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform(-0.8, 0.8, (7, 20)), rng.uniform(-1.5, 1.5, (7, 40))], axis=1).astype(np.float32)
    got = wire_sim.receive(wire_sim.stream_messages(kp, Codec.F16, 2, 3), 7)
    np.testing.assert_allclose(got[::2], kp[::2], atol=2e-3)  # sent frames: F16 rounding only
    np.testing.assert_allclose(got[1], (got[0] + got[2]) / 2, atol=1e-6)  # missing frames interpolated
    assert not np.allclose(got[1], kp[1], atol=1e-3)  # ... which is not the true frame


def test_predictive_reconstruction_is_the_decoded_stream() -> None:
    """What bench.bandwidth scores for the predictive stream: every frame, within tolerance of the truth."""
    from shared.kpcodec import PredictiveConfig

    rng = np.random.default_rng(1)
    coords = rng.uniform(-0.5, 0.5, 20) + np.cumsum(rng.normal(0, 0.002, (90, 20)), 0)  # a slow random walk
    kp = np.concatenate([coords, np.tile([1.0, 0, 0, 1.0], (90, 10))], axis=1).astype(np.float32)
    cfg = PredictiveConfig(tolerance=0.005, max_gap=6)
    msgs, summary = wire_sim.pred_stream_messages(kp, cfg)
    got = wire_sim.receive_pred(msgs, len(kp), cfg)
    assert np.abs(got[:, :20] - kp[:, :20]).max() <= 0.005 + cfg.coord_step
    assert summary["frames_skipped"] > 10 and len(msgs) == summary["frames_sent"] < len(kp)
    assert protocol.decode(msgs[-1]).seq == len(kp) - 1  # the last frame is always sent
    with pytest.raises(RuntimeError, match="decoded"):
        wire_sim.receive_pred(msgs[:1] + msgs[2:], len(kp), cfg)  # a lost message: not a lossless stream


def test_rates_follow_their_definitions(run: tuple[dict, Path, Path]) -> None:
    res, data, _ = run
    frames = load_frames(load_clips(data, ["face"]), SIZE)
    for c in res["configs"]:
        seconds = c["frames_total"] / FPS
        assert c["frames_total"] == sum(len(f) for f in frames)
        assert c["kbps_stream"] == pytest.approx((c["msg_bytes_total"] + 95 * c["msgs_total"]) * 8 / seconds / 1000)
        assert c["msgs_per_s"] == pytest.approx(c["msgs_total"] / seconds)
        # Hello + JPEG source chunks, each with transport overhead, once per call
        one_off = []
        pred = bandwidth.PredSpec.parse(c["name"].removeprefix("PRED:")).cfg.params() if c["codec"] == "PRED" else None
        for f in frames:
            jpeg, _ = wire_sim.jpeg_source(f[0])
            msgs = [protocol.encode(Hello("kp-" + "0" * 12, SIZE, FPS, int(Codec[c["codec"]]), c["k"],
                                          ts_base_us=wire_sim.TS_BASE_US, pred=pred))]
            msgs += [protocol.encode(ch) for ch in source_image.split_source(jpeg, 1)]
            one_off.append(sum(len(m) + 95 for m in msgs))
        assert c["kbps_source_amortised"] == pytest.approx(np.mean(one_off) * 8 / CALL_S / 1000)
        assert c["kbps_wire"] == pytest.approx(c["kbps_stream"] + c["kbps_source_amortised"])
        assert c["kbps_reverse_est"] == pytest.approx(c["msgs_per_s"] * 92 * 8 / 1000)
        # the delay a receiver adds: interpolation and batching for vector streams, none for the predictive one
        waits = 0.0 if c["codec"] == "PRED" else (c["batch"] * c["k"] - 1) / FPS * 1000
        assert c["added_delay_ms"] == pytest.approx(waits)
    for p in res["h264_curve"]:
        assert p["kbps"] == pytest.approx(p["steady_bytes_total"] * 8 / (p["steady_frames_total"] / FPS) / 1000)
        assert p["kbps_amortised_idr"] == pytest.approx(p["kbps"] + p["idr_bytes_mean"] * 8 / CALL_S / 1000)
        assert p["kbps_rtp"] > p["kbps"]


def test_h264_rate_falls_as_crf_rises(run: tuple[dict, Path, Path]) -> None:
    rates = [p["kbps"] for p in sorted(run[0]["h264_curve"], key=lambda p: p["crf"])]
    assert all(a >= b for a, b in itertools.pairwise(rates)), rates
    assert rates[0] > 2 * rates[-1]


def _rate_at(curve: list[dict], target: float) -> tuple[float, bool]:
    pts = sorted((p["kbps"], p["ssim"]) for p in curve)
    r = np.array([p[0] for p in pts])
    s = np.maximum.accumulate([p[1] for p in pts])
    if target <= s[0]:
        return float(r[0]), True
    keep = np.concatenate([[True], np.diff(s) > 0])  # np.interp needs increasing x
    return float(np.interp(target, s[keep], r[keep])), False


def test_ratios_equal_their_definitions(run: tuple[dict, Path, Path]) -> None:
    res = run[0]
    kp = res["keypoints"]
    rate, floor = _rate_at(res["h264_curve"], kp["ssim"])
    assert res["h264_floor_used"] is floor
    assert res["h264_at_equal_ssim"]["kbps"] == pytest.approx(rate)
    assert res["ratio_equal_ssim"] == pytest.approx(res["h264_at_equal_ssim"]["kbps"] / kp["kbps_wire"])
    rtp_rate, _ = _rate_at([{**p, "kbps": p["kbps_rtp"]} for p in res["h264_curve"]], kp["ssim"])
    assert res["ratio_equal_ssim_wire"] == pytest.approx(rtp_rate / kp["kbps_wire"])
    assert res["ratio_equal_ssim_payload"] == pytest.approx(rate / kp["kbps_payload"])
    assert res["ratio_vs_webrtc_h264"] == pytest.approx(res["webrtc_h264"]["min_target"]["kbps"] / kp["kbps_wire"])
    for c in res["configs"]:
        assert c["h264_kbps_at_equal_ssim"] == pytest.approx(_rate_at(res["h264_curve"], c["ssim"])[0])
        assert c["ratio_equal_ssim"] == pytest.approx(c["h264_kbps_at_equal_ssim"] / c["kbps_wire"])
        assert c["ratio_equal_ssim_rtp"] == pytest.approx(c["h264_rtp_kbps_at_equal_ssim"] / c["kbps_wire"])
        assert c["ratio_equal_ssim_wire"] == c["ratio_equal_ssim_rtp"]
    # the headline is the sender's default stream, the previous default (Q8, every frame) beside it
    from shared.kpcodec import DEFAULT_STREAM

    assert kp["codec"] == "PRED" and kp["default"] and kp["tolerance"] == DEFAULT_STREAM.tolerance
    assert kp["skip_rule"] == DEFAULT_STREAM.skip_rule and kp["max_gap"] == DEFAULT_STREAM.max_gap
    prev = res["keypoints_previous_default"]
    assert (prev["codec"], prev["k"], prev["batch"]) == ("Q8", 1, 1)


def test_floor_flag() -> None:
    curve = [{"kbps": 10.0, "ssim": 0.9}, {"kbps": 4.0, "ssim": 0.6}, {"kbps": 5.0, "ssim": 0.55}]
    lo = h264.rate_at_ssim(curve, 0.3)
    assert lo["h264_floor_used"] and lo["kbps"] == 4.0  # 5 kbps gives less SSIM than 4: not on the curve
    mid = h264.rate_at_ssim(curve, 0.75)
    assert not mid["h264_floor_used"] and mid["kbps"] == pytest.approx(7.0)


def test_webrtc_constants_and_static_row(run: tuple[dict, Path, Path]) -> None:
    res, data, _ = run
    from aiortc.codecs import h264

    w = res["webrtc_h264"]
    assert w["min_bitrate_kbps"] == h264.MIN_BITRATE / 1000 == 500
    assert w["default_bitrate_kbps"] == h264.DEFAULT_BITRATE / 1000
    assert w["min_target"]["target_kbps"] == 500 and w["min_target"]["kbps"] > 0
    # static source = the receiver's (JPEG) source shown for every scored frame
    ssims = []
    for f in load_frames(load_clips(data, ["face"]), SIZE):
        _, src = wire_sim.jpeg_source(f[0])
        g = f.astype(np.float32) / 255
        s = src.astype(np.float32) / 255
        ssims.append(np.mean([structural_similarity(s, x, channel_axis=-1, data_range=1) for x in g[1:]]))
    assert res["static_source"]["ssim"] == pytest.approx(np.mean(ssims), abs=1e-6)
