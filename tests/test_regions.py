"""receiver.regions: the region stage (eyes and mouth redrawn at the receiver), its renderers, its CLI option,
its bench rows and one real call with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import center_square, read_clip
from models.expression import load_regressor
from models.expression.openings import EYE_SIDE, MOUTH_H, MOUTH_W, centres_from_keypoints, jacobian_scales
from models.expression.region_refiner import RefinerConfig, RegionRefiner, save_refiner
from models.expression.train import _jac_baseline
from receiver.regions import MIN_INTEROCULAR_PX, RegionCounts, RegionStage
from receiver.render import Renderer, run_jobs
from tests.harness import DEMO_CLIP
from tests.procs import kpcast_main, receiver_main, run_sender, start_receiver, stop

ANCHORS = [9, 4, 5, 0]  # the shipped models' anchored keypoints (eye_left, eye_right, mouth, ...)
# the tiny random model's (FommConfig.tiny(64), seed 0) keypoints that lie furthest apart on the demo clip
# (~8 px between the "eyes" at 64x64): a stand-in for a trained detector's eye and mouth keypoints
TINY_ANCHORS = [2, 4, 5, 0]
GAIN = [0.13, 0.14, 0.31, 0.63]  # about the trained refiner's wire_gain


def _kp(left=(-0.3, -0.15), right=(0.3, -0.15), mouth=(0.0, 0.45), anchors=ANCHORS) -> np.ndarray:
    """A keypoint vector with the anchored keypoints at these places ([-1, 1]) and identity Jacobians."""
    v = np.zeros(60, np.float32)
    for i, p in zip(anchors[:3], (left, right, mouth), strict=True):
        v[2 * i:2 * i + 2] = p
    v[20:] = np.tile([1.0, 0.0, 0.0, 1.0], 10)
    return v


def _refiner(perturbed: bool, seed: int = 0, levels: int = 3) -> RegionRefiner:
    """Untrained (its zero-initialised output layer: the identity) or trained-looking (that layer random)."""
    torch.manual_seed(seed)
    net = RegionRefiner(RefinerConfig(width=4, levels=levels)).eval()
    if perturbed:
        with torch.no_grad():
            for p in (*net.eye.out.parameters(), *net.mouth.out.parameters()):
                p.normal_(0, 0.3)
    return net


@pytest.fixture(scope="module")
def regressor():
    return load_regressor()[0]  # the shipped opening regressor (models/weights/openings.pt)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """The demo clip's first frames, 256x256 RGB."""
    return np.stack([center_square(f, 256) for f in read_clip(DEMO_CLIP, "video", 12)])


def _stage(regressor, perturbed: bool, anchors=ANCHORS, paste: str = "changes") -> RegionStage:
    return RegionStage(_refiner(perturbed), regressor, GAIN, anchors, paste)


def test_jacobian_scales_are_the_training_definition() -> None:
    kp = np.random.default_rng(0).normal(size=(7, 60)).astype(np.float32)
    assert np.array_equal(jacobian_scales(kp, ANCHORS), _jac_baseline(kp, ANCHORS))
    assert np.array_equal(jacobian_scales(kp[3], ANCHORS), _jac_baseline(kp[3:4], ANCHORS)[0])


def test_the_stage_places_the_regions_where_the_training_did(regressor) -> None:
    """``RegionStage.centres`` (Python floats, once a frame) = ``centres_from_keypoints`` (what the samples the
    refiner trained on were cut at)."""
    stage = _stage(regressor, False)
    rng = np.random.default_rng(1)
    for _ in range(20):
        kp = _kp(left=tuple(rng.uniform(-0.5, -0.1, 2)), right=tuple(rng.uniform(0.1, 0.5, 2)),
                 mouth=tuple(rng.uniform(-0.2, 0.6, 2)))
        np.testing.assert_allclose(stage.centres(kp, 256), centres_from_keypoints(kp, ANCHORS, 256), atol=1e-4)


def test_target_is_the_source_openings_plus_the_wire_change(regressor, frames: np.ndarray) -> None:
    stage = _stage(regressor, False)
    kp = _kp()
    src = stage.prepare(frames[0], kp)
    assert src is not None and src.openings.shape == (4,) and np.isfinite(src.openings).all()
    np.testing.assert_allclose(stage.target(src, kp), src.openings, atol=1e-6)  # the source's own frame
    moved = kp.copy()
    moved[20 + 4 * ANCHORS[2] + 3] += 0.1  # the mouth keypoint's J[1,1]: its vertical scale
    np.testing.assert_allclose(stage.target(src, moved) - src.openings, [0, 0, 0.1 * GAIN[2], 0], atol=1e-6)


