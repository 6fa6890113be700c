"""FedABC's balanced batches (METHODS §3): label ratio per batch, hard majority samples, the train loop hook."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from conftest import make_model, tiny_config
from fed_helpers import restore_threads  # noqa: F401 (autouse fixture)

from privrec.federated.fedabc import fedabc_plan, select_balanced, stratified_batches
from privrec.model.recmodel import Encoded


def fake_items(n_pos: int, n_neg: int) -> list[Encoded]:
    labels = [1.0] * n_pos + [0.0] * n_neg
    order = np.random.default_rng(3).permutation(len(labels))
    return [Encoded(f"s{i}", (1, 2, 3), labels[i], f"k{i}") for i in order]


@pytest.mark.parametrize("ratio,batch,per_batch", [(1.0, 8, (4, 4)), (3.0, 8, (2, 6)), (1.0, 6, (3, 3))])
def test_batches_hold_the_configured_label_ratio(ratio, batch, per_batch):
    items = fake_items(n_pos=24, n_neg=90)  # positives are the minority
    plan = fedabc_plan(lambda xs: np.zeros(len(xs)), batch, ratio, hard=0.0)
    batches = plan(0, np.random.default_rng(0), items)
    n_min, n_maj = 24, min(90, round(ratio * 24))
    assert sum(len(b) for b in batches) == n_min + n_maj  # every positive, majority cut to r x minority
    assert sum(items[i].label == 1.0 for b in batches for i in b) == 24
    for b in batches[:-1]:
        counts = Counter(items[i].label for i in b)
        assert (counts[1.0], counts[0.0]) == per_batch, counts
    assert len({i for b in batches for i in b}) == n_min + n_maj  # no sample twice


def test_majority_is_drawn_afresh_each_epoch():
    items = fake_items(10, 60)
    plan = fedabc_plan(lambda xs: np.zeros(len(xs)), 8, 1.0, hard=0.0)
    kept = [frozenset(i for b in plan(e, np.random.default_rng([0, e]), items) for i in b) for e in range(3)]
    assert kept[0] != kept[1] != kept[2]
    assert all(len(k) == 20 for k in kept)


def test_hard_fraction_keeps_the_highest_loss_majority_samples():
    labels = np.array([1] * 5 + [0] * 20, dtype=float)
    losses = np.concatenate([np.zeros(5), np.arange(20, dtype=float)])  # sample 24 is the hardest negative
    rng = np.random.default_rng(0)
    minority, majority = select_balanced(labels, losses, ratio=2.0, hard=0.5, rng=rng)
    assert sorted(minority) == [0, 1, 2, 3, 4]
    assert len(majority) == 10
    hardest5 = {24, 23, 22, 21, 20}
    assert hardest5 <= set(majority)  # h = 0.5 of 10 kept: the 5 highest-loss ones
    _, all_hard = select_balanced(labels, losses, ratio=2.0, hard=1.0, rng=rng)
    assert set(all_hard) == set(range(15, 25))
    _, none_hard = select_balanced(labels, losses, ratio=2.0, hard=0.0, rng=np.random.default_rng(1))
    assert not hardest5 <= set(none_hard)


def test_plan_scores_only_the_majority_once_per_epoch():
    items = fake_items(6, 30)
    calls = []

    def scorer(xs):
        calls.append(len(xs))
        return np.array([5.0 if x.sample_id in ("s7", "s8") else 0.0 for x in xs])  # confident "Yes" on negatives

    plan = fedabc_plan(scorer, 4, 1.0, hard=1.0)
    first = plan(0, np.random.default_rng([0, 0]), items)
    again = plan(0, np.random.default_rng([0, 0]), items)  # the loop's second call for epoch 0
    assert first == again and calls == [30]
    kept = {items[i].sample_id for b in first for i in b}
    wrong_negatives = {x.sample_id for x in items if x.label == 0.0 and x.sample_id in ("s7", "s8")}
    assert wrong_negatives <= kept


def test_one_label_client_trains_on_everything():
    items = fake_items(0, 13)
    batches = fedabc_plan(lambda xs: np.zeros(len(xs)), 4, 1.0, 0.5)(0, np.random.default_rng(0), items)
    assert sorted(i for b in batches for i in b) == list(range(13))
    assert stratified_batches([], [0, 1, 2], 2, np.random.default_rng(0)) != []


def test_fedabc_plan_drives_the_shared_training_loop(ml100k, tiny_splits):
    from privrec.train import train

    cfg = tiny_config(train={"epochs": 2, "batch_size": 4}, model={"threads": 1})
    m = make_model(cfg, ml100k)
    items = m.encode(tiny_splits.train[:40])
    labels = [e.label for e in items]
    n_min = int(min(sum(labels), len(labels) - sum(labels)))
    seen_batches = []
    plan = fedabc_plan(lambda xs: m.score_logits(xs, 16, progress=False), 4, 1.0, 0.5)

    def recording_plan(epoch, rng, data):
        b = plan(epoch, rng, data)
        seen_batches.append(b)
        return b

    res = train(m, items, cfg.train, seed=0, batch_plan=recording_plan, progress=False)
    assert res.samples_seen == 2 * 2 * n_min  # minority + as many majority, two epochs
    for b in seen_batches[-1][:-1]:
        assert sum(items[i].label for i in b) == 2  # 2 of each label in every batch of 4
