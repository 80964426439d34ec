"""bench.call_picture: a call's frames log re-rendered and scored against the real frames."""

from __future__ import annotations

import numpy as np

from bench import call_picture, common
from models.fomm.io import weights_for_size
from tests.harness import DEMO_CLIP


def _log(seqs: list[int], vectors: np.ndarray, kinds: list[str], repeated: list[bool]) -> dict[str, np.ndarray]:
    names = ["real", "concealed", "predicted", "interpolated"]
    return {"kinds": np.array(names), "seq": np.array(seqs), "kind": np.array([names.index(k) for k in kinds]),
            "vector": vectors.astype(np.float32), "repeated": np.array(repeated)}


def test_truth_keypoints_score_as_the_ceiling_and_wrong_ones_lower() -> None:
    model, _, _ = common.load_model(weights_for_size(64))
    clip = call_picture.read_clip(DEMO_CLIP, 64)
    assert clip.shape[1:] == (64, 64, 3) and len(clip) > 100
    n = 24
    seqs = list(range(n))
    truth_vec = common.detect_keypoints(model, clip[:n])
    truth = {"seq": np.array(seqs), "vectors": truth_vec}
    exact = call_picture.score_call(model, clip, _log(seqs, truth_vec, ["real"] * n, [False] * n), truth)
    assert exact["ssim_frames"] == n
    assert abs(exact["ssim"] - exact["ssim_truth_kp"]) < 1e-6
    # a frozen stream (every frame shows seq 0's keypoints) with a repeat that must not count twice
    frozen = np.repeat(truth_vec[:1], n + 1, 0)
    log = _log(seqs + [n - 1], frozen, ["concealed"] * (n + 1), [False] * n + [True])
    bad = call_picture.score_call(model, clip, log, truth)
    assert bad["ssim_frames"] == n
    assert bad["ssim"] < exact["ssim"] - 0.005
    assert set(bad["ssim_by_kind"]) == {"concealed"}
    # seqs past the clip's end wrap around, as the looping sender does
    wrapped = call_picture.score_call(model, clip, _log([len(clip)], truth_vec[:1], ["real"], [False]),
                                      {"seq": np.array([len(clip)]), "vectors": truth_vec[:1]})
    assert wrapped["ssim_frames"] == 1 and abs(wrapped["ssim"] - wrapped["ssim_truth_kp"]) < 1e-6