@pytest.mark.parametrize("paste", ["changes", "patches"])
def test_an_untrained_refiner_leaves_the_frame_as_it_was(regressor, frames: np.ndarray, paste: str) -> None:
    stage = _stage(regressor, False, paste=paste)
    src = stage.prepare(frames[0], _kp())
    for f, kp in zip(frames[::4], (_kp(), _kp(left=(-0.28, -0.1)), _kp(mouth=(0.05, 0.5))), strict=True):
        out = stage.refine(f, kp, src)
        assert out is not None and out.shape == f.shape and out.dtype == np.uint8  # it ran: not a pass-through
        diff = np.abs(out.astype(np.int16) - f)
        if paste == "changes":  # only what the refiner changed goes back: nothing
            assert diff.max() <= 2
        else:  # the whole patch goes back, resampled through 32 pixels: edges move a little
            assert diff.mean() <= 0.5


def test_a_trained_refiner_changes_only_the_eyes_and_the_mouth(regressor, frames: np.ndarray) -> None:
    stage = _stage(regressor, True)
    kp = _kp(left=(-0.3, -0.1), right=(0.25, -0.12), mouth=(-0.02, 0.42))
    src = stage.prepare(frames[0], kp)
    out = stage.apply(frames[3], kp, src)
    diff = np.abs(out.astype(np.int16) - frames[3]).max(-1)
    c = centres_from_keypoints(kp, ANCHORS, 256)
    d = float(np.linalg.norm(c[1] - c[0]))
    yy, xx = np.mgrid[:256, :256]
    dist = [np.hypot(xx - x, yy - y) for x, y in c]
    # a patch reaches at most half its diagonal from its centre
    eye_r, mouth_r = EYE_SIDE * d / np.sqrt(2), 0.5 * np.hypot(MOUTH_W, MOUTH_H) * d
    far = (dist[0] > eye_r + 2) & (dist[1] > eye_r + 2) & (dist[2] > mouth_r + 2)
    assert far.mean() > 0.7 and diff[far].max() == 0
    for k in range(3):  # and each of the three regions changed
        assert diff[dist[k] < 0.15 * d].max() > 5, k


@pytest.mark.parametrize("levels", [3, 2])
def test_onnx_runtime_and_eager_refiners_draw_the_same_frame(regressor, frames: np.ndarray, levels: int) -> None:
    fast = RegionStage(_refiner(True, levels=levels), regressor, GAIN, ANCHORS)
    eager = RegionStage(_refiner(True, levels=levels), regressor, GAIN, ANCHORS, onnx=False)
    assert fast.onnx is not None and eager.onnx is None  # onnxruntime is a dependency: the fast path runs
    kp = _kp(left=(-0.3, -0.1), right=(0.25, -0.12), mouth=(-0.02, 0.42))
    src = fast.prepare(frames[0], kp)
    for f in frames[1::3]:
        a, b = fast.apply(f, kp, src), eager.apply(f, kp, src)
        assert not np.array_equal(a, f)  # the refiner did change the frame
        assert np.abs(a.astype(np.int16) - b).max() <= 1  # float rounding at most


def test_frames_it_cannot_handle_pass_through(regressor, frames: np.ndarray) -> None:
    stage = _stage(regressor, True)
    src = stage.prepare(frames[0], _kp())
    f = frames[2]
    close = 0.9 * MIN_INTEROCULAR_PX / 128  # eye centres closer than MIN_INTEROCULAR_PX pixels
    bad = {"eyes together": _kp(left=(0.0, 0.0), right=(close, 0.0)), "eye off the frame": _kp(left=(-1.2, 0.0)),
           "mouth off the frame": _kp(mouth=(0.0, 1.05)), "not finite": np.full(60, np.nan, np.float32),
           "not a vector": np.zeros(20, np.float32)}
    for why, kp in bad.items():
        assert stage.refine(f, kp, src) is None, why
        assert stage.apply(f, kp, src) is f, why
    # a source whose own keypoints locate no face: its frames pass through, counted
    assert stage.prepare(frames[0], bad["eyes together"]) is None
    counts = RegionCounts()
    assert stage.step(_kp(), None, counts)(f) is f
    assert stage.step(bad["eye off the frame"], src, counts)(f) is f
    assert not np.array_equal(stage.step(_kp(), src, counts)(f), f)
    assert counts.to_dict() == {"refined": 1, "passed": 2}
    # wrong frame size for the prepared source
    assert stage.refine(f[:128, :128], _kp(), src) is None
    with pytest.raises(ValueError, match="anchor_kp"):
        RegionStage(_refiner(False), stage.regressor, GAIN, [1, 1, 2])
    with pytest.raises(ValueError, match="wire_gain"):
        RegionStage(_refiner(False), stage.regressor, [0.1, 0.2], ANCHORS)


