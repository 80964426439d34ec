"""The call page's predictive keypoint decoder (JavaScript, run under node) against shared.kpcodec's:
Python-encoded streams, delivered in order, reordered, with losses and with a corrupt frame, decode
to the same frames, bit for bit, with the same keyframe requests and the same refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest

from shared.kpcodec import DEFAULT_STREAM, CodedFrame, PredictiveConfig, PredictiveDecoder, PredictiveEncoder
from tests.harness import ROOT
from tests.test_web_protocol import _vectors

SCRIPT = ROOT / "tests" / "web" / "decoder_check.mjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    NODE is None or not (ROOT / "node_modules" / "@msgpack" / "msgpack").exists(),
    reason="node or node_modules missing (.ci/setup.sh runs npm ci)")


def _encode(cfg: PredictiveConfig, vectors: np.ndarray, keyframe_requests: set[int]) -> list[CodedFrame]:
    enc = PredictiveEncoder(cfg)
    frames = []
    for seq, v in enumerate(vectors):
        if seq in keyframe_requests:
            enc.request_keyframe()
        f = enc.encode(seq, v)
        if f is not None:
            frames.append(f)
    return frames


def _arrivals(frames: list[CodedFrame], rng: np.random.Generator) -> dict[str, list[CodedFrame]]:
    """The same stream as a peer may receive it on the unordered, unreliable keypoint channel."""
    swapped = list(frames)
    for i in range(1, len(swapped) - 1, 7):  # neighbours out of order
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    lossy = [f for i, f in enumerate(frames) if i % 11 != 5]  # losses: held frames, keyframe requests
    corrupt = list(frames)
    k = next(i for i, f in enumerate(frames) if not f.key and i > 10)
    corrupt[k] = dataclasses.replace(frames[k], payload=b"\x00\x00\x00")  # not a residual bitstream
    late = list(frames)
    late.insert(40, late.pop(30))  # one frame far behind: predecessors pile up, then it turns up
    shuffled = [frames[i] for i in rng.permutation(len(frames))]
    dup = [f for f in frames[:50] for _ in range(2)]  # every frame twice
    return {"in_order": frames, "swapped": swapped, "lossy": lossy, "corrupt": corrupt, "late": late,
            "shuffled": shuffled, "duplicated": dup}


def _python(cfg: PredictiveConfig, frames: list[CodedFrame]) -> dict:
    dec = PredictiveDecoder(cfg)
    steps = []
    for f in frames:
        try:
            decoded, error = dec.push(f), None
        except ValueError as e:
            decoded, error = [], str(e)
        steps.append({"decoded": [(d.seq, d.kind, d.vector) for d in decoded], "error": error,
                      "needs_keyframe": dec.needs_keyframe})
    return {"steps": steps, "counts": dec.counts}


LINEAR = PredictiveConfig(predictor="linear", tolerance=0.02, max_gap=4, keyframe_interval=30, skip_rule="mean")


@pytest.mark.parametrize("cfg", [DEFAULT_STREAM, LINEAR], ids=["default", "linear"])
def test_js_decoder_matches_python(cfg: PredictiveConfig) -> None:
    vectors = _vectors(300)
    frames = _encode(cfg, vectors, {77, 150})
    assert sum(f.key for f in frames) >= 3 and sum(not f.key for f in frames) > 50
    streams = _arrivals(frames, np.random.default_rng(0))
    job = {"config": {**dataclasses.asdict(cfg)},
           "streams": [[{"seq": f.seq, "prev_seq": f.prev_seq, "key": f.key, "payload": f.payload.hex()} for f in s]
                       for s in streams.values()]}
    res = subprocess.run([NODE, str(SCRIPT)], input=json.dumps(job), capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    js = json.loads(res.stdout)
    for (name, stream), got in zip(streams.items(), js, strict=True):
        want = _python(cfg, stream)
        assert got["counts"] == want["counts"], name
        assert len(got["steps"]) == len(want["steps"])
        for i, (g, w) in enumerate(zip(got["steps"], want["steps"], strict=True)):
            where = f"{name}, frame {i} (seq {stream[i].seq})"
            assert g["needs_keyframe"] == w["needs_keyframe"], where
            assert (g["error"] is None) == (w["error"] is None), f"{where}: {g['error']} / {w['error']}"
            assert [(d["seq"], d["kind"]) for d in g["decoded"]] == [(s, k) for s, k, _ in w["decoded"]], where
            for d, (_, _, v) in zip(g["decoded"], w["decoded"], strict=True):
                # bit for bit: JSON carries each float32 exactly as a double
                assert np.array_equal(np.asarray(d["vector"], np.float32), v), where
    # the streams exercise what they are for
    py = {name: _python(cfg, s) for name, s in streams.items()}
    assert any(s["needs_keyframe"] for s in py["lossy"]["steps"])
    assert any(s["error"] for s in py["corrupt"]["steps"])
    assert py["duplicated"]["counts"]["dropped"] >= 50
    assert py["in_order"]["counts"]["skipped"] > 0
