"""The scorer, the frozen-layer cache and adapters, on the tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FP32, make_model, randomise_lora, tiny_config

from privrec.model.adapters import adapter_state, load_adapter_state, read_adapter, save_adapter


def _reference_p_yes(m, items):
    """One prompt at a time, the plain HF forward with full-vocabulary logits at every position."""
    out = []
    m.model.eval()
    with torch.no_grad():
        for e in items:
            logits = m.model(input_ids=torch.tensor([e.ids])).logits  # (1, T, V)
            two = logits[0, -1, [m.yes_id, m.no_id]].double()
            out.append(torch.softmax(two, -1)[0].item())
    return np.array(out)


@pytest.mark.parametrize("top_layers", [None, 1])
def test_batched_scoring_equals_one_at_a_time_full_logits(ml100k, tiny_splits, top_layers):
    cfg = tiny_config(lora={"top_layers": top_layers}, model=FP32)
    m = make_model(cfg, ml100k)
    randomise_lora(m)
    items = m.encode(tiny_splits.test[:24])
    assert len({len(e) for e in items}) > 3  # really different lengths, so padding is exercised
    fast = m.score(items, batch_size=8, progress=False)
    ref = _reference_p_yes(m, items)
    np.testing.assert_allclose(fast, ref, atol=1e-4)
    assert fast.std() > 1e-3  # not a constant


def test_top_layer_cache_gives_same_loss_and_grads(ml100k, tiny_splits):
    from privrec.train import bce_loss

    cached = make_model(tiny_config(lora={"top_layers": 1, "cache_frozen": True}, model=FP32), ml100k)
    full = make_model(tiny_config(lora={"top_layers": 1, "cache_frozen": False}, model=FP32), ml100k)
    assert cached.cut == 1 and full.cut == 0
    randomise_lora(cached, 1)
    load_adapter_state(full.model, adapter_state(cached.model))
    items = cached.encode(tiny_splits.train[:16])
    cached.prepare(items, progress=False)
    losses, grads = [], []
    for m in (cached, full):
        m.model.eval()  # no dropout: compare the arithmetic
        m.model.zero_grad()
        loss = bce_loss(m.logits(m.collate(items)), m.collate(items))
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in m.model.named_parameters() if p.requires_grad})
    assert abs(losses[0] - losses[1]) < 1e-4
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-3)
    assert any("layers.1." in n for n in grads[0]) and not any("layers.0." in n for n in grads[0])


def test_cache_is_keyed_by_model_template_and_sample(ml100k, tiny_splits):
    m = make_model(tiny_config(lora={"top_layers": 1}), ml100k)
    s = tiny_splits.train[:2]
    a = m.encode(s)
    assert a[0].key != a[1].key  # different samples
    m.builder.cfg = m.builder.cfg.model_copy(update={"template": "kv"})
    assert m.encode(s)[0].key != a[0].key  # different template -> different prompt -> new entry
    ns = m.cache.namespace
    other = make_model(tiny_config(lora={"top_layers": 1}), ml100k)
    with torch.no_grad():
        next(other.model.get_base_model().model.layers[0].parameters()).add_(1e-3)
    other._fingerprint = None
    other.enable_cache(1)
    assert other.cache.namespace != ns  # different base weights -> a different cache
    m.prepare(a, progress=False)
    assert m.cache.computed == 3  # the two prompts after their shared prefix, and the prefix once
    m.prepare(a, progress=False)
    assert m.cache.computed == 3  # computed once


def test_adapter_roundtrip_privrec_and_plain_peft(ml100k, tiny_splits, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(lora={"top_layers": None}, model=FP32)
    m = make_model(cfg, ml100k)
    randomise_lora(m, 2)
    items = m.encode(tiny_splits.test[:16])
    before = m.score(items, progress=False)
    save_adapter(m.model, tmp_path / "adapter", {"sample_ids": ["u1-i1"]})
    state, meta = read_adapter(tmp_path / "adapter")
    assert meta["sample_ids"] == ["u1-i1"] and meta["tensors_sha256"]

    m2 = make_model(cfg, ml100k)
    load_adapter_state(m2.model, state)
    np.testing.assert_allclose(m2.score(items, progress=False), before, atol=1e-6)

    base = AutoModelForCausalLM.from_pretrained(m.model.get_base_model().name_or_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = []
        for e in items:
            lg = peft_model(input_ids=torch.tensor([e.ids])).logits[0, -1, [m.yes_id, m.no_id]].double()
            ref.append(torch.softmax(lg, -1)[0].item())
    np.testing.assert_allclose(before, ref, atol=1e-4)


def test_zero_shot_context_runs_base_model(ml100k, tiny_splits):
    m = make_model(tiny_config(), ml100k, lora=False)
    items = m.encode(tiny_splits.test[:8])
    base = m.score(items, progress=False)
    m.attach_lora(tiny_config().lora, 0)
    randomise_lora(m, 3)
    tuned = m.score(items, progress=False)
    with m.adapter_disabled():
        again = m.score(items, progress=False)
    np.testing.assert_allclose(again, base, atol=1e-6)
    assert np.abs(tuned - base).max() > 1e-3
