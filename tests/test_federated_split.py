"""The executed layer split (METHODS §2 flexible storage) on a 4-layer tiny random Llama, in fp32.

Client: embeddings + layer 0 and layer 3 + head; server: layers 1-2, reached only through the channel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomise_lora
from fed_helpers import deep_config, restore_threads  # noqa: F401 (autouse fixture)

from privrec.errors import UserError
from privrec.federated.runner import build_model
from privrec.federated.split import SplitRecLM, decode_message, layer_index, parameter_counts
from privrec.model.adapters import adapter_state, load_adapter_state
from privrec.model.recmodel import RecLM
from privrec.train import bce_loss, train

SPLIT = {"split": {"client_first": 1, "client_last": 1}}


@pytest.fixture(scope="module")
def deep_splits(ml100k):
    from privrec.data import build_splits

    return build_splits(ml100k, deep_config().data, 0)



def pair(splits, top_layers=None, record=False):
    """(unsplit, split) models holding the same random LoRA weights."""
    cfg = deep_config(lora={"top_layers": top_layers}, federated=SPLIT)
    full = RecLM.from_config(cfg, splits.dataset)
    full.attach_lora(cfg.lora, cfg.seed)
    split = build_model(cfg, splits)
    split.channel.record = record
    randomise_lora(full, scale=0.3)
    load_adapter_state(split.model, adapter_state(full.model))
    return full, split


def _loss_and_grads(m, items):
    m.model.eval()  # no dropout: compare the arithmetic
    m.model.zero_grad()
    m.prepare(items, progress=False)
    b = m.collate(items)
    z = m.logits(b)
    bce_loss(z, b).backward()
    return z.detach(), {n: p.grad.clone() for n, p in m.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("top_layers", [None, 3])
def test_split_outputs_and_lora_gradients_equal_the_unsplit_models(deep_splits, top_layers):
    full, split = pair(deep_splits, top_layers)
    assert isinstance(split, SplitRecLM) and split.n_layers == 4
    if top_layers == 3:
        assert full.cut == 1 and split.cut == 1  # layer 0 frozen and cached on the client
    items = full.encode(deep_splits.train[:12])
    assert len({len(e) for e in items}) > 3  # padding exercised
    z_full, g_full = _loss_and_grads(full, items)
    z_split, g_split = _loss_and_grads(split, items)
    torch.testing.assert_close(z_split, z_full, atol=1e-5, rtol=0)
    assert z_full.std() > 1e-3
    assert g_full.keys() == g_split.keys()
    server_side = [n for n in g_full if layer_index(n) in (1, 2)]
    client_side = [n for n in g_full if layer_index(n) in (0, 3)]
    assert server_side and client_side  # LoRA on both sides of the cut, all with gradients
    for n in g_full:
        torch.testing.assert_close(g_split[n], g_full[n], atol=1e-5, rtol=0)
    assert all(g_full[n].abs().max() > 0 for n in server_side)  # the server's LoRA really learns
    assert split.channel.messages == 4  # forward there and back, backward there and back


def test_training_through_the_one_loop_matches_the_unsplit_model(deep_splits):
    full, split = pair(deep_splits)
    cfg = deep_config()
    results = []
    for m in (full, split):
        items = m.encode(deep_splits.train[:24])
        train(m, items, cfg.train, seed=3, progress=False)  # dropout on: the same random stream in both
        results.append(adapter_state(m.model))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], atol=1e-5, rtol=0)
    te = full.encode(deep_splits.test[:16])
    np.testing.assert_allclose(split.score(te, progress=False), full.score(te, progress=False), atol=1e-5)


def test_nothing_on_the_channel_is_a_token_id_or_a_label(deep_splits):
    _, split = pair(deep_splits, record=True)
    samples = deep_splits.train[:16]
    items = split.encode(samples)
    train(split, items, deep_config().train, seed=0, progress=False)
    split.score(split.encode(deep_splits.test[:8]), progress=False)
    log = split.channel.log
    assert {m.kind for m in log} == {"forward", "backward"} and len(log) == split.channel.messages
    assert sum(len(m.payload) for m in log) == split.channel.total_bytes
    H = split._inner().norm.weight.shape[0]
    id_patterns = []
    for e in items:
        ids = np.asarray(e.ids)
        for dt in (np.int64, np.int32):
            id_patterns.append(ids[-12:].astype(dt).tobytes())  # the prompt's last 12 tokens, as raw ints
    label_patterns = [np.asarray([e.label for e in items[i: i + 4]], dtype=dt).tobytes()
                      for i in range(0, len(items), 4) for dt in (np.float32, np.float64)]
    for m in log:
        tensors, meta = decode_message(m.payload)
        assert set(meta) <= {"train", "needs_grad", "training", "step", "empty"}, meta
        assert all(v.isdigit() for v in meta.values())
        for name, t in tensors.items():
            if name == "mask":
                assert t.dtype == torch.bool and t.dim() == 2
            else:
                assert name in ("hidden", "grad") and t.dtype == torch.float32
                assert t.dim() == 3 and t.shape[-1] == H  # hidden states / their gradients only
        for pat in id_patterns + label_patterns:
            assert pat not in m.payload


def test_parameter_counts_follow_the_cut(deep_splits):
    _, split = pair(deep_splits)
    counts = parameter_counts(split.model, split.is_client_layer)
    inner = split._inner()
    layer = lambda i: sum(p.numel() for p in inner.layers[i].parameters())
    assert counts["server"] == layer(1) + layer(2)
    assert counts["client"] == counts["total"] - counts["server"]
    assert counts["total"] == sum(p.numel() for p in split.model.parameters())
    emb = inner.embed_tokens.weight.numel()
    assert counts["client"] == emb + layer(0) + layer(3) + inner.norm.weight.numel()  # tied head counted once


def test_a_split_that_leaves_the_server_nothing_is_refused(deep_splits):
    cfg = deep_config(federated={"split": {"client_first": 3, "client_last": 1}})
    with pytest.raises(UserError, match="no layer for the server"):
        build_model(cfg, deep_splits)
