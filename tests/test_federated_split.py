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


# --- what each side loads and holds -------------------------------------------------------------------------
class ReadLog:
    """Wraps ``safetensors.safe_open``: records the name of every tensor read through it."""

    def __init__(self, monkeypatch):
        import safetensors

        self.names: list[str] = []
        real, log = safetensors.safe_open, self

        class Recording:
            def __init__(self, *args, **kwargs):
                self._f = real(*args, **kwargs)

            def __enter__(self):
                self._inner = self._f.__enter__()
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

            def keys(self):
                return self._inner.keys()

            def get_tensor(self, name):
                log.names.append(name)
                return self._inner.get_tensor(name)

        monkeypatch.setattr(safetensors, "safe_open", Recording)


def _checkpoint_names(cfg) -> list[str]:
    from safetensors import safe_open

    with safe_open(f"{cfg.model.name}/model.safetensors", framework="pt") as f:
        return list(f.keys())


def _client_only(cfg, splits):
    """The split client of ``cfg`` with a remote server (a transport that is never called here)."""
    from privrec.prepare import build_model as build

    split = cfg.federated.split
    return build(cfg, splits.dataset, cls=SplitRecLM, before_lora=lambda m: m.configure_split(
        split.client_first, split.client_last, handler=lambda kind, payload: b""))


def _real(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.device.type != "meta"}


def test_the_split_client_reads_and_holds_only_its_own_tensors(deep_splits, monkeypatch):
    cfg = deep_config(federated=SPLIT)
    _client_only(cfg, deep_splits)  # the first build also hashes the checkpoint once (memoised fingerprint)
    log = ReadLog(monkeypatch)
    client = _client_only(cfg, deep_splits)
    ckpt = _checkpoint_names(cfg)
    mine = [n for n in ckpt if layer_index(n) not in (1, 2)]
    assert sorted(log.names) == sorted(mine) and len(set(log.names)) == len(log.names)  # each read once
    assert any(layer_index(n) == 3 for n in mine) and len(mine) < len(ckpt)
    params = dict(client.model.named_parameters())
    middle = [n for n in params if layer_index(n) in (1, 2)]
    assert middle and all(params[n].device.type == "meta" for n in middle)  # base and LoRA: shape only
    assert all(p.device.type != "meta" for n, p in params.items() if layer_index(n) not in (1, 2))
    held = sum(p.numel() for p in _real(client.model).values())
    assert held == parameter_counts(client.model, client.is_client_layer)["client"]
    assert client.server is None and not any(p.device.type == "meta" for p in client.trainable_parameters())
    head = client.base_model().get_output_embeddings().weight
    assert head is client._inner().embed_tokens.weight and head.device.type != "meta"  # tied, read once


def test_the_server_reads_and_holds_only_the_middle_layers(deep_splits, monkeypatch):
    from privrec.federated.split import SplitServer

    cfg = deep_config(federated=SPLIT)
    log = ReadLog(monkeypatch)
    server = SplitServer.load(cfg.model, 1, 3, torch.device("cpu"))
    server.attach_lora(cfg.lora, cfg.seed)
    assert sorted(log.names) == sorted(n for n in _checkpoint_names(cfg) if layer_index(n) in (1, 2))
    real = _real(server.model)
    assert real and {layer_index(n) for n in real} == {1, 2}  # its layers' base and LoRA weights, nothing else
    inner = server._inner()
    assert inner.embed_tokens.weight.device.type == "meta" and inner.norm.weight.device.type == "meta"
    assert all(p.device.type == "meta" for i in (0, 3) for p in inner.layers[i].parameters())


def test_in_process_the_client_and_server_share_one_copy_of_the_middle_lora(deep_splits):
    full, split = pair(deep_splits)
    assert split.fingerprint == full.fingerprint  # the whole model's, so its adapters load into an unsplit one
    server = dict(split.server.model.named_parameters())
    client = dict(split.model.named_parameters())
    assert list(client) == [n for n, _ in full.model.named_parameters()]  # same names, same order (optimiser)
    for n, p in client.items():
        if layer_index(n) in (1, 2):
            if "lora_" in n:
                assert p is server[n]  # the server's own tensor, not a copy
            else:
                assert p.device.type == "meta"
    a = adapter_state(split.model)
    torch.testing.assert_close(a, adapter_state(full.model), atol=0, rtol=0)  # randomised: loaded in place
    fresh_full = RecLM.from_config(deep_config(), deep_splits.dataset)
    fresh_full.attach_lora(deep_config().lora, deep_config().seed)
    fresh_split = build_model(deep_config(federated=SPLIT), deep_splits)
    torch.testing.assert_close(adapter_state(fresh_split.model), adapter_state(fresh_full.model), atol=0, rtol=0)


def test_a_source_without_safetensors_is_loaded_whole_then_cut(monkeypatch):
    from privrec.model import backbone

    name = deep_config().model.name
    full, _ = backbone.load_backbone(name, tokenizer=False)
    keep = lambda n: layer_index(n) != 2  # noqa: E731
    monkeypatch.setattr(backbone, "checkpoint_files", lambda path: None)  # as for a GGUF file or a hub id
    cut, tok = backbone.load_backbone(name, keep=keep, tokenizer=False)
    assert tok is None
    whole = dict(full.named_parameters())
    for n, p in cut.named_parameters():
        if keep(n):
            assert torch.equal(p, whole[n])
        else:
            assert p.device.type == "meta"
    assert backbone.checkpoint_fingerprint(cut) == backbone.fingerprint(full)  # hashed before the cut