def test_renderer_applies_the_stage_to_each_frame(regressor, frames: np.ndarray) -> None:
    from tests.utils import tiny_motion_model

    model = tiny_motion_model(64)
    plain = Renderer(model, fast=False)
    ident = Renderer(model, fast=False, regions=_stage(regressor, False, TINY_ANCHORS))
    trained = Renderer(model, fast=False, regions=_stage(regressor, True, TINY_ANCHORS))
    for r in (plain, ident, trained):
        r.set_source(frames[0])
    assert plain.region_counts is None
    with torch.no_grad():
        vecs = model.keypoints(torch.from_numpy(np.stack([center_square(f, 64) for f in frames[1:4]]))
                               .permute(0, 3, 1, 2).float() / 255).numpy()
    for v in vecs:
        base = plain.render(v)
        assert np.abs(ident.render(v).astype(np.int16) - base).max() <= 2
        shown = run_jobs([trained.job(v)], 4)[0]  # as the batcher runs it, on a worker
        assert shown.shape == base.shape and not np.array_equal(shown, base)
    assert trained.region_counts.to_dict() == {"refined": 3, "passed": 0}


def test_tiered_renderer_refines_only_at_the_display_tier(regressor, frames: np.ndarray) -> None:
    from receiver.tiers import TieredRenderer
    from tests.utils import tiny_motion_model

    models = {64: tiny_motion_model(64), 256: tiny_motion_model(256)}
    models[256].kp_detector.load_state_dict(models[64].kp_detector.state_dict())  # one detector, as shipped
    stage = _stage(regressor, True, TINY_ANCHORS)
    t = TieredRenderer(models, {64: 1.0, 256: 4.0}, start=64, fast=False, regions=stage)
    plain = TieredRenderer(models, {64: 1.0, 256: 4.0}, start=64, fast=False)
    for r in (t, plain):
        r.use(r.prepare(frames[0]))
    assert t.current.regions is not None and t.current.regions.size == 256  # prepared at the display size
    with torch.no_grad():
        v = models[64].keypoints(torch.from_numpy(center_square(frames[2], 64)[None]).permute(0, 3, 1, 2).float()
                                 / 255)[0].numpy()
    # at the 64 tier the upscaled frame passes unrefined (the refiner was trained on 256 renders)
    np.testing.assert_array_equal(t.render(v), plain.render(v))
    assert t.region_counts.to_dict() == {"refined": 0, "passed": 1}
    # a tier change keeps the prepared regions (the same source image), and at 256 the stage redraws
    assert t.switch_tier(t.prepare_tier(256)) and t.current.regions is not None
    assert plain.switch_tier(plain.prepare_tier(256))
    base = plain.render(v)
    shown = t.render(v)
    assert shown.shape == (256, 256, 3) and not np.array_equal(shown, base)
    np.testing.assert_array_equal(shown, stage.apply(base, v, t.current.regions))
    assert t.region_counts.to_dict() == {"refined": 1, "passed": 1}


def test_the_stage_is_timed_for_the_first_tier(regressor) -> None:
    from receiver.loading import measure_stage_ms
    from tests.utils import tiny_motion_model

    ms = measure_stage_ms(_stage(regressor, True, TINY_ANCHORS), tiny_motion_model(256))
    assert 0 < ms < 1000  # a real time, so load_render_models can leave room for it


# --------------------------------------------------------------------------- files and the CLIs


def _save_refiner(path: Path, perturbed: bool = True, gain: list[float] | None = GAIN) -> Path:
    save_refiner(path, _refiner(perturbed), {"wire_gain": gain, "target": "wire" if gain else "regressor"})
    return path


