"""The real SmolLM2-135M (make test-slow; not in CI)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_model

from privrec.config import parse_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_cfg():
    return parse_config({"data": {"n_train": 32, "n_valid": 8, "n_test": 24},
                         "lora": {"top_layers": 8}, "train": {"epochs": 1, "lr": 3e-4}})


def test_real_model_shape_and_answer_tokens(ml100k, real_cfg):
    m = make_model(real_cfg, ml100k, lora=False)
    assert m.n_layers == 30 and sum(p.numel() for p in m.model.parameters()) > 130e6
    assert (m.yes_id, m.no_id) == (10539, 5230)  # ENVIRONMENT.md: looked up, matches the measured ids


def test_real_model_cached_path_equals_full_path(ml100k, real_cfg, tiny_splits):
    from privrec.model.adapters import adapter_state, load_adapter_state

    cached = make_model(real_cfg, ml100k)
    full_cfg = real_cfg.model_copy(update={"lora": real_cfg.lora.model_copy(update={"cache_frozen": False})})
    full = make_model(full_cfg, ml100k)
    load_adapter_state(full.model, adapter_state(cached.model))
    items = cached.encode(tiny_splits.test[:12])
    np.testing.assert_allclose(cached.score(items, progress=False), full.score(items, progress=False),
                               atol=1e-4)


def test_real_model_training_lowers_loss(ml100k, real_cfg, tiny_splits):
    from privrec.train import train

    m = make_model(real_cfg, ml100k)
    train_cfg = real_cfg.train.model_copy(update={"epochs": 3})
    res = train(m, m.encode(tiny_splits.train[:32]), train_cfg, seed=0, progress=False)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0], losses
