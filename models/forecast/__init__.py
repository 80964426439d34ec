"""Keypoint forecasters: ``last``, ``linear``, ``damped`` (baselines), ``gru``, ``vrnn``, ``grunf``, and ``grusnf``
(GRU-NF sampled with Metropolis steps towards the GRU, ``models.forecast.snf``; no weights of its own).

``load_forecaster(name)`` returns a :class:`Forecaster`; learned ones read
``models/weights/forecast_<name>.pt`` (or ``weights_dir``/``path``) and raise
:class:`models.checkpoint.CheckpointError` when it is missing, corrupt or mismatched.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from torch import nn

from models.checkpoint import CheckpointError, load_state, read_checkpoint, save_checkpoint
from models.forecast.base import KP_DIM, Forecaster, NeuralForecaster, norm_stats
from models.forecast.baselines import DampedForecaster, LastForecaster, LinearForecaster
from models.forecast.gru import GRUConfig, GRUNet
from models.forecast.grunf import GRUNFConfig, GRUNFNet
from models.forecast.snf import SNFForecaster
from models.forecast.vrnn import VRNNConfig, VRNNNet

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
BASELINES = ("last", "linear", "damped")
# name -> (config class, network class, stochastic)
LEARNED: dict[str, tuple[type, type, bool]] = {
    "gru": (GRUConfig, GRUNet, False),
    "vrnn": (VRNNConfig, VRNNNet, True),
    "grunf": (GRUNFConfig, GRUNFNet, True),
}
COMPOSED = ("grusnf",)  # built from other forecasters' weights at inference
NAMES = BASELINES + tuple(LEARNED) + COMPOSED

__all__ = ["KP_DIM", "NAMES", "Forecaster", "NeuralForecaster", "CheckpointError", "build_net",
           "load_forecaster", "save_forecaster", "weights_path", "norm_stats"]


def kind_of(name: str) -> str:
    return f"forecast_{name}"


def weights_path(name: str, weights_dir: str | Path | None = None) -> Path:
    return Path(weights_dir or WEIGHTS_DIR) / f"forecast_{name}.pt"


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown forecaster {name!r}; known: {', '.join(NAMES)}")


def build_net(name: str, config: Any = None) -> nn.Module:
    """A fresh (untrained) network; ``config`` is a config dataclass, a dict, or None."""
    _check_name(name)
    if name in BASELINES or name in COMPOSED:
        raise ValueError(f"{name!r} has no network of its own")
    cfg_cls, net_cls, _ = LEARNED[name]
    if config is None:
        config = cfg_cls()
    elif isinstance(config, dict):
        known = {f.name for f in fields(cfg_cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown {cfg_cls.__name__} keys: {sorted(unknown)}")
        config = cfg_cls(**config)
    return net_cls(config)


def save_forecaster(path: str | Path, name: str, net: nn.Module, meta: dict[str, Any] | None = None,
                    half: bool = False) -> int:
    return save_checkpoint(path, net, kind_of(name), asdict(net.cfg), meta, half=half)


def load_forecaster(name: str, weights_dir: str | Path | None = None, path: str | Path | None = None) -> Forecaster:
    """Baselines need no weights; learned models load ``path`` or
    ``weights_dir/forecast_<name>.pt`` (default ``models/weights``)."""
    _check_name(name)
    if name == "last":
        return LastForecaster()
    if name == "linear":
        return LinearForecaster()
    if name == "damped":
        return DampedForecaster()
    if name == "grusnf":
        if path is not None:
            raise ValueError("grusnf is built from forecast_grunf.pt and forecast_gru.pt: pass weights_dir")
        return SNFForecaster(load_forecaster("grunf", weights_dir), load_forecaster("gru", weights_dir))
    path = Path(path) if path is not None else weights_path(name, weights_dir)
    blob = read_checkpoint(path, kind_of(name))
    try:
        net = build_net(name, blob["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad {name} config: {e}") from e
    load_state(net, blob["state_dict"], path)
    return NeuralForecaster(name, net, LEARNED[name][2], net.cfg, blob["meta"])
