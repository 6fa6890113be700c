"""Helpers for the federated tests: a 4-layer tiny random Llama (the split needs client, server and client
layers; the shared tiny model has only 2). Tests only, like ``tiny-random``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    """The federated configs set torch to one thread; give the next test module its setting back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def tiny_deep_model(layers: int = 4) -> str:
    """A seeded random Llama with ``layers`` decoder layers and SmolLM2's tokenizer, built once per machine."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from privrec import assets

    final = assets.home() / "models" / f"tiny-random-{layers}l"  # beside the tiny model it derives from
    if (final / "model.safetensors").is_file():
        return str(final)
    src = assets.tiny_random_model()
    cfg = LlamaConfig.from_pretrained(src)
    cfg.num_hidden_layers = layers
    with torch.random.fork_rng():
        torch.manual_seed(4321)
        model = LlamaForCausalLM(cfg)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race
        pass
    return str(final)


def fed_config(**sections):
    """A FederatedConfig on the tiny model (conftest's tiny_config defaults, all-users protocol, 3 clients)."""
    from privrec.config import parse_config
    from privrec.federated.config import FederatedConfig

    raw = {"model": {"name": "tiny-random", "threads": 1},  # one thread: robust on a busy 2-core machine
           "data": {"protocol": "all-users", "n_train": 96, "n_valid": 36, "n_test": 72},
           "lora": {"r": 4, "alpha": 8},
           "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "schedule": "constant"},
           "federated": {"clients": 3, "partition": "random", "rounds": 2}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return parse_config(raw, FederatedConfig)


def deep_config(**sections):
    """fed_config on the 4-layer model, fp32 (compare the arithmetic, not bf16 rounding)."""
    model = {"name": tiny_deep_model(), "precision": "fp32", **sections.pop("model", {})}
    return fed_config(model=model, **sections)
