"""The prompt prefix that many prompts share runs once (model/prefix_scoring.py, model/frozen_cache.py).

Every claim is checked against whole prompts through the ordinary forward (``RecLM.whole_prompts`` or a
``model.share_prefix: false`` model), under fp32 for equality; bf16 tolerances are in test_precision.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import FP32, make_model, randomise_lora, tiny_config

from privrec.model import prefix_scoring
from privrec.model.adapters import adapter_state
from privrec.model.encoding import Encoded, prompt_key
from privrec.model.prefix_scoring import MIN_SHARED_PREFIX, common_prefix
from privrec.model.recmodel import RecLM
from privrec.train import bce_loss, train


def _model(ml100k, top_layers, seed=0, **model):
    m = make_model(tiny_config(lora={"top_layers": top_layers, "dropout": 0.0}, model={**FP32, **model}), ml100k)
    randomise_lora(m, seed)
    return m


def _record_runs(monkeypatch):
    """(start, batch rows, tokens) of every decoder run."""
    runs = []
    orig = RecLM._run_layers

    def spy(self, start, end, input_ids=None, hidden=None, **kw):
        x = input_ids if input_ids is not None else hidden
        runs.append((start, x.shape[0], x.shape[1]))
        return orig(self, start, end, input_ids=input_ids, hidden=hidden, **kw)

    monkeypatch.setattr(RecLM, "_run_layers", spy)
    return runs


def _without_prefix(items):
    """The same prompts with their first token changed so that no two share MIN_SHARED_PREFIX tokens."""
    out = []
    for k, e in enumerate(items):
        ids = (1000 + k,) + e.ids[1:] if k % 2 else e.ids[:3] + (2000 + k,) + e.ids[4:]
        out.append(dataclasses.replace(e, ids=ids, key=prompt_key(ids), prefix_len=0))
    return out


# --- scoring fresh prompts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("top_layers", [None, 1])
def test_scoring_runs_the_common_prefix_once_and_equals_whole_prompts(ml100k, tiny_splits, top_layers,
                                                                      monkeypatch):
    m = _model(ml100k, top_layers)
    items = m.encode(tiny_splits.test[:24])
    assert len({len(e) for e in items}) > 3  # mixed lengths: padding after the prefix is exercised
    P = len(common_prefix([e.ids for e in items]))
    assert P >= MIN_SHARED_PREFIX and P < min(len(e) for e in items)
    m.prepare(items, progress=False)
    runs = _record_runs(monkeypatch)
    shared = m.score_logits(items, batch_size=8, progress=False)
    start = m.cut
    # the prefix once (one row of P tokens), then 3 batches of the suffixes only
    assert runs[0] == (start, 1, P) and len(runs) == 4
    assert all(r[0] == start and r[1] == 8 and r[2] <= max(len(e) for e in items) - P for r in runs[1:])
    runs.clear()
    with m.whole_prompts():
        whole = m.score_logits(items, batch_size=8, progress=False)
    assert len(runs) == 3 and all(r[2] > P for r in runs)  # the reference really ran whole prompts
    np.testing.assert_allclose(shared, whole, atol=1e-4)
    assert shared.std() > 1e-2  # not a constant
    # the pair logits and P(Yes) come from the same path
    np.testing.assert_allclose(m.score_logits(items, 8, progress=False, pair=True) @ [1, -1], shared, atol=1e-5)


@pytest.mark.parametrize("top_layers", [None, 1])
def test_the_prefix_is_never_stale_across_adapter_changes(ml100k, tiny_splits, top_layers):
    m = _model(ml100k, top_layers, seed=1)
    items = m.encode(tiny_splits.test[:16])
    before = m.score_logits(items, 8, progress=False)
    with m.adapter_disabled():
        base = m.score_logits(items, 8, progress=False)
        with m.whole_prompts():
            np.testing.assert_allclose(base, m.score_logits(items, 8, progress=False), atol=1e-4)
    randomise_lora(m, 2)  # a new adapter: the next call must run the prefix with it
    after = m.score_logits(items, 8, progress=False)
    with m.whole_prompts():
        np.testing.assert_allclose(after, m.score_logits(items, 8, progress=False), atol=1e-4)
    assert np.abs(after - before).max() > 1e-2 and np.abs(before - base).max() > 1e-2


@pytest.mark.parametrize("top_layers", [None, 1])
def test_prompts_without_a_common_prefix_run_whole(ml100k, tiny_splits, top_layers, monkeypatch):
    m = _model(ml100k, top_layers, seed=3)
    items = _without_prefix(m.encode(tiny_splits.test[:12]))
    assert len(common_prefix([e.ids for e in items])) < MIN_SHARED_PREFIX
    assert m.shared_prefix(items) is None and m.shared_prefix(items[:1]) is None  # a single prompt too
    m.prepare(items, progress=False)
    if m.cache is not None:  # stored whole
        assert all(m.cache.entry(e.key).prefix is None for e in items)
        assert all(m.cache.entry(e.key).states.shape[0] == len(e) for e in items)
    runs = _record_runs(monkeypatch)
    z = m.score_logits(items, 4, progress=False)
    assert len(runs) == 3 and all(r[2] > 100 for r in runs)  # whole prompts, no prefix run
    np.testing.assert_allclose(z, np.concatenate([m.score_logits([e], 1, progress=False) for e in items]),
                               atol=1e-4)


def test_forwards_that_need_whole_prompts_get_whole_prompts(ml100k, tiny_splits):
    m = _model(ml100k, 1, seed=4)
    items = m.encode(tiny_splits.test[:16])
    expect = m.score_logits(items, 8, progress=False)
    seen = []
    m.batch_hooks.append(lambda b: seen.append((b.prefix, b.hidden.shape[1])))  # e.g. adapter mixtures
    assert m.shared_prefix(items) is None and m.collate(items).prefix is None
    np.testing.assert_allclose(m.score_logits(items, 8, progress=False), expect, atol=1e-4)
    assert [p for p, _ in seen] == [None, None] and min(t for _, t in seen) > 100  # 2 batches, whole
    m.batch_hooks.clear()
    m.share_prefix = False  # model.share_prefix: false
    assert m.shared_prefix(items) is None


# --- training ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_layers", [None, 1])
def test_one_step_loss_and_grads_equal_whole_prompts(ml100k, tiny_splits, top_layers):
    m = _model(ml100k, top_layers, seed=5)
    one_user = [s for s in tiny_splits.train if s.user_id == tiny_splits.train[0].user_id]
    for samples in (tiny_splits.train[:12], one_user[:6] + tiny_splits.test[:2]):
        items = m.encode(samples)
        m.prepare(items, progress=False)
        results = []
        for prefix in ("auto", None):
            batch = m.collate(items, prefix)
            m.model.eval()  # no dropout: compare the arithmetic
            m.model.zero_grad()
            loss = bce_loss(m.logits(batch), batch)
            loss.backward()
            results.append((batch, loss.item(),
                            {n: p.grad.clone() for n, p in m.model.named_parameters() if p.requires_grad}))
        (b_shared, l_shared, g_shared), (b_whole, l_whole, g_whole) = results
        assert b_shared.prefix is not None and b_whole.prefix is None
        assert b_shared.prefix.kv[-1][1].requires_grad  # the prefix ran with grad (LoRA on v), in this batch
        assert len(b_shared.prefix) >= MIN_SHARED_PREFIX
        assert abs(l_shared - l_whole) < 1e-5
        assert g_shared.keys() == g_whole.keys() and g_shared
        for n in g_shared:
            torch.testing.assert_close(g_shared[n], g_whole[n], atol=1e-5, rtol=1e-4)
        assert max(g.abs().max().item() for g in g_shared.values()) > 1e-3  # gradients really flow
    # a batch of one user's prompts shares the user's history too: a longer prefix than a mixed batch's
    assert len(m.collate(m.encode(one_user[:4])).prefix) > len(m.collate(m.encode(tiny_splits.train[:4])).prefix)


@pytest.mark.parametrize("top_layers", [None, 1])
def test_training_with_the_shared_prefix_gives_the_same_adapter(ml100k, tiny_splits, top_layers):
    models = [_model(ml100k, top_layers, seed=6, share_prefix=share) for share in (True, False)]
    cfg = tiny_config(train={"epochs": 2, "batch_size": 8, "lr": 5e-3}).train
    for m in models:
        m.prepare(m.encode(tiny_splits.train[:24]), progress=False)
        res = train(m, m.encode(tiny_splits.train[:24]), cfg, seed=0, valid=m.encode(tiny_splits.valid[:8]),
                    progress=False)
        assert res.steps == 6
    a, b = (adapter_state(m.model) for m in models)
    assert a.keys() == b.keys()
    moved = max((a[k] - t).abs().max().item() for k, t in adapter_state(_model(ml100k, top_layers, 6).model).items())
    assert moved > 1e-3  # training changed the adapter
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    items = models[0].encode(tiny_splits.test[:16])
    np.testing.assert_allclose(*(m.score_logits(items, 8, progress=False) for m in models), atol=1e-4)


# --- the frozen-layer cache -------------------------------------------------------------------------------
def test_cache_stores_the_shared_prefix_once_and_the_same_states(ml100k, tiny_splits, monkeypatch):
    shared = _model(ml100k, 1)
    items = shared.encode(tiny_splits.test[:20])
    prefix = common_prefix([e.ids for e in items])
    P = len(prefix)
    assert P >= MIN_SHARED_PREFIX  # the chat template's system text and the instruction
    seen = []
    inner = shared._inner()
    monkeypatch.setattr(inner.embed_tokens, "forward", lambda ids, f=inner.embed_tokens.forward: (
        seen.append(ids.numel()), f(ids))[1])
    shared.prepare(items, batch_size=8, progress=False)
    # the prefix ran once, then 3 batches of suffixes (padded to their batch's longest, never the prefix)
    assert seen[0] == P and len(seen) == 4
    assert sum(seen[1:]) <= 8 * 3 * max(len(e) - P for e in items) < sum(len(e) for e in items)
    # stored: the prefix once, every prompt's rows after it
    H = inner.norm.weight.shape[0]
    assert shared.cache.entry(prompt_key(prefix)).states.shape == (P, H)
    for e in items:
        entry = shared.cache.entry(e.key)
        assert (entry.prefix, entry.prefix_len, entry.states.shape) == (prompt_key(prefix), P, (len(e) - P, H))
    assert len(list(shared.cache.dir.rglob("*.pt"))) == len(items) + 1
    assert shared.cache.computed == len(items) + 1
    # the same states as every prompt run whole
    whole = _model(ml100k, 1)
    whole.cache_dir = shared.cache_dir / "whole"
    whole.enable_cache(whole.cut)
    whole.prepare(items, batch_size=8, progress=False, share_prefix=False)
    for e in items:
        a, b = shared.cache.states(e.key), whole.cache.states(e.key)
        assert a.shape == b.shape == (len(e), H) and whole.cache.entry(e.key).prefix is None
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shared.cache.states(e.key, P + 3), b[P + 3:], atol=1e-5, rtol=1e-4)
    # read back from disk by a fresh cache: the pieces join the same way
    again = _model(ml100k, 1)
    assert not again.cache.mem
    torch.testing.assert_close(again.cache.states(items[0].key), shared.cache.states(items[0].key))


def test_discarding_a_prompt_drops_its_prefix_and_the_others_get_it_back(ml100k, tiny_splits):
    m = _model(ml100k, 1, seed=7)
    items = m.encode(tiny_splits.test[:10])
    before = m.score_logits(items, 4, progress=False)
    pkey = m.cache.entry(items[0].key).prefix
    assert pkey is not None
    assert m.cache.discard(items[0].key)  # forgetting sample 0: nothing computed from its tokens stays
    assert m.cache.entry(items[0].key) is None and m.cache.entry(pkey) is None
    assert not (m.cache.dir / pkey[:2] / f"{pkey}.pt").exists()
    assert m.cache.missing(items[1].ids, items[1].key) == (items[1].ids[: m.cache.entry(items[1].key).prefix_len],
                                                           pkey)
    computed = m.cache.computed
    m.prepare(items[1:], progress=False)
    assert m.cache.computed == computed + 1  # the prefix piece alone, not the prompts
    np.testing.assert_allclose(m.score_logits(items[1:], 4, progress=False), before[1:], atol=1e-5)
    m.prepare(items, progress=False)  # sample 0 again, alone: a single prompt is stored whole
    assert m.cache.computed == computed + 2 and m.cache.entry(items[0].key).prefix is None


def test_common_prefix_leaves_every_sequence_a_token():
    assert common_prefix([(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 9)]) == (1, 2)
    assert common_prefix([(1, 2, 3), (1, 2, 3, 4)]) == (1, 2)
    assert common_prefix([(7, 8)]) == (7,)
    assert common_prefix([(1, 2), (3, 4)]) == ()


def test_cache_from_expands_without_a_copy_and_gathers_owners(ml100k):
    m = _model(ml100k, None)
    k = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)  # U=2 prefixes, P=3
    kv = [None, (k[:1], k[:1] + 1)]
    c = prefix_scoring.cache_from(m, kv, 5)
    assert c.layers[1].keys.shape == (5, 2, 3, 4) and c.layers[1].keys.stride(0) == 0  # a view
    assert c.layers[0].keys.shape == (5, 2, 3, 4) and not c.layers[0].keys.any()  # placeholder below
    assert c.get_seq_length(0) == 3  # the mask HF builds from layer 0 counts the prefix
    g = prefix_scoring.cache_from(m, [(k, k), (k, -k)], torch.tensor([1, 1, 0]))
    torch.testing.assert_close(g.layers[1].values, -k[[1, 1, 0]])


def test_encoded_items_are_unchanged_by_the_split(ml100k, tiny_splits):
    m = _model(ml100k, None)
    e = m.encode(tiny_splits.test[:1])[0]
    assert isinstance(e, Encoded) and e.key == prompt_key(e.ids) and e.prefix + e.suffix == e.ids


def test_training_under_lora_dropout_shares_the_prefix_only_when_told(ml100k, tiny_splits):
    """auto: a training batch with dropout runs whole prompts (the random stream of whole prompts, exactly);
    true: it shares the prefix anyway (one dropout mask for the prefix per batch)."""
    cfg = tiny_config(lora={"top_layers": 1, "dropout": 0.1}, train={"epochs": 1, "batch_size": 8, "lr": 5e-3})
    states = {}
    for share in ("auto", False, True):
        m = make_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"share_prefix": share})}),
                       ml100k)
        items = m.encode(tiny_splits.train[:16])
        m.prepare(items, progress=False)
        m.model.train()
        with torch.enable_grad():
            assert (m.collate(items).prefix is not None) == (share is True)
        m.model.eval()
        assert (m.collate(items).prefix is not None) == (share is not False)  # scoring: no dropout drawn
        train(m, items, cfg.train, seed=0, progress=False)
        states[share] = adapter_state(m.model)
    for k in states[False]:
        assert torch.equal(states["auto"][k], states[False][k])  # the same arithmetic and the same draws
    diff = max((states[True][k] - states[False][k]).abs().max().item() for k in states[False])
    assert 0 < diff < 0.05  # other dropout draws: two Adam steps of lr 5e-3 apart at most, not another model
