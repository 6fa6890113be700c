"""Precision is a tested dimension, not an accident of the machine (ENVIRONMENT.md).

Some CPUs have native bf16 (AVX512-BF16 / AMX), some are AVX2-only; `model.precision: auto` turns bf16
autocast on for the first kind only. The exact-equality tests elsewhere pin `precision: fp32`; here the bf16
path is forced (`precision: bf16` runs on any CPU, emulated where not native) and held to the tolerances it
really meets, and `auto` is checked with the hardware detection patched both ways.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FP32, make_model, randomise_lora, tiny_config
from scipy.stats import spearmanr

from privrec.data import Sample
from privrec.model import backbone
from privrec.model.adapters import load_adapter_state, read_adapter, save_adapter

BF16 = {"precision": "bf16"}
# bf16 keeps 8 bits of mantissa. On the tiny model with randomised LoRA (scores spread with std 0.02-0.04)
# the largest P(Yes) difference to fp32 was 1.1e-3, both on an AVX2 machine (bf16 emulated) and on an
# AVX512-BF16 one (the report); fp32 against itself differs by ~1e-7. 5e-3 leaves room across
# machines and is still an eighth of the spread a wrong answer row or a lost adapter would move.
BF16_ATOL = 5e-3


def _pair(ml100k, top_layers=None, seed=0):
    """The same randomised adapter in an fp32 and a bf16 model."""
    models = []
    for prec in (FP32, BF16):
        m = make_model(tiny_config(lora={"top_layers": top_layers}, model=prec), ml100k)
        randomise_lora(m, seed)
        models.append(m)
    return models


@pytest.mark.parametrize("top_layers", [None, 1])
def test_bf16_scores_track_fp32_scores(ml100k, tiny_splits, top_layers):
    fp, bf = _pair(ml100k, top_layers)
    assert bf.bf16 and not fp.bf16
    if top_layers:  # the frozen-layer cache never mixes the two precisions
        assert fp.cache.namespace != bf.cache.namespace
    samples = tiny_splits.test[:32]
    a = fp.score(fp.encode(samples), batch_size=8, progress=False)
    b = bf.score(bf.encode(samples), batch_size=8, progress=False)
    diff = np.abs(a - b).max()
    assert 0 < diff < BF16_ATOL  # really ran in bf16, and close to fp32
    assert spearmanr(a, b).statistic > 0.98  # the ranking of the samples barely moves
    assert a.std() > 1e-2


def test_bf16_batched_scoring_matches_one_at_a_time(ml100k, tiny_splits):
    _, bf = _pair(ml100k, None, seed=1)
    items = bf.encode(tiny_splits.test[:24])
    batched = bf.score(items, batch_size=8, progress=False)  # padded batches
    single = np.array([bf.score([e], batch_size=1, progress=False)[0] for e in items])
    np.testing.assert_allclose(batched, single, atol=BF16_ATOL)


def test_bf16_shared_prefix_ranks_like_full_prompts(ml100k, tiny_splits):
    from privrec.model.recmodel import PrefixGroup

    fp, bf = _pair(ml100k, 1, seed=2)
    r = tiny_splits.test[0]
    seen = {i for i, _ in r.history} | {r.item_id}
    samples = [Sample(f"u{r.user_id}-i{i}", r.user_id, i, r.timestamp, 0.0, 0, r.history)
               for i in range(1, 200) if i not in seen][:60]
    scores = {}
    for name, m in (("fp32", fp), ("bf16", bf)):
        group = PrefixGroup.of(m.encode(samples))
        [shared] = m.score_groups([group], "yes", shared=True, max_suffixes=16, progress=False)
        [full] = m.score_groups([group], "yes", shared=False, batch_size=16, progress=False)
        scores[name] = (shared, full)
    # fp32: the two paths agree to float rounding; bf16: to its tolerance, with nearly the same order
    np.testing.assert_allclose(*scores["fp32"], atol=1e-4)
    sig = lambda z: 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(sig(scores["bf16"][0]), sig(scores["bf16"][1]), atol=BF16_ATOL)
    np.testing.assert_allclose(sig(scores["bf16"][0]), sig(scores["fp32"][0]), atol=BF16_ATOL)
    assert spearmanr(*scores["bf16"]).statistic > 0.98
    top10 = lambda z: set(np.argsort(-z)[:10])
    assert len(top10(scores["bf16"][0]) & top10(scores["fp32"][0])) >= 8


def test_bf16_adapter_round_trip_through_plain_peft(ml100k, tiny_splits, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, bf = _pair(ml100k, None, seed=3)
    items = bf.encode(tiny_splits.test[:16])
    before = bf.score(items, progress=False)
    save_adapter(bf.model, tmp_path / "adapter", {"sample_ids": ["u1-i1"]})
    state, _ = read_adapter(tmp_path / "adapter")
    assert all(t.dtype == torch.float32 for t in state.values())  # autocast never changes the stored weights

    again = make_model(tiny_config(lora={"top_layers": None}, model=BF16), ml100k)
    load_adapter_state(again.model, state)
    np.testing.assert_allclose(again.score(items, progress=False), before, atol=1e-6)  # same path: same bits

    base = AutoModelForCausalLM.from_pretrained(bf.model.get_base_model().name_or_path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = []
        for e in items:
            lg = peft_model(input_ids=torch.tensor([e.ids])).logits[0, -1, [bf.yes_id, bf.no_id]].float()
            ref.append(torch.softmax(lg, -1)[0].item())
    np.testing.assert_allclose(before, ref, atol=BF16_ATOL)


@pytest.mark.parametrize("native", [True, False])
def test_auto_chooses_bf16_exactly_where_the_cpu_has_it(ml100k, monkeypatch, native):
    monkeypatch.delenv(backbone.CPU_BF16_ENV, raising=False)  # the hardware decides (undo --cpu-bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert backbone.supports_bf16(cpu) is native
    assert backbone.use_bf16("auto", cpu) is native
    assert backbone.use_bf16("bf16", cpu) and not backbone.use_bf16("fp32", cpu)  # forced either way
    assert make_model(tiny_config(), ml100k, lora=False).bf16 is native
    assert make_model(tiny_config(model=FP32), ml100k, lora=False).bf16 is False
    assert make_model(tiny_config(model=BF16), ml100k, lora=False).bf16 is True


def test_amx_alone_counts_as_native_bf16(monkeypatch):
    monkeypatch.delenv(backbone.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert backbone.supports_bf16(torch.device("cpu"))


@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_environment_overrides_the_cpu_detection(monkeypatch, forced):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: forced == "0")  # the opposite
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setenv(backbone.CPU_BF16_ENV, forced)
    assert backbone.use_bf16("auto", torch.device("cpu")) is (forced == "1")


@pytest.mark.parametrize("top_layers", [None, 1])
def test_bf16_shared_prompt_prefix_tracks_whole_prompts(ml100k, tiny_splits, top_layers):
    from privrec.train import bce_loss

    fp, bf = _pair(ml100k, top_layers, seed=4)
    items = bf.encode(tiny_splits.test[:24])
    shared = bf.score(items, batch_size=8, progress=False)
    with bf.whole_prompts():
        whole = bf.score(items, batch_size=8, progress=False)
    reference = fp.score(fp.encode(tiny_splits.test[:24]), batch_size=8, progress=False)
    bf.model.eval()
    assert bf.shared_prefix(items) is not None  # the shared path really ran
    np.testing.assert_allclose(shared, whole, atol=BF16_ATOL)
    np.testing.assert_allclose(shared, reference, atol=BF16_ATOL)
    assert spearmanr(shared, reference).statistic > 0.98
    # one training step's loss: the shared prefix (with grad) against whole prompts, both in bf16
    losses = []
    for prefix in ("auto", None):
        batch = bf.collate(items[:8], prefix)
        losses.append(bce_loss(bf.logits(batch), batch).item())
    assert abs(losses[0] - losses[1]) < BF16_ATOL
