"""Shared fixtures: the tiny random Llama (tests only) and the real MovieLens-100K, both built once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must fail fast here, not wait on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Frozen-layer caches of a test go to its own folder (the fetched assets stay shared)."""
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def ml100k():
    from privrec.data import load_dataset

    return load_dataset("ml-100k", None)


def tiny_config(**sections):
    from privrec.config import parse_config

    # one thread: the tiny model's matrices are too small for a second thread to help, and spinning
    # OpenMP threads slow everything down when the machine is shared
    raw = {"model": {"name": "tiny-random", "threads": 1}, "data": {"n_train": 64, "n_valid": 32, "n_test": 64},
           "lora": {"r": 4, "alpha": 8}, "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return parse_config(raw)


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_splits(ml100k, tiny_cfg):
    from privrec.data import build_splits

    return build_splits(ml100k, tiny_cfg.data, tiny_cfg.seed)


def make_model(cfg, dataset, lora: bool = True):
    from privrec.model.recmodel import RecLM

    m = RecLM.from_config(cfg, dataset)
    if lora:
        m.attach_lora(cfg.lora, cfg.seed)
    return m


def randomise_lora(model, seed: int = 0, scale: float = 0.5) -> None:
    """Fill every LoRA tensor with seeded noise (a fresh adapter's B is zero, which would hide bugs)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def run_cli(capsys, *argv):
    """Run the privrec command in-process without progress bars: (exit code, stdout, stderr)."""
    from privrec.cli import main

    code = main(["--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err
