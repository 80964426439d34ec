"""Sinks: file output with its seq sidecar, spec parsing, and a clear error without a display."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from receiver.sinks import FileSink, NullSink, SinkError, check_sink_spec, make_sink


def test_file_sink_writes_every_frame(tmp_path: Path) -> None:
    s = make_sink(f"file:{tmp_path / 'a.mp4'}", 30, 64)
    assert isinstance(s, FileSink)
    for i in range(10):
        s.write(np.full((64, 64, 3), i * 20, np.uint8), seq=i * 2)
    s.close()
    with av.open(str(tmp_path / "a.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 10 and abs(int(frames[5].mean()) - 100) < 6
    assert json.loads((tmp_path / "a.mp4.seq.json").read_text()) == list(range(0, 20, 2))


def test_later_calls_get_their_own_file(tmp_path: Path) -> None:
    s = make_sink(f"file:{tmp_path / 'call.mp4'}", 30, 64, call_index=2)
    s.write(np.zeros((64, 64, 3), np.uint8), seq=0)
    s.close()
    assert (tmp_path / "call_3.mp4").exists()


def test_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_sink("null", 30, 64), NullSink)
    for bad in ["", "file:", "screen", "file"]:
        with pytest.raises(SinkError):
            check_sink_spec(bad)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(SinkError, match="no display"):
        make_sink("window", 30, 64)
