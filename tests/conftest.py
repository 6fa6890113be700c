"""Shared fixtures: the tiny random Llama (tests only) and the real MovieLens-100K, both built once."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytest_plugins = ["serve_helpers"]  # the service tests' one trained tiny model per session

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub id must fail fast here, not wait on the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-bf16", choices=["machine", "yes", "no"], default=os.environ.get("PRIVREC_TEST_CPU_BF16", "machine"),
        help="what `model.precision: auto` finds: as this machine has it (default), or patched to a CPU with "
        "native bf16 (yes: auto turns bf16 autocast on) or without it (no: auto stays fp32). The suite must pass "
        "all three ways; `make test-precision` runs the other two.")


def pytest_configure(config):
    """Simulate the other CPU kind for `precision: auto` (ENVIRONMENT.md: AVX2-only vs AVX512-BF16) through
    the environment, so that the processes a test starts (the CLI, Flower's workers) see the same kind."""
    from privrec.model.backbone import CPU_BF16_ENV

    kind = config.getoption("--cpu-bf16")
    if kind != "machine":
        os.environ[CPU_BF16_ENV] = "1" if kind == "yes" else "0"


def pytest_report_header(config):
    import torch

    from privrec.model.backbone import supports_bf16

    auto = "bf16" if supports_bf16(torch.device("cpu")) else "fp32"
    return f"privrec: precision auto -> {auto} (--cpu-bf16={config.getoption('--cpu-bf16')})"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Frozen-layer caches of a test go to its own folder (the fetched assets stay shared)."""
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def ml100k():
    from privrec.data import load_dataset

    return load_dataset("ml-100k", None)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(stem: str):
    """benchmarks/<stem>.py as a module (its own imports, e.g. mdsection, resolve from benchmarks/)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"{stem}_script", BENCHMARKS / f"{stem}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCHMARKS))


FP32 = {"precision": "fp32"}  # tests of exact equality pin it: bf16 autocast moves scores by ~1e-3


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


def certificate_body(cert: dict) -> dict:
    """A certificate's body without its request id: ids are random, so the same request on two copies of a model
    gets two ids and everything else the same."""
    body = cert["body"]
    return dict(body, request={k: v for k, v in body["request"].items() if k != "id"})


def only_certificate(run) -> dict:
    """The one certificate of a model directory."""
    import json

    [path] = (Path(run) / "certificates").glob("*.json")
    return json.loads(path.read_text())