@pytest.fixture(scope="module")
def anchored_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 64x64 motion model whose meta names anchored keypoints."""
    from models.fomm.io import save_motion_model
    from tests.utils import tiny_motion_model

    path = tmp_path_factory.mktemp("weights") / "tiny64_anchored.pt"
    save_motion_model(path, tiny_motion_model(64), {"model_id": "tiny64", "anchor_kp": TINY_ANCHORS})
    return path


def test_receiver_refuses_a_missing_or_bad_refiner(tmp_path: Path, tiny_weights: Path, anchored_tiny: Path,
                                                  free_port: int) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all" * 100)
    cases = {str(tmp_path / "missing.pt"): "checkpoint not found",
             str(corrupt): "corrupt or not a kpcast checkpoint",
             str(_save_refiner(tmp_path / "other_target.pt", gain=None)): "no wire_gain",
             str(anchored_tiny): "expected 'region-refiner'"}  # a checkpoint of another kind
    for path, says in cases.items():
        rc, err = receiver_main(["--port", str(free_port), "--weights", str(anchored_tiny), "--eager-render",
                                 "--playout", "immediate", "--refine-regions", path])
        assert rc == 2, err
        assert "receiver: error:" in err and says in err and path in err, err
    # a motion model that does not say where the eyes are
    good = str(_save_refiner(tmp_path / "good.pt"))
    rc, err = receiver_main(["--port", str(free_port), "--weights", str(tiny_weights), "--eager-render",
                             "--playout", "immediate", "--refine-regions", good])
    assert rc == 2 and "no anchored keypoints" in err, err
    # kpcast call's receiving half takes the same option
    from kpcast.__main__ import parse_args

    assert parse_args(["call", "--listen", "--video", str(DEMO_CLIP), "--refine-regions", good]).refine_regions == good
    assert parse_args(["call", "--listen", "--video", str(DEMO_CLIP)]).refine_regions == "auto"
    assert parse_args(["call", "--listen", "--video", str(DEMO_CLIP), "--refine-regions"]).refine_regions.endswith(
        "models/weights/region_refiner.pt")
    rc, err = kpcast_main(["call", "--listen", "--port", str(free_port), "--video", str(DEMO_CLIP), "--sink", "null",
                           "--weights", str(anchored_tiny), "--refine-regions", str(tmp_path / "missing.pt")])
    assert rc == 2 and "checkpoint not found" in err, err


@pytest.mark.call
def test_a_call_with_the_region_stage(tmp_path: Path, anchored_tiny: Path, demo_clip: Path, free_port: int) -> None:
    frames = 45
    refiner = _save_refiner(tmp_path / "refiner.pt")
    recv = start_receiver(["--port", str(free_port), "--weights", str(anchored_tiny), "--playout", "immediate",
                           "--sink", f"file:{tmp_path / 'received.mp4'}", "--stats-dir", str(tmp_path),
                           "--stop-after-calls", "1", "--refine-regions", str(refiner)],
                          log_path=tmp_path / "receiver.log")
    try:
        res = run_sender(["--receiver", f"http://127.0.0.1:{free_port}", "--video", str(demo_clip), "--weights",
                          str(anchored_tiny), "--max-frames", str(frames), "--fps", "15"])
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        assert stop(recv) == 0, (tmp_path / "receiver.log").read_text()[-2000:]
    log = (tmp_path / "receiver.log").read_text()
    assert "region stage" in log
    got = json.loads((tmp_path / "call_1.json").read_text())
    regions = got["regions"]
    # every rendered frame went through the stage (a predicted frame the same as the one shown is shown again,
    # not rendered), and the tiny detector's points are far enough apart to redraw
    assert got["frames_rendered"] + got["frames_repeated"] >= 0.5 * frames, got
    # (a render still on the worker when the call ended goes through the stage but is not counted as shown)
    through = regions["refined"] + regions["passed"]
    renders = got["frames_rendered"] - got["frames_reused"]  # reused frames: the picture on screen, not rendered
    assert renders <= through <= renders + 1, (regions, got["frames_rendered"], got["frames_reused"])
    assert renders >= 5
    assert regions["refined"] >= 0.5 * renders, regions
    assert (tmp_path / "received.mp4").stat().st_size > 1000


def test_bench_rows_with_the_region_stage(tmp_path: Path, anchored_tiny: Path) -> None:
    from bench import expression

    out = tmp_path / "e.json"
    res = expression.main(["--data", "assets", "--split", "all", "--weights", str(anchored_tiny), "--labels", "tiny",
                           "--stride", "30", "--aed-every", "3", "--max-frames", "90", "--crf", "40",
                           "--refine-regions", str(_save_refiner(tmp_path / "r.pt")),
                           "--regions-paste", "changes", "patches", "--json", str(out),
                           "--png", str(tmp_path / "e.png")])
    s = json.loads(out.read_text())["summary"]
    assert set(s) == {"tiny", "tiny + regions (changes)", "tiny + regions (patches)", "static source",
                      "libx264 CRF 40"}
    assert res["frames_scored"] >= 2 and res["regions_ms_per_frame"] > 0
    for name in ("tiny + regions (changes)", "tiny + regions (patches)"):
        assert s[name]["kind"] == "regions" and s[name]["clips"] == 1
        assert s[name]["l1"] != s["tiny"]["l1"]  # the stage changed the frames it was given


def test_bench_compares_two_refiners_side_by_side(tmp_path: Path, anchored_tiny: Path) -> None:
    from bench import common, expression

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = _save_refiner(tmp_path / "old" / "r.pt")
    new = _save_refiner(tmp_path / "new" / "r.pt", perturbed=False)  # untrained: the identity
    out = tmp_path / "e.json"
    expression.main(["--data", "assets", "--split", "all", "--weights", str(anchored_tiny), "--labels", "tiny",
                     "--stride", "30", "--aed-every", "3", "--max-frames", "61", "--crf", "40",
                     "--refine-regions", str(old), str(new), "--json", str(out)])
    res = json.loads(out.read_text())
    s = res["summary"]
    assert res["refine_regions"] == {"old/r": str(old), "new/r": str(new)}
    assert s["tiny + regions (old/r)"]["l1"] != s["tiny"]["l1"]  # the perturbed one redraws
    assert s["tiny + regions (new/r)"]["l1"] == pytest.approx(s["tiny"]["l1"], abs=1e-6)  # the identity does not
    assert common.refiner_labels(["a/x.pt", "b/y.pt"]) == {"x": "a/x.pt", "y": "b/y.pt"}
    with pytest.raises(ValueError, match="same refiner twice"):
        common.refiner_labels(["a/x.pt", "a/x.pt"])


def test_bench_render_speed_times_the_stage_beside_int8(tmp_path: Path, anchored_tiny: Path, capsys) -> None:
    from bench import render_speed

    out = tmp_path / "r.json"
    render_speed.main(["--weights", str(anchored_tiny), "--rounds", "2", "--frames", "3", "--json", str(out),
                       "--refine-regions", str(_save_refiner(tmp_path / "r.pt"))])
    r = next(iter(json.loads(out.read_text())["models"].values()))
    assert r["fps_int8+regions"] > 0 and len(r["rounds_int8+regions"]) == 2 and r["regions_vs_int8"] > 0
    assert "regions / int8" in capsys.readouterr().out
    # two refiners side by side, only the int8 renderer beside them
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    two = [str(_save_refiner(tmp_path / d / "r.pt")) for d in "ab"]
    res = render_speed.main(["--weights", str(anchored_tiny), "--labels", "m", "--rounds", "2", "--frames", "3",
                             "--ways", "int8", "--refine-regions", *two])
    r = res["models"]["m"]
    assert res["ways"] == ["int8", "int8+picture", "int8+regions (a/r)", "int8+regions (b/r)"]
    assert "fps_eager" not in r and "int8_vs_whole" not in r
    for tag in ("a/r", "b/r"):
        assert len(r[f"rounds_int8+regions ({tag})"]) == 2 and r[f"regions_vs_picture ({tag})"] > 0
    out_text = capsys.readouterr().out
    assert "regions / picture (a/r)" in out_text and "fps eager" not in out_text


def test_auto_turns_the_stage_on_only_where_it_applies(anchored_tiny: Path, tiny_weights: Path) -> None:
    """--refine-regions' default (auto): the shipped refiner for 256x256 frames of a motion model that names
    its eye and mouth keypoints; off for other sizes or models, and ``off`` turns it off."""
    from receiver.loading import load_render_models
    from receiver.regions import AUTO, OFF, auto_regions

    assert auto_regions(256, {"anchor_kp": ANCHORS})
    assert not auto_regions(128, {"anchor_kp": ANCHORS}) and not auto_regions(256, {})
    kw = {"size": "auto", "adapt": False, "device": "cpu", "fast": False, "int8": False}
    assert load_render_models(str(anchored_tiny), refine_regions=AUTO, **kw).regions is None  # 64x64 frames
    assert load_render_models(str(tiny_weights), refine_regions=AUTO, **kw).regions is None  # no anchors
    assert load_render_models(str(anchored_tiny), refine_regions=OFF, **kw).regions is None
    # a named refiner is used whatever the size (the user asked for it)
    named = load_render_models(str(anchored_tiny), refine_regions=str(_save_refiner(Path(anchored_tiny).parent
                                                                                      / "r_auto.pt")), **kw)
    assert named.regions is not None


def test_benches_refuse_the_same_refiner_twice(capsys) -> None:
    from bench import expression, render_speed

    for main, extra in ((expression.main, ["--data", "assets"]), (render_speed.main, ["--weights", "x.pt"])):
        with pytest.raises(SystemExit) as e:
            main([*extra, "--refine-regions", "a/r.pt", "a/r.pt"])
        assert e.value.code == 2 and "same refiner twice" in capsys.readouterr().err
