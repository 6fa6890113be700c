"""The one training loop: it learns, it resumes exactly, it keeps the best epoch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config

from privrec.metrics import auc
from privrec.model.adapters import adapter_state
from privrec.rundir import CHECKPOINT_FILE
from privrec.train import train


def planted(samples, ml100k):
    """Relabel: the target decides the label (item A -> Yes, item B -> No), histories stay real."""
    a, b = 50, 181  # Star Wars, Return of the Jedi: similar titles, opposite labels
    out = []
    for k, s in enumerate(samples):
        item = a if k % 2 == 0 else b
        out.append(dataclasses.replace(s, item_id=item, label=int(item == a), sample_id=f"{s.sample_id}-p{k}"))
    return out


def test_training_on_a_learnable_signal_lowers_loss_and_raises_auc(ml100k, tiny_splits):
    cfg = tiny_config(lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                      train={"epochs": 6, "lr": 5e-3, "batch_size": 8})
    m = make_model(cfg, ml100k)
    tr = m.encode(planted(tiny_splits.train, ml100k))
    te_samples = planted(tiny_splits.test, ml100k)
    te = m.encode(te_samples)
    labels = [s.label for s in te_samples]
    auc_before = auc(labels, m.score(te, progress=False))
    res = train(m, tr, cfg.train, seed=0, progress=False)
    auc_after = auc(labels, m.score(te, progress=False))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert auc_after > max(0.9, auc_before + 0.2), (auc_before, auc_after)
    assert res.samples_seen == 6 * len(tr) and res.steps == 6 * 8


class Interrupt(Exception):
    pass


def test_resume_after_interrupted_epoch_matches_uninterrupted(ml100k, tiny_splits, tmp_path):
    cfg = tiny_config(lora={"top_layers": 1}, train={"epochs": 3, "lr": 5e-3, "schedule": "cosine",
                                                      "warmup_ratio": 0.2, "eval_every": 2})
    data = planted(tiny_splits.train[:40], ml100k)

    def run(out, interrupt_at=None, resume=False):
        m = make_model(cfg, ml100k)
        items = m.encode(data)
        valid = m.encode(planted(tiny_splits.valid, ml100k))

        def on_epoch(rec):
            if rec["epoch"] == interrupt_at:
                raise Interrupt  # dies in epoch 2, after its work, before its checkpoint
        res = train(m, items, cfg.train, seed=0, valid=valid, checkpoint_dir=out, resume=resume,
                    progress=False, on_epoch=on_epoch)
        return adapter_state(m.model), res

    whole, res_whole = run(tmp_path / "a")
    with pytest.raises(Interrupt):
        run(tmp_path / "b", interrupt_at=2)
    ck = torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)  # tensors, numbers and JSON text only
    assert ck["epoch"] == 0  # only epoch 1 was checkpointed
    resumed, res_resumed = run(tmp_path / "b", resume=True)
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(whole[k], resumed[k], atol=1e-6, rtol=0)
    assert [h["valid_auc"] for h in res_whole.history] == pytest.approx(
        [h["valid_auc"] for h in res_resumed.history])
    assert res_whole.best_epoch == res_resumed.best_epoch
    # the learning curve (mid-epoch points included) is the same, and the interrupted epoch's points are not doubled
    assert [(p["samples_seen"], p["steps"]) for p in res_whole.curve] == [
        (p["samples_seen"], p["steps"]) for p in res_resumed.curve]
    for key in ("valid_auc", "valid_uauc"):
        assert [p[key] for p in res_whole.curve] == pytest.approx([p[key] for p in res_resumed.curve], nan_ok=True)


def test_eval_every_adds_curve_points_without_changing_training(ml100k, tiny_splits):
    from privrec.metrics import uauc

    def run(eval_every, select="auc"):
        cfg = tiny_config(lora={"top_layers": 1}, train={"epochs": 2, "lr": 5e-3, "eval_every": eval_every,
                                                          "select": select})
        m = make_model(cfg, ml100k)
        res = train(m, m.encode(tiny_splits.train[:40]), cfg.train, seed=0, valid=m.encode(tiny_splits.valid),
                    progress=False)
        return m, res

    m, res = run(2)  # 40 samples / batch 8 = 5 steps per epoch: points after steps 2, 4, 5 | 6, 8, 10
    assert [p["steps"] for p in res.curve] == [2, 4, 5, 6, 8, 10]
    assert [p["samples_seen"] for p in res.curve] == [16, 32, 40, 48, 64, 80]
    assert [p["epoch"] for p in res.curve] == pytest.approx([0.4, 0.8, 1.0, 1.2, 1.6, 2.0])
    secs = [p["seconds"] for p in res.curve]
    assert secs == sorted(secs) and secs[-1] == pytest.approx(res.seconds)
    ends = [p for p in res.curve if p["epoch"] == int(p["epoch"])]
    assert [p["valid_auc"] for p in ends] == [h["valid_auc"] for h in res.history]
    # every epoch record carries the validation UAUC; the kept (best) adapter scores what its record says
    assert all("valid_uauc" in h for h in res.history)
    valid = tiny_splits.valid
    best = res.history[res.best_epoch - 1]
    probs = m.score(m.encode(valid), progress=False)
    assert uauc([s.user_id for s in valid], [s.label for s in valid], probs) == pytest.approx(best["valid_uauc"])
    assert res.best_valid_uauc == pytest.approx(best["valid_uauc"])
    # scoring mid-epoch never moves the training: the same weights as without eval_every
    m0, res0 = run(None)
    assert [p["steps"] for p in res0.curve] == [5, 10]
    a, b = adapter_state(m.model), adapter_state(m0.model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_select_uauc_keeps_the_best_uauc_epoch(ml100k, tiny_splits):
    cfg = tiny_config(train={"epochs": 3, "lr": 5e-2, "select": "uauc"})
    m = make_model(cfg, ml100k)
    items, valid = m.encode(tiny_splits.train[:32]), m.encode(tiny_splits.valid)
    res = train(m, items, cfg.train, seed=1, valid=valid, progress=False)
    uaucs = [h["valid_uauc"] for h in res.history]
    assert res.best_epoch == 1 + int(np.nanargmax(uaucs)) and res.best_valid_uauc == max(uaucs)
    assert res.best_valid_auc == res.history[res.best_epoch - 1]["valid_auc"]
    no_users = [dataclasses.replace(e, user_id=None) for e in valid]
    with pytest.raises(ValueError, match="select=uauc"):
        train(m, items, cfg.train, seed=1, valid=no_users, progress=False)


def test_select_last_keeps_the_final_epoch_whatever_validation_says(ml100k, tiny_splits):
    """``select: last`` (a memorising original, METHODS §8): the final epoch's weights are kept even where an
    earlier epoch scored better on validation, and early stopping never fires."""
    cfg = tiny_config(train={"epochs": 4, "lr": 5e-2, "select": "last", "early_stopping": 1})
    m = make_model(cfg, ml100k)
    items, valid = m.encode(tiny_splits.train[:32]), m.encode(tiny_splits.valid)
    res = train(m, items, cfg.train, seed=1, valid=valid, progress=False)
    assert res.epochs_run == 4 and res.best_epoch == 4 and not res.stopped_early
    assert res.best_valid_auc == res.history[-1]["valid_auc"]
    last = adapter_state(m.model)
    m2 = make_model(cfg, ml100k)  # the same run without validation keeps the last epoch too: same weights
    train(m2, items, cfg.train, seed=1, valid=None, progress=False)
    for k, v in adapter_state(m2.model).items():
        torch.testing.assert_close(v, last[k], atol=0, rtol=0)


def test_best_epoch_is_restored_and_early_stopping_stops(ml100k, tiny_splits):
    cfg = tiny_config(train={"epochs": 6, "lr": 5e-2, "early_stopping": 1})
    m = make_model(cfg, ml100k)
    items = m.encode(tiny_splits.train[:32])
    valid_s = tiny_splits.valid
    valid = m.encode(valid_s)
    res = train(m, items, cfg.train, seed=1, valid=valid, progress=False)
    aucs = [h["valid_auc"] for h in res.history]
    assert res.best_valid_auc == max(aucs)
    final = auc([s.label for s in valid_s], m.score(valid, progress=False))
    assert final == pytest.approx(max(aucs), abs=1e-9)  # the best epoch's weights are what we keep
    if res.stopped_early:
        assert len(aucs) < 6 and aucs[-1] <= res.best_valid_auc


def test_train_refuses_without_trainable_weights(ml100k, tiny_splits):
    m = make_model(tiny_config(), ml100k, lora=False)
    for p in m.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        train(m, m.encode(tiny_splits.train[:4]), tiny_config().train, seed=0, progress=False)


def test_seed_determines_result(ml100k, tiny_splits):
    cfg = tiny_config(train={"epochs": 1, "lr": 1e-2})

    def once(seed):
        m = make_model(cfg.model_copy(update={"seed": seed}), ml100k)
        train(m, m.encode(tiny_splits.train[:24]), cfg.train, seed=seed, progress=False)
        return np.concatenate([v.flatten().numpy() for v in adapter_state(m.model).values()])

    a, b, c = once(0), once(0), once(1)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_lr_schedule_hand_computed():
    from privrec.train import lr_factor

    cfg = tiny_config(train={"warmup_ratio": 0.2, "schedule": "linear"}).train
    # 10 steps: warm-up over 2 steps (1/2, 2/2), then linear decay over the 8 remaining
    assert [lr_factor(cfg, s, 10) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 7 / 8])
    assert lr_factor(cfg, 9, 10) == pytest.approx(1 / 8)
    cos = cfg.model_copy(update={"schedule": "cosine", "warmup_ratio": 0.0})
    assert lr_factor(cos, 5, 10) == pytest.approx(0.5)
    const = cfg.model_copy(update={"schedule": "constant"})
    assert lr_factor(const, 9, 10) == 1.0
