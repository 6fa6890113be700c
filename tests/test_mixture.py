"""Per-sample LoRA mixtures in one batched forward (METHODS §4 APA(D) / APA(ND)) against per-sample loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config

from privrec.model.adapters import adapter_state, load_adapter_state
from privrec.model.mixture import lora_layers, mixed_delta, score_mixture


def test_mixed_delta_equals_an_explicit_loop_over_samples():
    g = torch.Generator().manual_seed(0)
    K, r, d_in, d_out, Bsz, T = 3, 4, 10, 6, 5, 7
    A, B = torch.randn(K, r, d_in, generator=g), torch.randn(K, d_out, r, generator=g)
    x = torch.randn(Bsz, T, d_in, generator=g)
    omega = torch.softmax(torch.randn(Bsz, K, generator=g), -1)
    d, nd = mixed_delta(x, A, B, omega, "d", 2.0), mixed_delta(x, A, B, omega, "nd", 2.0)
    for b in range(Bsz):
        A_b = sum(omega[b, k] * A[k] for k in range(K))  # (r, in)
        B_b = sum(omega[b, k] * B[k] for k in range(K))  # (out, r)
        torch.testing.assert_close(d[b], 2.0 * x[b] @ (B_b @ A_b).T, atol=1e-5, rtol=1e-5)
        W_nd = sum(omega[b, k] * B[k] @ A[k] for k in range(K))
        torch.testing.assert_close(nd[b], 2.0 * x[b] @ W_nd.T, atol=1e-5, rtol=1e-5)
    assert (d - nd).abs().max() > 1e-3  # the two forms really differ


def _random_states(model, K, seed):
    g = torch.Generator().manual_seed(seed)
    base = adapter_state(model.model)
    return [{n: torch.randn(t.shape, generator=g) * 0.5 for n, t in base.items()} for _ in range(K)]


def _reference(model, items, states, omega, mode):
    """Sample by sample: merge sample i's mixture into the base weights, score it alone, restore."""
    layers = lora_layers(model)
    out = []
    for i, e in enumerate(items):
        saved = []
        for name, module in layers:
            A = [s[f"{name}.lora_A.weight"] for s in states]
            B = [s[f"{name}.lora_B.weight"] for s in states]
            w = omega[i]
            if mode == "d":
                delta = sum(w[k] * B[k] for k in range(len(states))) @ sum(
                    w[k] * A[k] for k in range(len(states))
                )
            else:
                delta = sum(w[k] * B[k] @ A[k] for k in range(len(states)))
            weight = module.base_layer.weight
            saved.append((weight, weight.detach().clone()))
            with torch.no_grad():
                weight.add_(module.scaling["default"] * delta.float())
        with model.adapter_disabled():
            out.append(model.score([e], progress=False)[0])
        with torch.no_grad():
            for weight, orig in saved:
                weight.copy_(orig)
    return np.array(out)


@pytest.mark.parametrize("mode", ["d", "nd"])
@pytest.mark.parametrize("top_layers", [None, 1])
def test_batched_mixture_equals_per_sample_merged_reference(ml100k, tiny_splits, mode, top_layers):
    cfg = tiny_config(model={"precision": "fp32", "threads": 1}, lora={"top_layers": top_layers})
    m = make_model(cfg, ml100k)
    items = m.encode(tiny_splits.test[:20])
    assert len({len(e) for e in items}) > 3  # padding inside batches is exercised
    states = _random_states(m, 3, seed=1)
    omega = np.random.default_rng(2).dirichlet(
        np.ones(3) * 0.5, size=len(items)
    )  # a different mix per sample
    own = m.score(items, progress=False)
    fast = score_mixture(m, items, states, omega, mode, batch_size=8, progress=False)
    ref = _reference(m, items, states, omega, mode)
    np.testing.assert_allclose(fast, ref, atol=1e-5)
    assert np.abs(fast - own).max() > 1e-3  # the mixture really changes the scores
    np.testing.assert_allclose(m.score(items, progress=False), own, atol=1e-7)  # own adapter restored
    assert not m.batch_hooks


def test_one_hot_mixture_is_the_single_adapter(ml100k, tiny_splits):
    cfg = tiny_config(model={"precision": "fp32", "threads": 1}, lora={"top_layers": 1})
    m = make_model(cfg, ml100k)
    items = m.encode(tiny_splits.test[:16])
    states = _random_states(m, 3, seed=5)
    omega = np.zeros((len(items), 3))
    omega[:, 2] = 1.0
    load_adapter_state(m.model, states[2])
    single = m.score(items, progress=False)
    for mode in ("d", "nd"):
        np.testing.assert_allclose(
            score_mixture(m, items, states, omega, mode, progress=False), single, atol=1e-6
        )


def test_mixture_rejects_bad_weights(ml100k, tiny_splits):
    m = make_model(tiny_config(model={"threads": 1}, lora={"top_layers": 1}), ml100k)
    items = m.encode(tiny_splits.test[:4])
    states = _random_states(m, 2, seed=0)
    with pytest.raises(ValueError, match="shape"):
        score_mixture(m, items, states, np.full((4, 3), 1 / 3), "nd", progress=False)
    twice = items[:2] + items[:1]
    with pytest.raises(ValueError, match="twice"):
        score_mixture(m, twice, states, np.array([[1, 0], [0, 1], [0, 1.0]]), "nd", progress=False)
