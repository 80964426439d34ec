"""The region refiner (models.expression.region_refiner): identity when untrained, cut/paste round trip,
its training loop and the sample builder (models.expression.region_data)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.data import ClipInfo, center_square, read_clip
from models.expression import save_regressor
from models.expression.openings import EYE_LEFT, EYE_PATCH, EYE_RIGHT, MOUTH, MOUTH_PATCH, cut_patches
from models.expression.region_data import RegionSamples, build_samples, load_samples, save_samples
from models.expression.region_refiner import (
    RefinerConfig,
    RegionRefiner,
    load_refiner,
    paste_patches,
    patch_affines,
    refine_frame,
)
from models.expression.regressor import OpeningConfig, OpeningNet
from models.expression.train_refiner import RefinerTrainConfig, train, write_card, write_sheet
from tests.utils import tiny_motion_model

CENTRES = np.array([[100, 110], [156, 106], [128, 175]], np.float32)  # a face of the demo clip's size


def demo_frame(demo_clip: Path) -> np.ndarray:
    return center_square(read_clip(demo_clip, max_frames=1)[0], 256)


def test_untrained_refiner_returns_the_rendered_patches_exactly() -> None:
    torch.manual_seed(0)
    net = RegionRefiner().eval()
    eyes, mouth = torch.rand(3, 2, 3, EYE_PATCH, EYE_PATCH), torch.rand(3, 3, MOUTH_PATCH[1], MOUTH_PATCH[0])
    out = net(eyes, torch.rand_like(eyes), mouth, torch.rand_like(mouth), torch.rand(3, 4), torch.rand(3, 4))
    assert torch.equal(out["eyes"], eyes) and torch.equal(out["mouth"], mouth)
    assert out["eye_mask"].shape == (3, 2, 1, EYE_PATCH, EYE_PATCH) and out["mouth_mask"].shape == (3, 1, 32, 48)


def test_a_two_level_refiner_drops_the_coarsest_level_and_is_still_the_identity_untrained(tmp_path: Path) -> None:
    from models.expression.region_refiner import save_refiner

    torch.manual_seed(0)
    three, two = RegionRefiner(), RegionRefiner(RefinerConfig(levels=2)).eval()
    assert not hasattr(two.eye, "enc2") and not hasattr(two.eye, "dec1") and hasattr(three.eye, "enc2")
    # every tensor of the 2-level net has its namesake, of the same shape, in the 3-level one (what --init copies)
    big = three.state_dict()
    assert all(k in big and big[k].shape == v.shape for k, v in two.state_dict().items())
    eyes, mouth = torch.rand(2, 2, 3, EYE_PATCH, EYE_PATCH), torch.rand(2, 3, MOUTH_PATCH[1], MOUTH_PATCH[0])
    macs = {"3": [], "2": []}
    for n, net in (("3", three), ("2", two)):
        hooks = [m.register_forward_hook(lambda m, i, o, c=macs[n]: c.append(o.numel() * m.weight[0].numel()))
                 for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        net(eyes, eyes, mouth, mouth, torch.rand(2, 4), torch.rand(2, 4))
        for h in hooks:
            h.remove()
    assert sum(macs["2"]) < 0.65 * sum(macs["3"])  # the point of it: ~40 % fewer multiply-adds
    out = two(eyes, torch.rand_like(eyes), mouth, torch.rand_like(mouth), torch.rand(2, 4), torch.rand(2, 4))
    assert torch.equal(out["eyes"], eyes) and torch.equal(out["mouth"], mouth)
    save_refiner(tmp_path / "r2.pt", two, {})
    assert load_refiner(tmp_path / "r2.pt")[0].config.levels == 2
    with pytest.raises(ValueError, match="levels must be 2 or 3"):
        RegionRefiner(RefinerConfig(levels=4))


def test_untrained_refine_frame_changes_nothing_and_the_checkpoint_loads(demo_clip: Path, tmp_path: Path) -> None:
    from models.expression.region_refiner import save_refiner

    frame = demo_frame(demo_clip)
    net = RegionRefiner(RefinerConfig(width=8))
    e, m = cut_patches(frame, CENTRES)
    out = refine_frame(net.eval(), frame, CENTRES, e, m, np.full(4, 0.3), np.full(4, 0.2))
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - frame.astype(int)).mean() < 0.1  # only the cut/paste resampling
    save_refiner(tmp_path / "r.pt", net, {"x": 1})
    again, meta = load_refiner(tmp_path / "r.pt")
    assert meta == {"x": 1} and again.config.width == 8


@pytest.mark.parametrize("roll", [0.0, 25.0])
def test_pasting_the_cut_patches_back_changes_the_frame_by_under_2_grey_levels(demo_clip: Path, roll: float) -> None:
    frame = demo_frame(demo_clip)
    rot = cv2.getRotationMatrix2D((128.0, 128.0), roll, 1.0)
    frame = cv2.warpAffine(frame, rot, (256, 256), borderMode=cv2.BORDER_REFLECT)
    centres = (rot[:, :2] @ CENTRES.T).T + rot[:, 2]
    eyes, mouth = cut_patches(frame, centres)
    out = paste_patches(frame, centres, eyes, mouth)
    diff = np.abs(out.astype(int) - frame.astype(int)).max(-1)
    for m, (w, h) in zip(patch_affines(centres), [(EYE_PATCH, EYE_PATCH)] * 2 + [MOUTH_PATCH], strict=True):
        inside = cv2.warpAffine(np.ones((h, w), np.float32), m, (256, 256),
                                flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP) > 0
        assert inside.sum() > 200
        assert diff[inside].mean() < 2.0
    assert diff.max() < 40  # nothing pasted far off


def test_pasting_puts_each_patch_where_it_was_cut_with_the_right_eye_unmirrored() -> None:
    frame = np.full((256, 256, 3), 128, np.uint8)
    eyes = np.full((2, EYE_PATCH, EYE_PATCH, 3), 128, np.uint8)
    eyes[:, 10:22, 2:10] = 255  # a mark on the patch's left side (towards the nose for the mirrored right eye)
    mouth = np.full((MOUTH_PATCH[1], MOUTH_PATCH[0], 3), 0, np.uint8)
    out = paste_patches(frame, CENTRES, eyes, mouth)
    bright = out[..., 0] > 200
    ys, xs = np.nonzero(bright[:, :128])
    assert xs.mean() < CENTRES[0, 0]  # image-left eye: left of its centre
    ys, xs = np.nonzero(bright[:, 128:])
    assert xs.mean() + 128 > CENTRES[1, 0]  # image-right eye, un-mirrored: right of its centre
    assert out[175, 128, 0] < 10 and out[30, 128, 0] == 128  # the mouth is dark, the forehead untouched


# --------------------------------------------------------------------------- training


def synthetic_samples(n: int, seqs: int, seed: int) -> RegionSamples:
    """The driving patch is the rendered one brightened by its target opening: learnable from the planes."""
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.0, 1.0, (n, 4)).astype(np.float32)
    base_e = rng.integers(60, 140, (n, 2, 32, 32, 3)).astype(np.float32)
    base_m = rng.integers(60, 140, (n, 32, 48, 3)).astype(np.float32)
    de = base_e + 100 * target[:, :2, None, None, None]
    dm = base_m + 100 * target[:, 2, None, None, None]
    n_src = seqs
    return RegionSamples(
        rendered_eyes=base_e.astype(np.uint8), rendered_mouth=base_m.astype(np.uint8),
        driving_eyes=de.clip(0, 255).astype(np.uint8), driving_mouth=dm.clip(0, 255).astype(np.uint8),
        target=target, centres=np.zeros((n, 3, 2), np.float32), source=(np.arange(n) % n_src).astype(np.int32),
        clip=(np.arange(n) % n_src).astype(np.int32), frame=np.arange(n, dtype=np.int32),
        seq=(np.arange(n) % n_src).astype(np.int32),
        source_eyes=rng.integers(0, 255, (n_src, 2, 32, 32, 3), dtype=np.uint8),
        source_mouth=rng.integers(0, 255, (n_src, 32, 48, 3), dtype=np.uint8),
        source_open=rng.uniform(0, 1, (n_src, 4)).astype(np.float32), source_frame=np.zeros(n_src, np.int32),
        meta={"clips": [f"c{i}" for i in range(n_src)], "persons": [f"p{seed}{i}" for i in range(n_src)]})


def test_training_reduces_the_loss_keeps_the_best_check_and_resumes(tmp_path: Path) -> None:
    reg = OpeningNet(OpeningConfig(width=4, stages=2))  # an untrained but frozen judge: exercises the opening term
    reg.set_label_stats(torch.full((4,), 0.5), torch.full((4,), 0.3))
    save_regressor(tmp_path / "openings.pt", reg.eval())
    cfg = RefinerTrainConfig(out=str(tmp_path / "refiner.pt"), run_dir=str(tmp_path / "run"),
                             regressor=str(tmp_path / "openings.pt"), steps=40, batch=8, val_every=20, tiny=True,
                             lr=3e-3, minutes=5, target="dlib")  # the synthetic patches follow the labels
    tr, va = synthetic_samples(96, 4, 0), synthetic_samples(32, 4, 1)
    summary = train(cfg, tr, va, {"n": 1})
    assert summary["last_loss"] < 0.8 * summary["first_loss"]
    best, base = summary["best"], summary["baselines"]
    assert best["l1_eyes"] < base["rendered"]["l1_eyes"]  # closer to the driving patches than the render is
    assert len(best["corr"]) == 4 and summary["meta"]["opening_loss"] is True
    net, meta = load_refiner(cfg.out)
    assert meta["selected"]["step"] == best["step"]
    rows = (tmp_path / "run" / "val.jsonl").read_text().splitlines()
    assert len(rows) == 3  # steps 0, 20, 40
    card = write_card(cfg, summary, summary["meta"] | {"train_data": {}, "val_data": {}, "n_train": 96,
                                                        "n_val": 32, "n_train_sources": 4, "n_val_sources": 4},
                      "cmd")
    assert "rendered as is" in card.read_text() and "source patch (static)" in card.read_text()
    # resumable: a second run continues from the saved state, not from step 0
    cfg2 = RefinerTrainConfig(**{**cfg.__dict__, "steps": 50, "resume": True})
    assert train(cfg2, tr, va, {"n": 1})["final"]["step"] == 50
    assert len((tmp_path / "run" / "val.jsonl").read_text().splitlines()) == 5  # + steps 40 (again) and 50


def test_training_without_a_regressor_selects_by_l1_and_says_so(tmp_path: Path) -> None:
    cfg = RefinerTrainConfig(out=str(tmp_path / "refiner.pt"), run_dir=str(tmp_path / "run"),
                             regressor=str(tmp_path / "missing.pt"), steps=10, batch=8, val_every=5, tiny=True)
    summary = train(cfg, synthetic_samples(32, 2, 0), synthetic_samples(16, 2, 1), {})
    assert summary["meta"]["opening_loss"] is False and "corr" not in summary["best"]
    assert summary["best"]["select"] == -(summary["best"]["l1_eyes"] + summary["best"]["l1_mouth"])
    meta = summary["meta"] | {"train_data": {}, "val_data": {}, "n_train": 32, "n_val": 16, "n_train_sources": 2,
                              "n_val_sources": 2}
    assert "**off**" in write_card(cfg, summary, meta, "cmd").read_text()


# --------------------------------------------------------------------------- samples


class FakeLandmarks:
    """A landmark cache with one plausible face per frame (eyes at the CENTRES, blinking every 4th frame)."""

    def __init__(self, n: int) -> None:
        lm = np.zeros((n, 68, 2), np.float32)
        for t in range(n):
            gap = 1.0 if t % 4 == 3 else 6.0
            for idx, (cx, cy) in ((EYE_LEFT, CENTRES[0]), (EYE_RIGHT, CENTRES[1])):
                lm[t, idx, 0] = cx + np.array([-10, -4, 4, 10, 4, -4])
                lm[t, idx, 1] = cy + np.array([0, -gap, -gap, 0, gap, gap]) / 2
            lm[t, MOUTH] = CENTRES[2] + np.random.default_rng(t).normal(0, 6, (len(MOUTH), 2))
        self.lm, self.valid = lm, np.ones(n, bool)
        self.valid[1] = False

    def get(self, path, root):  # LandmarkCache.get
        return self.lm, self.valid


def test_sample_builder_renders_cuts_and_labels_with_the_documented_shapes(demo_clip: Path, tmp_path: Path) -> None:
    model = tiny_motion_model(256)
    clip = ClipInfo(demo_clip, "face", "video", "demo")
    n, every = 12, 3
    s = build_samples(model, [clip], demo_clip.parent, FakeLandmarks(n), [9, 4, 5, 0], every=every, sources=2,
                      seed=0, max_frames=n)
    drive = [t for t in range(0, n, every) if t != 1]  # frame 1 has no landmarks (not a multiple of 3 anyway)
    assert len(s.source_open) == 2 and s.source_frame[0] == 0 and s.source_frame[1] >= n // 3
    assert len(s) == 2 * len(drive) and sorted(set(s.frame.tolist())) == drive
    assert s.rendered_eyes.shape == (len(s), 2, EYE_PATCH, EYE_PATCH, 3) and s.rendered_eyes.dtype == np.uint8
    assert s.driving_mouth.shape == (len(s), MOUTH_PATCH[1], MOUTH_PATCH[0], 3)
    assert s.source_eyes.shape == (2, 2, EYE_PATCH, EYE_PATCH, 3) and s.source_mouth.shape == (2, 32, 48, 3)
    assert s.target.shape == (len(s), 4) and s.target.dtype == np.float32 and s.centres.shape == (len(s), 3, 2)
    assert s.target[s.frame == 3, 0] == pytest.approx(1 / 56, abs=0.01)  # frame 3 blinks
    assert s.source_open[0, 0] == pytest.approx(6 / 56, abs=0.01)
    assert set(s.seq.tolist()) == {0, 1} and set(s.source.tolist()) == {0, 1}
    assert not np.array_equal(s.rendered_eyes, s.driving_eyes)  # the render is not the driving frame
    assert s.meta["render_ms_per_frame"] > 0 and s.meta["renders"] == len(s)
    assert s.rendered_frames is None and s.boxes is None  # kept only when asked (validation samples)
    again = load_samples(save_samples(tmp_path / "s.npz", s))
    assert np.array_equal(again.rendered_mouth, s.rendered_mouth) and again.meta == s.meta
    sub = again.subset(np.array([0, 2]))
    assert len(sub) == 2 and len(sub.source_open) == 2


def test_validation_samples_keep_frames_for_the_dlib_judge_which_selects(demo_clip: Path, tmp_path: Path) -> None:
    pytest.importorskip("dlib")
    model = tiny_motion_model(256)
    clip = ClipInfo(demo_clip, "face", "video", "demo")
    s = build_samples(model, [clip], demo_clip.parent, FakeLandmarks(9), [9, 4, 5, 0], every=2, sources=1,
                      max_frames=9, keep_frames=True)
    assert s.rendered_frames.shape == (len(s), 256, 256, 3) and s.boxes.shape == (len(s), 4)
    assert (s.boxes[:, 2] > s.boxes[:, 0]).all()  # the demo clip's face is found in every driving frame
    s = load_samples(save_samples(tmp_path / "v.npz", s))
    assert s.rendered_frames is not None and s.subset(np.array([1])).rendered_frames.shape[0] == 1
    cfg = RefinerTrainConfig(out=str(tmp_path / "refiner.pt"), run_dir=str(tmp_path / "run"), regressor="",
                             steps=2, batch=4, val_every=2, tiny=True)
    summary = train(cfg, s, s, {})
    base = summary["baselines"]
    assert summary["meta"]["dlib_judge"] and len(summary["best"]["dlib_corr"]) == 4
    assert summary["best"]["select"] == pytest.approx(np.mean(summary["best"]["dlib_corr"][:3]))
    assert base["rendered"]["dlib_frames"] == len(s)
    # an untrained refiner's frames are the rendered frames up to the cut/paste resampling
    assert summary["baselines"]["rendered"]["dlib_mae"][0] < 0.05
    sheet = write_sheet(load_refiner(cfg.out)[0], s, s.target, tmp_path / "sheet.png", rows=3)
    assert cv2.imread(str(sheet)).shape == (3 * 32 * 2, 4 * (32 + 32 + 48) * 2, 3)


def test_wire_targets_follow_the_jacobians_change_since_the_source() -> None:
    """--target wire: what a receiver computes without expression on the wire."""
    from types import SimpleNamespace

    from models.expression.train_refiner import fit_wire_gain, wire_targets

    rng = np.random.default_rng(0)
    n, gain = 200, np.array([0.14, 0.15, 0.3, 0.6], np.float32)
    source = rng.integers(0, 2, n)
    js = rng.normal(1.0, 0.1, (2, 4)).astype(np.float32)
    jd = js[source] + rng.normal(0, 0.1, (n, 4)).astype(np.float32)
    source_open = np.array([[0.3, 0.3, 0.1, 0.6], [0.2, 0.25, 0.0, 0.55]], np.float32)
    s = SimpleNamespace(source=source, source_open=source_open,
                        target=source_open[source] + gain * (jd - js[source]))
    fitted = fit_wire_gain(s, jd, js)
    assert fitted == pytest.approx(gain, abs=1e-4)
    got = wire_targets(s, source_open, fitted, jd, js)
    assert np.abs(got - s.target).max() < 1e-4
    # the source frame itself gets the source's own openings
    assert wire_targets(s, source_open, fitted, js[source], js)[0] == pytest.approx(source_open[source[0]])


def test_degrade_alike_degrades_the_share_asked_each_sample_alike_across_its_patches() -> None:
    from models.expression.train_refiner import degrade_alike

    rng = np.random.default_rng(0)
    eyes = rng.integers(0, 255, (6, 2, 32, 32, 3), dtype=np.uint8)
    mouth = rng.integers(0, 255, (6, 32, 48, 3), dtype=np.uint8)
    none = degrade_alike([eyes, mouth], np.random.default_rng(1), 0.0)
    assert all((a == b).all() for a, b in zip(none, [eyes, mouth], strict=True))
    out_e, out_m = degrade_alike([eyes, mouth], np.random.default_rng(1), 1.0)
    assert out_e.shape == eyes.shape and out_m.shape == mouth.shape and out_e.dtype == np.uint8
    # every sample changed, in every group (JPEG at quality <= 70 alone changes random pixels)
    assert all((out_e[i] != eyes[i]).any() and (out_m[i] != mouth[i]).any() for i in range(6))
    # a noisy patch's detail is softened, never sharpened: the degraded patch is closer to its own blur
    blur = lambda x: cv2.GaussianBlur(x, (0, 0), 1.0).astype(np.float32)  # noqa: E731
    assert np.abs(out_m.astype(np.float32) - blur(out_m.reshape(-1, 48, 3)).reshape(out_m.shape)).mean() < \
        np.abs(mouth.astype(np.float32) - blur(mouth.reshape(-1, 48, 3)).reshape(mouth.shape)).mean()


def test_training_can_start_from_other_weights_and_degrade_its_samples(tmp_path: Path) -> None:
    first = RefinerTrainConfig(out=str(tmp_path / "a.pt"), run_dir=str(tmp_path / "a"), regressor="", steps=20,
                               batch=8, val_every=10, tiny=True, lr=3e-3, target="dlib")
    tr, va = synthetic_samples(64, 4, 0), synthetic_samples(16, 4, 1)
    train(first, tr, va, {})
    start, _ = load_refiner(first.out)
    second = RefinerTrainConfig(**{**first.__dict__, "out": str(tmp_path / "b.pt"), "run_dir": str(tmp_path / "b"),
                                   "steps": 0, "init": first.out, "degrade": 0.5})
    summary = train(second, tr, va, {})
    assert summary["final"]["step"] == 0
    got, _ = load_refiner(second.out)  # step 0's check: the weights it started from, not fresh ones
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), got.state_dict().values(), strict=True))
    wide = RefinerTrainConfig(**{**second.__dict__, "width": 8, "tiny": False, "run_dir": str(tmp_path / "c")})
    with pytest.raises(SystemExit, match="has width"):
        train(wide, tr, va, {})
    third = RefinerTrainConfig(**{**second.__dict__, "run_dir": str(tmp_path / "d"), "steps": 10})
    assert train(third, tr, va, {})["last_loss"] is not None  # degraded batches train
    # a 2-level net starts from the 3-level one's shared layers (all of its own)
    fewer = RefinerTrainConfig(**{**second.__dict__, "out": str(tmp_path / "e.pt"), "run_dir": str(tmp_path / "e"),
                                  "levels": 2})
    train(fewer, tr, va, {})
    two, _ = load_refiner(fewer.out)
    full = start.state_dict()
    assert two.config.levels == 2
    assert all(torch.equal(v, full[k]) for k, v in two.state_dict().items())


def test_quantisation_aware_training_ships_its_ranges_and_the_stage_runs_them_in_int8(tmp_path: Path) -> None:
    """``--qat all``: the run trains through simulated int8 and saves the ranges it trained with in the
    checkpoint's meta; ``refiner_int8 --qat`` writes them beside the weights; the receiver's stage then runs
    every convolution in int8, and leaves a refiner without such a file in float32."""
    import json

    from models.expression.refiner_int8 import main as int8_main
    from models.expression.refiner_int8 import ranges_path
    from models.expression.region_refiner import save_refiner
    from receiver.regions import RegionStage, load_region_weights

    reg = OpeningNet(OpeningConfig(width=4, stages=2))
    reg.set_label_stats(torch.full((4,), 0.5), torch.full((4,), 0.3))
    save_regressor(tmp_path / "openings.pt", reg.eval())
    cfg = RefinerTrainConfig(out=str(tmp_path / "q.pt"), run_dir=str(tmp_path / "q"),
                             regressor=str(tmp_path / "openings.pt"), steps=20, batch=8, val_every=10, tiny=True,
                             lr=3e-3, target="dlib", qat="all")
    tr, va = synthetic_samples(64, 4, 0), synthetic_samples(16, 4, 1)
    assert train(cfg, tr, va, {})["last_loss"] is not None
    net, meta = load_refiner(cfg.out)
    assert len(meta["qat_ranges"]) == 18  # every convolution of both U-Nets
    assert not any(k.startswith("_q") for k in net.state_dict())  # plain weights: the refiner loads as any other
    save_samples(tmp_path / "train.npz", tr)
    save_refiner(tmp_path / "plain.pt", RegionRefiner(RefinerConfig(width=4)))
    with pytest.raises(SystemExit):  # weights not trained for int8 are refused --qat
        int8_main(["--weights", str(tmp_path / "plain.pt"), "--train", str(tmp_path / "train.npz"), "--qat"])
    # the receiver's stage needs wire targets' gain in the meta; the rest of the checkpoint is the QAT run's
    save_refiner(cfg.out, net, {**meta, "wire_gain": [0.1, 0.1, 0.3, 0.6], "target": "wire"})
    int8_main(["--weights", cfg.out, "--train", str(tmp_path / "train.npz"), "--samples", "16", "--qat"])
    ranges = json.loads(ranges_path(cfg.out).read_text())
    # every convolution's input and output tensors, its ReLU's and each upsampling's
    assert ranges["float_convs"] == [] and ranges["method"].startswith("qat ranges for 44 tensors")
    parts = load_region_weights(cfg.out, tmp_path / "openings.pt")
    stage = RegionStage.of(parts, [0, 1, 2])
    assert parts.int8_ranges is not None and stage.onnx is not None and stage.onnx.int8
    ranges_path(cfg.out).unlink()
    assert not RegionStage.of(load_region_weights(cfg.out, tmp_path / "openings.pt"), [0, 1, 2]).onnx.int8


def test_wild_rows_are_the_clips_of_the_in_the_wild_sets() -> None:
    from models.expression.train_refiner import wild_rows

    s = synthetic_samples(8, 4, 0)
    s.meta["clips"] = ["../shared/data/pcavs_vox2/a.mp4", "../shared/data/mead/b.mp4", "x/styletalk_faces/c.mp4",
                       "d.mp4"]
    assert wild_rows(s).tolist() == [True, False, True, False] * 2


@pytest.mark.parametrize("args,message", [(["--degrade", "2"], "--degrade is a share"),
                                          (["--degrade", "nan"], "--degrade is a share"),
                                          (["--init", "x.pt", "--resume"], "--init starts a run"),
                                          (["--levels", "4"], "--levels is the U-Nets' depth"),
                                          (["--qat", "some"], "--qat is 'all', 'mixed' or ''")])
def test_refiner_training_argument_errors(args: list[str], message: str, capsys) -> None:
    from models.expression.train_refiner import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
