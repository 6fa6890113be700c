"""E2URec and its baselines on the tiny random Llama: the teacher formula, the frozen original under the
student, one saved adapter equal to the stacked pair, forgetting a planted signal, and the membership attack
on a model that memorised a planted set. Also the two core hooks they rely on (pair logits, schedule length).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config

from privrec.config import parse_config
from privrec.data import build_splits
from privrec.model.adapters import adapter_state, save_adapter
from privrec.model.recmodel import Batch
from privrec.train import train
from privrec.unlearning.approx import baselines
from privrec.unlearning.approx.e2urec import (
    build_student,
    combined_lora_config,
    concat_lora,
    e2urec,
    e2urec_loss,
    forgetting_teacher,
    p_yes,
)
from privrec.unlearning.approx.task import UnlearnConfig, UnlearnTask, paired_plan, student_lora
from privrec.unlearning.measures import (
    MiaSets,
    Outputs,
    jensen_shannon,
    logistic_attack,
    loss_threshold_attack,
)

FAST = {"threads": 1, "precision": "fp32"}  # the tiny model is ~50x faster in fp32 on one thread here


def fast_config(**sections):
    sections["model"] = {**FAST, **sections.get("model", {})}
    return tiny_config(**sections)


def unlearn_config(cfg, **unlearn) -> UnlearnConfig:
    raw = cfg.model_dump()
    raw["unlearn"] = unlearn
    return parse_config(raw, UnlearnConfig)


def relabel(samples, item, label, tag):
    return [dataclasses.replace(s, item_id=item, label=label, sample_id=f"{s.sample_id}-{tag}") for s in samples]


# --- pure pieces -------------------------------------------------------------------------------------------
def test_forgetting_teacher_equals_the_formula():
    z_orig = np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0]])
    z_aug = np.array([[3.0, -2.0], [0.5, 1.0], [-1.0, 4.0]])
    # alpha = 2: z_orig - 2 * max(z_aug - z_orig, 0), elementwise
    expected = np.array([[1 - 2 * 2, -1.0], [0.5, 2.0], [0.0, 0 - 2 * 4]])
    np.testing.assert_array_equal(forgetting_teacher(z_orig, z_aug, 2.0), expected)
    got = forgetting_teacher(torch.tensor(z_orig), torch.tensor(z_aug), 2.0)
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(forgetting_teacher(z_orig, z_aug, 0.0), z_orig)  # alpha 0: the original
    # P(Yes) of a logit pair = softmax([z_yes, z_no])[0] = sigmoid of the difference
    pair = np.array([[2.0, 0.5], [-1.0, 1.0]])
    soft = np.exp(pair) / np.exp(pair).sum(1, keepdims=True)
    np.testing.assert_allclose(p_yes(pair), soft[:, 0], rtol=1e-12)
    np.testing.assert_allclose(p_yes(pair[:, 0] - pair[:, 1]), soft[:, 0], rtol=1e-12)


def test_concat_lora_equals_the_sum_of_the_scaled_parts():
    g = torch.Generator().manual_seed(0)

    def lora(r, modules):
        st = {}
        for m, (d_in, d_out) in modules.items():
            st[f"{m}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
            st[f"{m}.lora_B.weight"] = torch.randn(d_out, r, generator=g)
        return st

    a = lora(8, {"l1.q_proj": (6, 6), "l1.v_proj": (6, 4)})
    b = lora(16, {"l1.q_proj": (6, 6), "l0.q_proj": (6, 6)})  # shares q of l1; l0 only here; no v
    out = concat_lora([(a, 2.0), (b, 0.5)])
    assert set(out) == set(a) | set(b)

    def delta(st, m, s=1.0):
        return s * st[f"{m}.lora_B.weight"] @ st[f"{m}.lora_A.weight"] if f"{m}.lora_A.weight" in st else 0

    for m in ("l1.q_proj", "l1.v_proj", "l0.q_proj"):
        assert out[f"{m}.lora_A.weight"].shape[0] == 24
        torch.testing.assert_close(delta(out, m), delta(a, m, 2.0) + delta(b, m, 0.5), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="plain LoRA"):
        concat_lora([({"x.lora_magnitude_vector": torch.zeros(3)}, 1.0)])


class _Item:
    def __init__(self, sid):
        self.sample_id = sid


def test_e2urec_loss_is_forget_only_then_the_beta_mixture():
    p_f, p_r = {"f1": 0.2, "f2": 0.9}, {"r1": 0.7}
    loss = e2urec_loss(p_f, p_r, beta=0.4, label_weight=1.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def batch(ids, labels):
        return Batch([_Item(i) for i in ids], None, None, torch.ones(len(ids), 1), torch.zeros(len(ids)),
                     torch.tensor(labels, dtype=torch.float32))

    z = torch.tensor([0.3, -1.0])
    forget_only = loss(z, batch(["f1", "f2"], [1.0, 0.0]))
    torch.testing.assert_close(forget_only, bce(z, torch.tensor([0.2, 0.9])))  # labels play no part
    z = torch.tensor([0.3, -1.0, 2.0])
    mixed = loss(z, batch(["f1", "f2", "r1"], [1.0, 0.0, 0.0]))
    l_forget = bce(z[:2], torch.tensor([0.2, 0.9]))
    l_remember = bce(z[2:], torch.tensor([0.7])) + bce(z[2:], torch.tensor([0.0]))
    torch.testing.assert_close(mixed, 0.4 * l_forget + 0.6 * l_remember)


def test_paired_plan_first_epochs_forget_only_then_forget_plus_retained():
    plan = paired_plan(n_forget=10, n_retain=7, batch_size=4, forget_only_epochs=1)
    data = list(range(17))
    e0 = plan(0, np.random.default_rng(0), data)
    assert sorted(i for b in e0 for i in b) == list(range(10))
    e1 = plan(1, np.random.default_rng(1), data)
    assert len(e1) == 3 and sorted(i for b in e1 for i in b if i < 10) == list(range(10))
    for b in e1:
        f, r = [i for i in b if i < 10], [i for i in b if i >= 10]
        assert len(r) == 4 and len(f) in (4, 2) and all(10 <= i < 17 for i in r)


# --- core hooks --------------------------------------------------------------------------------------------
def test_scorer_pair_logits_match_the_difference(ml100k, tiny_splits):
    m = make_model(fast_config(lora={"top_layers": 1}), ml100k)
    items = m.encode(tiny_splits.test[:12])
    pair = m.score_logits(items, progress=False, pair=True)
    assert pair.shape == (12, 2)
    np.testing.assert_allclose(pair[:, 0] - pair[:, 1], m.score_logits(items, progress=False), atol=1e-5)


def test_schedule_spans_every_epochs_plan(ml100k, tiny_splits):
    """A plan with 1 batch in epoch 0 and 3 in epoch 1 under a linear schedule: the last step still moves the
    weights (a schedule sized from epoch 0 alone would have decayed the learning rate to 0 by then)."""
    cfg = fast_config(train={"epochs": 2, "lr": 1e-2, "schedule": "linear", "batch_size": 4})
    m = make_model(cfg, ml100k)
    items = m.encode(tiny_splits.train[:12])
    snapshots = []

    def plan(epoch, rng, data):
        return [[0, 1, 2, 3]] if epoch == 0 else [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]

    def snapshot():
        snapshots.append(adapter_state(m.model))
        return torch.zeros(())

    res = train(m, items, cfg.train, seed=0, batch_plan=plan, regularizer=snapshot, progress=False)
    assert res.steps == 4 and len(snapshots) == 4
    final, before_last = adapter_state(m.model), snapshots[-1]
    assert any(not torch.equal(final[k], before_last[k]) for k in final)


# --- the student: frozen original + fresh LoRA ------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(ml100k):
    """Forget users' samples say Yes to one movie; everyone else's say No to another. The original learns
    both (short of the tiny model's ceiling of P(Yes) ~ 0.86, so tuning on the forget set can still push);
    a model retrained without the forget set has no reason to say Yes to the first."""
    cfg = fast_config(data={"n_train": 96, "n_valid": 16, "n_test": 64},
                      lora={"r": 8, "alpha": 16, "top_layers": 1,
                            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                      train={"epochs": 3, "lr": 3e-3, "batch_size": 8})
    sp = build_splits(ml100k, cfg.data, cfg.seed)
    forget = relabel(sp.train[:32], 50, 1, "f")  # Star Wars -> Yes
    retain = relabel(sp.train[32:], 181, 0, "r")  # Return of the Jedi -> No
    model = make_model(cfg, ml100k)
    f_items, r_items = model.encode(forget), model.encode(retain)
    train(model, f_items + r_items, cfg.train, seed=0, progress=False)
    return cfg, sp, model, adapter_state(model.model), f_items, r_items


def make_task(ml100k, planted, **unlearn) -> UnlearnTask:
    cfg, _, model, state, f_items, r_items = planted
    from privrec.model.adapters import load_adapter_state

    load_adapter_state(model.model, state)  # a method may have tuned it in place
    ucfg = unlearn_config(cfg, **unlearn)
    return UnlearnTask(ucfg, ml100k, model, state, f_items, r_items, r_items, [], seed=0, progress=False,
                       log=lambda msg: None)


@pytest.mark.parametrize("student_top", [None, 2])
def test_only_the_student_lora_trains_and_starts_as_the_original(ml100k, planted, student_top):
    task = make_task(ml100k, planted, e2urec={"lora": {"top_layers": student_top}})
    student = build_student(task)
    assert student.cut == (1 if student_top is None else 0)  # cached layers sit below both adapters
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in student.model.named_parameters() if not p.requires_grad}
    assert any(".original." in n for n in frozen_before)
    lora_before = {n: p.detach().clone() for n, p in student.model.named_parameters() if p.requires_grad}
    # a fresh LoRA adds exactly nothing: the student starts as the original model
    probe = task.forget[:8] + task.retain[:8]
    np.testing.assert_allclose(student.score(probe, progress=False), task.model.score(probe, progress=False),
                               atol=1e-6)
    targets = {e.sample_id: 0.5 for e in task.forget + task.retain}
    train(student, task.forget + task.retain, task.cfg.unlearn.e2urec.train, 0,
          loss_fn=e2urec_loss({k: v for k, v in targets.items() if k.endswith("-f")},
                              {k: v for k, v in targets.items() if k.endswith("-r")}, 0.4, 1.0),
          batch_plan=paired_plan(len(task.forget), len(task.retain), 16, 1), progress=False)
    after = dict(student.model.named_parameters())
    for n, t in frozen_before.items():
        assert torch.equal(after[n].detach(), t), f"{n} changed"  # base and original adapter: bit-identical
    assert any(not torch.equal(after[n].detach(), t) for n, t in lora_before.items())


def test_one_saved_adapter_scores_as_the_stacked_original_plus_student(ml100k, planted, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from privrec.model.recmodel import RecLM

    task = make_task(ml100k, planted, e2urec={"lora": {"top_layers": 2}})
    student = build_student(task)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # a student that changes the output
    probe = task.forget[:8] + task.retain[:8]
    stacked = student.score(probe, progress=False)
    assert np.abs(stacked - task.model.score(probe, progress=False)).max() > 1e-3
    cfg, s_lora = task.cfg, student_lora(task.cfg)
    state = concat_lora([(task.original_state, cfg.lora.alpha / cfg.lora.r),
                         (adapter_state(student.model), s_lora.alpha / s_lora.r)])
    lora = combined_lora_config([cfg.lora, s_lora])
    assert lora.r == 8 + 16 and lora.top_layers == 2
    merged = RecLM.from_config(cfg, ml100k)
    merged.attach_lora(lora, 0)
    from privrec.model.adapters import load_adapter_state

    load_adapter_state(merged.model, state)
    np.testing.assert_allclose(merged.score(probe, progress=False), stacked, atol=1e-5)
    save_adapter(merged.model, tmp_path / "adapter", {})
    base = AutoModelForCausalLM.from_pretrained(merged.model.get_base_model().name_or_path, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = [torch.softmax(plain(input_ids=torch.tensor([e.ids])).logits[0, -1, [merged.yes_id, merged.no_id]]
                             .double(), -1)[0].item() for e in probe]
    np.testing.assert_allclose(stacked, ref, atol=1e-4)


# sized for the tiny model: a few Adam steps at the paper's lr 1e-3 barely move it
TINY_E2UREC = {"augment": {"epochs": 2, "lr": 1e-2}, "train": {"epochs": 4, "lr": 5e-3}}


def test_e2urec_moves_forget_predictions_toward_the_retrained_model(ml100k, planted):
    task = make_task(ml100k, planted, e2urec=TINY_E2UREC)
    p_original = task.model.score(task.forget, progress=False)
    retrained = baselines.retrain(task).model.score(task.forget, progress=False)
    result = e2urec(task)
    p_e2urec = result.model.score(task.forget, progress=False)
    np.testing.assert_allclose(task.model.score(task.forget, progress=False), p_original, atol=1e-6)  # restored
    assert p_original.mean() > retrained.mean() + 0.1  # the planted signal: only the original says Yes
    jsd_nothing, jsd_e2urec = jensen_shannon(p_original, retrained), jensen_shannon(p_e2urec, retrained)
    assert jsd_e2urec < 0.25 * jsd_nothing, (jsd_nothing, jsd_e2urec)
    teach = result.details["teacher_mean_p_yes_forget"]
    assert teach["augmented"] > teach["original"] + 0.2  # tuning on the forget set pushed Yes up ...
    assert teach["forgetting"] < teach["original"] - 0.1  # ... so the forgetting teacher pushes it down
    assert result.lora.r == 8 + 16 and not result.trained_on_retained_only


def test_the_forgetting_teacher_is_what_forgets(ml100k, planted):
    """L_forget alone (beta = 1): with alpha = 0 the teacher is the original and the student stays put; with
    alpha = 2 it follows the forgetting teacher towards the retrained model."""
    task = make_task(ml100k, planted)
    retrained = baselines.retrain(task).model.score(task.forget, progress=False)
    jsd = {}
    for alpha in (0.0, 2.0):
        task = make_task(ml100k, planted, e2urec={**TINY_E2UREC, "alpha": alpha, "beta": 1.0})
        jsd[alpha] = jensen_shannon(e2urec(task).model.score(task.forget, progress=False), retrained)
    assert jsd[2.0] < 0.25 * jsd[0.0], jsd


def test_neggrad_ascends_the_forget_loss_and_bad_teacher_follows_its_teachers(ml100k, planted):
    from privrec.metrics import logloss

    fast = {"train": {"lr": 3e-3}}
    task = make_task(ml100k, planted, neggrad=fast)
    labels = [e.label for e in task.forget]
    p_forget, p_retain = task.model.score(task.forget, progress=False), task.model.score(task.retain, progress=False)
    after = baselines.neggrad(task).model.score(task.forget, progress=False)
    assert logloss(labels, after) > logloss(labels, p_forget) + 0.2

    task = make_task(ml100k, planted, bad_teacher=fast)
    result = baselines.bad_teacher(task)
    bad = np.random.default_rng([0, 13]).uniform(size=len(task.forget))  # the uniform teacher, same seed
    assert abs(result.details["bad_teacher_mean_p_yes"] - bad.mean()) < 1e-12
    f_after, r_after = (result.model.score(task.forget, progress=False),
                        result.model.score(task.retain, progress=False))
    assert np.abs(f_after - bad).mean() < np.abs(p_forget - bad).mean() - 0.05  # towards the bad teacher
    assert np.abs(r_after - p_retain).mean() < 0.05  # retained samples stay with the original


# --- membership inference on a model that memorised a planted set ------------------------------------------
def test_mia_is_near_one_on_memorised_samples_and_near_half_on_unseen(ml100k):
    """Canaries: the model learns a rule (movie A -> Yes, movie B -> No) and memorises 32 planted samples that
    break it (A -> No). Never-seen samples of the same kind (A -> No) follow the rule, so their loss is high.
    The attack, fit on half of the canaries vs some never-seen ones, recognises the other half as members; and
    it cannot tell two sets of never-seen samples apart. (The tiny model's final norm gain is raised 4x so its
    head can be as confident as a real LM's: otherwise P(Yes) saturates near 0.14 / 0.86.)"""
    cfg = fast_config(data={"n_train": 128, "n_valid": 8, "n_test": 480},
                      lora={"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                      train={"epochs": 10, "lr": 5e-3, "batch_size": 8})
    sp = build_splits(ml100k, cfg.data, cfg.seed)
    model = make_model(cfg, ml100k)
    with torch.no_grad():
        model._inner().norm.weight.mul_(4.0)
    rule = model.encode(relabel(sp.train[:48], 50, 1, "y") + relabel(sp.train[48:96], 181, 0, "n"))
    canaries = model.encode(relabel(sp.train[96:128], 50, 0, "c"))
    unseen = model.encode(relabel(sp.test, 50, 0, "u"))
    unseen = [unseen[i] for i in np.random.default_rng(0).permutation(len(unseen))]  # (test is in time order)
    train(model, rule + canaries, cfg.train, seed=0, progress=False)

    def outputs(items):
        return Outputs([e.label for e in items], model.score(items, progress=False))

    members_fit, forget = outputs(canaries[:16]), outputs(canaries[16:])
    assert forget.loss.max() < 0.2  # memorised
    unseen_fit, unseen_eval, never = outputs(unseen[:160]), outputs(unseen[160:320]), outputs(unseen[320:])
    assert np.median(unseen_eval.loss) > 1.0  # the rule, not the canaries, decides never-seen samples
    remembered = MiaSets(members_fit, unseen_fit, forget, unseen_eval)
    not_members = MiaSets(members_fit, unseen_fit, never, unseen_eval)
    for attack, key in ((loss_threshold_attack, "mia_loss_accuracy"), (logistic_attack, "mia_logistic_accuracy")):
        assert attack(remembered)[key] > 0.85
        assert abs(attack(not_members)[key] - 0.5) < 0.1
