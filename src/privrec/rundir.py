"""Runs are directories: ``config.yaml`` (resolved), ``metrics.json``, ``adapters/``, ``log.txt``, and every
other file name a command writes into one (the constants below).

Every adapter of a model directory lives under ``adapters/``: ``adapters/default`` for a model of one
adapter (the name peft gives a lone adapter), ``adapters/shard-K`` and ``adapters/client-C`` for shard and
client adapters. Directories written before this layout kept a lone adapter in ``adapter/``; it is still
read (:func:`single_adapter_dir`).

Every write is atomic (temp file, then rename), so a killed run never leaves a half-written file; a folder is
replaced by :func:`swap_in` (old -> ``.NAME.old``, staged -> final, then the old one removed), and a removal that
fails raises (:func:`remove_tree`): what it held may derive from deleted data. Every command that writes into a
model directory holds its :func:`run_lock`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from privrec.errors import RunError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.txt"
MANIFEST_FILE = "model.json"  # what the model directory holds (privrec.models)
ADAPTERS_DIR = "adapters"
SINGLE_ADAPTER = "default"  # adapters/default: the adapter of a one-adapter model
LEGACY_ADAPTER_DIR = "adapter"  # where directories written before adapters/ kept their one adapter
SHARD_PREFIX = "shard-"
CLIENT_PREFIX = "client-"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LEDGER_FILE = "ledger.sqlite"
CERTIFICATES_DIR = "certificates"
STAGING_DIR = "staging"
SLICES_DIR = "slices"  # slices/shard-K/stage-S: a sliced shard's checkpoint after stage S (METHODS §9)
FEATURES_FILE = "features.npz"
ZERO_SHOT_FILE = "zero_shot.json"
CHECKPOINT_FILE = "checkpoint.pt"  # a one-adapter training's last epoch (privrec.train)
LOCK_FILE = ".lock"  # the run lock (run_lock)
PREDICTIONS_GLOB = "predictions_*.csv"  # predictions_{split}[_{task}].csv: one row per sample, its id first
SERVE_DIR = "serve"  # the service's tokens and precomputed recommendations (privrec.serve)
# the files of a model directory that hold rows derived from single samples: a deletion drops the removed
# samples' rows from each (the frozen-layer cache, outside the directory, is purged by sample key too)
DERIVED_PER_SAMPLE = (FEATURES_FILE, PREDICTIONS_GLOB)
# privrec unlearn's record of the forget set it measured (P(Yes) of every forgotten sample, the reference of the
# other methods' JSD), beside forget.json naming the same samples: an experiment's record, kept by design
PREDICTIONS_FORGET = "predictions_forget.csv"


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


@contextlib.contextmanager
def written_folder(out: str | Path) -> Iterator[Path]:
    """Write a new folder whole or not at all: the block fills a temporary sibling, which replaces ``out`` (absent
    or empty: the caller checks) when the block ends; on any error it is removed and ``out`` left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (the caller checked)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: str | Path) -> None:
    """Remove a folder (or a file) if it is there.

    Raises:
        RunError: it could not be removed (what it held may derive from deleted data: never ignored).
    """
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise RunError(f"could not remove {path}: {e.strerror or e}") from None


def old_of(final: Path) -> Path:
    """Where :func:`swap_in` keeps the folder it replaces until the new one is in: ``.NAME.old`` beside it."""
    return Path(final).with_name(f".{Path(final).name}.old")


def swap_in(staged: Path, final: Path) -> None:
    """Replace ``final`` by ``staged`` with renames only: old -> ``.NAME.old``, staged -> final, drop the old one.
    A crash leaves either folder whole at ``final`` (or the old one at ``.NAME.old``, for a resume to finish).

    Raises:
        RunError: the old folder could not be removed.
    """
    staged, final = Path(staged), Path(final)
    old = old_of(final)
    remove_tree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    remove_tree(old)


@contextlib.contextmanager
def run_lock(run_path: str | Path, create: bool = True) -> Iterator[None]:
    """Exclusive lock on a run directory for the duration of a command (released by the OS on a crash). Every
    command that writes into a model directory holds it (train, shard-train, federate, evaluate, forget, and
    serve for its whole life), so none writes back what another one deleted. A directory it created is removed
    again when the command fails before writing anything into it.

    Raises:
        RunError: another privrec process holds the run; no such directory (``create=False``).
    """
    run_path = Path(run_path)
    fresh = not run_path.exists()
    if fresh and not create:
        raise RunError(f"model directory not found: {run_path}")
    run_path.mkdir(parents=True, exist_ok=True)
    try:
        with open(run_path / LOCK_FILE, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunError(
                    f"another privrec command is working on {run_path}; wait for it to finish"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except BaseException:
        if fresh and {p.name for p in run_path.iterdir()} <= {LOCK_FILE}:
            remove_tree(run_path)
        raise


def is_adapter(folder: Path) -> bool:
    """A complete saved adapter folder (its weights file is written last, by rename)."""
    return (Path(folder) / ADAPTER_WEIGHTS).is_file()


def single_adapter_dir(run: str | Path) -> Path:
    """The folder of a one-adapter run: ``adapters/default``, or ``adapter/`` in a directory written before.

    Raises:
        RunError: neither holds a trained adapter.
    """
    run = Path(run)
    for folder in (run / ADAPTERS_DIR / SINGLE_ADAPTER, run / LEGACY_ADAPTER_DIR):
        if is_adapter(folder):
            return folder
    raise RunError(f"{run} has no trained adapter ({ADAPTERS_DIR}/{SINGLE_ADAPTER}/); did training finish?")


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
