"""The frames log (receiver.framelog): named columns, arrival times, bounded memory."""

from pathlib import Path

import numpy as np

from receiver.framelog import KINDS, FramesLog


def test_written_columns_hold_what_was_shown(tmp_path: Path) -> None:
    log = FramesLog()
    log.arrived(1)
    log.shown(1, "real", np.full(60, 0.25), 1000, repeated=False, render_ms=3.5, tick_ms=0.5, lookahead=1)
    log.shown(2, "concealed", np.zeros(60), 2000, repeated=False, blend=0.5)
    log.shown(2, None, np.zeros(60), 2000, repeated=True)
    log.write(tmp_path / "sub" / "frames.npz")
    z = np.load(tmp_path / "sub" / "frames.npz")
    assert list(z["seq"]) == [1, 2, 2] and list(z["kinds"]) == list(KINDS)
    assert [KINDS[k] for k in z["kind"]] == ["real", "concealed", "real"]
    assert z["vector"].shape == (3, 60) and z["vector"][0, 0] == np.float32(0.25)
    assert list(z["repeated"]) == [False, False, True]
    assert z["arrival_us"][0] > 0 and z["arrival_us"][1] == 0 and z["arrival_us"][2] == 0
    assert z["render_ms"][0] == np.float32(3.5) and z["tick_ms"][0] == np.float32(0.5) and z["lookahead"][0] == 1
    assert z["blend"][1] == np.float32(0.5) and z["capture_us"].dtype == np.int64


def test_empty_log_writes_empty_columns(tmp_path: Path) -> None:
    FramesLog().write(tmp_path / "f.npz")
    z = np.load(tmp_path / "f.npz")
    assert z["seq"].shape == (0,) and z["vector"].shape == (0, 60)


def test_arrivals_are_forgotten_far_behind_what_is_shown() -> None:
    log = FramesLog()
    for seq in range(5000):
        log.arrived(seq)
    log.shown(4999, "real", np.zeros(60), 0, repeated=False)
    assert len(log._arrival_us) <= 1024 and log.records[-1].arrival_us > 0
