"""The fuzz harness: thousands of random and mutated messages through the decoder and a live session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fuzz import fuzz
from shared import protocol as P
from tests.harness import ROOT
from tests.procs import env

KNOWN_REASONS = {"malformed", "oversized", "version", "type", "field", "codec", "length", "nonfinite", "range",
                 "channel", "order", "duplicate", "stale", "digest", "busy", "late", "rate_limited", "source_image",
                 "residual"}


async def test_fuzz_2000_messages_nothing_crashes_and_counts_add_up() -> None:
    rep = await fuzz(2000, seed=7)
    assert rep["crashes"] == 0, rep["crash_examples"] or rep["async_errors"]
    assert sum(rep["inputs_by_generator"].values()) == 2000
    assert set(rep["inputs_by_generator"]) >= {"valid", "bit_flip", "truncate", "structural", "random_msgpack"}
    d, s = rep["decode"], rep["session"]
    assert d["tried"] == d["accepted"] + d["rejected"] + d["crashes"] == 2000
    assert d["accepted"] == sum(d["accepted_by_type"].values())
    assert d["rejected"] == sum(d["rejected_by_reason"].values())
    assert s["tried"] == s["accepted"] + s["rejected"] + s["crashes"] == 2000
    assert s["rejected"] == sum(s["rejected_by_reason"].values())
    assert set(d["rejected_by_reason"]) | set(s["rejected_by_reason"]) <= KNOWN_REASONS
    # the mix is meaningful: plenty of both outcomes, every message type accepted somewhere
    assert d["accepted"] > 200 and d["rejected"] > 1000
    assert set(d["accepted_by_type"]) >= {"Hello", "KeypointBatch", "CodedKeypoints", "KeyframeRequest", "SourceChunk",
                                          "Heartbeat", "SourceReady"}
    # the session rejects everything the decoder rejects (and more: order, duplicates, channel...)
    assert s["accepted"] <= d["accepted"]
    assert s["frames_received"] > 0 and s["sessions"] >= 1


async def test_fuzz_reports_a_decoder_that_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    real = P.decode

    def buggy(data, max_bytes=P.MAX_MESSAGE_BYTES):
        if isinstance(data, bytes) and len(data) % 7 == 3:
            raise KeyError("bug")
        return real(data, max_bytes)

    monkeypatch.setattr(P, "decode", buggy)
    rep = await fuzz(300, seed=1)
    assert rep["decode"]["crashes"] > 0 and rep["session"]["internal_errors"] > 0 and rep["crashes"] > 0
    assert rep["decode"]["tried"] == rep["decode"]["accepted"] + rep["decode"]["rejected"] + rep["decode"]["crashes"]


def test_fuzz_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    res = subprocess.run([sys.executable, "-m", "bench.fuzz", "--messages", "500", "--seed", "3", "--json", str(out)],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "crashes: 0" in res.stdout and "rejected: malformed" in res.stdout
    rep = json.loads(out.read_text())
    assert rep["messages"] == 500 and rep["crashes"] == 0


async def test_same_seed_same_inputs_and_decoder_outcomes() -> None:
    a, b = await fuzz(400, seed=11), await fuzz(400, seed=11)
    assert a["inputs_by_generator"] == b["inputs_by_generator"]
    assert a["decode"] == b["decode"]
    assert (await fuzz(400, seed=12))["decode"] != a["decode"]
