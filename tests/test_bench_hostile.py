"""bench.hostile, short form: three attacks on a real receiver process, each followed by a real call.

What is asserted is behaviour (the receiver survives, frees every slot, refuses what it must, and
renders the next honest call); timings are recorded by the bench but only bounded loosely here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.attacks import BY_NAME, jpeg_claiming, png_claiming, webp_claiming
from bench.hostile import main as hostile_main
from shared import source_image as S

pytestmark = pytest.mark.call  # a real receiver process and real calls

MAX_CALLS = 2
# The receiver's default (15 s) is sized for handshakes retransmitted on a lossy path; on loopback a
# short one frees the vanished attacker's slot sooner and still shows that it is the timeout that does.
SETUP_TIMEOUT_S = 4.0
# The honest call after an attack is served: a share that holds at half speed (a loaded two-worker suite
# rendered 35 of 40 after the truncated-JPEG bomb, clock playout concealing the rest; the bench's own 95 %
# is for a quiet machine, and failed 2-3 calls at 90-95 % on a busy one).
MIN_RENDERED = 0.75


def test_bombs_are_what_they_claim() -> None:
    # the payloads must really claim what the catalogue says, or the bench tests nothing
    assert S.source_image_size(jpeg_claiming(32767, 32767, keep=629), max_pixels=2**40) == (32767, 32767)
    assert S.source_image_size(png_claiming(30000, 30000), max_pixels=2**40) == (30000, 30000)
    assert S.source_image_size(webp_claiming(16383, 16383), max_pixels=2**40) == (16383, 16383)
    assert len(jpeg_claiming(32767, 32767, keep=629)) == 629


def test_short_catalogue_against_a_real_receiver(tmp_path: Path, tiny_weights: Path) -> None:
    out = tmp_path / "hostile.json"
    attacks = ["jpeg-32767-trunc", "huge-8MiB", "slow-body"]
    rc = hostile_main(["--weights", str(tiny_weights), "--attacks", *attacks, "--max-calls", str(MAX_CALLS),
                       "--setup-timeout", str(SETUP_TIMEOUT_S), "--frames", "40", "--fps", "20",
                       "--min-rendered", str(MIN_RENDERED),
                       "--logs", str(tmp_path / "logs"), "--json", str(out)])
    r = json.loads(out.read_text())
    rows = {row["attack"]: row for row in r["attacks"]}
    assert list(rows) == attacks
    for name, row in rows.items():
        assert row["survived"], name
        assert row["receiver_restarts"] == 0, name
        assert row["slot_freed"] and row["slots_free"] == MAX_CALLS, (name, row["slots_free"])
        assert row["slot_held_s"] is not None and row["slot_held_s"] < 30, name
        call = row["call_after"]
        assert call["sender_rc"] == 0 and call["frames"] == 40, (name, call)
        assert call["rendered"] >= MIN_RENDERED and call["ok"], (name, call)
        assert row["rss_peak_mb"] and row["health_probes"] > 0 and row["health_failures"] == 0, name
    bomb = rows["jpeg-32767-trunc"]["attacker_calls"]
    assert len(bomb) == 1 and bomb[0]["rejected_by_reason"].get("source_image") == 1
    assert bomb[0]["source_images"] == 0
    # refused its image, the bomb vanished: only the setup timeout, counted from its last message, freed its slot
    assert bomb[0]["end_reason"] == "peer timeout"
    assert rows["jpeg-32767-trunc"]["slot_held_s"] >= SETUP_TIMEOUT_S
    huge = rows["huge-8MiB"]["attacker_calls"]
    assert len(huge) == 1 and huge[0]["end_reason"].startswith("sctp: message over")
    assert huge[0]["messages_received"] == 0
    # slow bodies: exactly max-calls of them held a slot (until their read timeout), the rest were refused
    assert rows["slow-body"]["http_statuses"] == {"408": MAX_CALLS, "503": MAX_CALLS}
    assert rows["slow-body"]["attacker_calls"] == []  # no call was made of them
    assert r["summary"]["crashes"] == 0 and r["summary"]["passed"] and rc == 0


def test_catalogue_covers_the_issue() -> None:
    for name in ("jpeg-32767-trunc", "jpeg-12000-trunc", "jpeg-4096-trunc", "far-ahead-seq", "slow-body",
                 "junk-no-hello", "unusable-sdp", "huge-8MiB", "never-ending", "second-hello", "silent",
                 "dead-offers"):
        assert name in BY_NAME
