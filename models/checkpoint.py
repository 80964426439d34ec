"""Checkpoint files: weights + config + metadata, checked on load.

A checkpoint is a ``torch.save`` dict ``{"format", "version", "kind", "config",
"state_dict", "meta"}`` loaded with ``weights_only=True`` (no pickled code runs).
Floating weights may be stored as float16 to keep committed files small; they are
upcast on load. Every way a file can be wrong raises :class:`CheckpointError` with a
message that says what is wrong and with which file.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT = "kpcast-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


def save_checkpoint(path: str | Path, model: nn.Module, kind: str, config: dict[str, Any],
                    meta: dict[str, Any] | None = None, half: bool = False) -> int:
    """Write atomically (tmp file + rename) so a crash mid-write never leaves a broken file.
    Returns the file size in bytes."""
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        state[k] = v.half() if half and v.is_floating_point() else v.clone()
    blob = {"format": FORMAT, "version": VERSION, "kind": kind, "config": dict(config),
            "state_dict": state, "meta": dict(meta or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(blob, buf)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return len(buf.getvalue())


def read_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Load and validate the envelope of a checkpoint (not yet the weights' shapes)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a kpcast checkpoint: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kpcast checkpoint (no '{FORMAT}' header)")
    if blob.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {blob.get('version')}, this code reads {VERSION}")
    if kind is not None and blob.get("kind") != kind:
        raise CheckpointError(f"{path} holds a '{blob.get('kind')}' model, expected '{kind}'")
    for key in ("config", "state_dict", "meta"):
        if not isinstance(blob.get(key), dict):
            raise CheckpointError(f"{path} lacks its '{key}' section")
    return blob


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path = "<memory>") -> None:
    """Copy weights into ``model`` after checking every name and shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape):
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise CheckpointError(f"{path}: '{k}' has shape {got}, model expects {tuple(own[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: '{k}' contains NaN or inf")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load_model(path: str | Path, kind: str, build: Callable[[dict[str, Any]], nn.Module]) -> tuple[nn.Module, dict]:
    """A checkpoint of ``kind`` as a model in eval mode (``build(config)`` makes the empty network) and its meta;
    raises CheckpointError."""
    blob = read_checkpoint(path, kind)
    net = build(blob["config"])
    load_state(net, blob["state_dict"], path)
    return net.eval(), blob["meta"]
