"""Runs are directories: ``config.yaml`` (resolved), ``metrics.json``, ``adapter/``, ``log.txt``.

Every write is atomic (temp file, then rename), so a killed run never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from privrec.errors import RunError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.txt"
ADAPTER_DIR = "adapter"


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=2) + "\n")


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RunError(f"{path} is not valid JSON") from None


class RunDir:
    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise RunError(f"run directory not found: {self.path}")

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def log(self, msg: str, echo: bool = True) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        with open(self.path / LOG_FILE, "a") as f:
            f.write(line + "\n")
        if echo:
            print(msg, file=sys.stderr, flush=True)

    def write_config(self, cfg) -> None:
        atomic_write_text(self.path / CONFIG_FILE, cfg.to_yaml())

    def load_config(self, cls=None):
        from privrec.config import ExperimentConfig, load_config

        p = self.path / CONFIG_FILE
        if not p.is_file():
            raise RunError(f"{self.path} has no {CONFIG_FILE}: not a privrec run directory")
        return load_config(p, cls=cls or ExperimentConfig)

    def write_metrics(self, metrics: dict, name: str = METRICS_FILE) -> None:
        atomic_write_json(self.path / name, metrics)

    def read_metrics(self, name: str = METRICS_FILE) -> dict:
        return read_json(self.path / name)
