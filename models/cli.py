"""Command lines of the training scripts: one option per field of their config dataclass."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any


def add_config_arguments(p: argparse.ArgumentParser, defaults: Any) -> None:
    """``--field-name`` for every field of the dataclass instance ``defaults``: a flag for a bool, else an
    option of the field's type with the instance's value as its default."""
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(value), default=value)
