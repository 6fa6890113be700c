"""The honest references: exact like-rate, shrunk item mean, and a logistic regression that learns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from privrec import baselines
from privrec.metrics import auc


def test_like_rate_is_the_prompts_history_share(tiny_splits, ml100k):
    from privrec.config import parse_config
    from privrec.prompts import PromptBuilder

    pb = PromptBuilder(ml100k, parse_config({}).prompt)
    lr = baselines.like_rate(tiny_splits.test, 3.0)
    for s, v in zip(tiny_splits.test, lr):
        text = pb.tallrec_input(s)
        liked = text.split("\n")[0].removeprefix("User Preference: ")
        n_liked = sum(r > 3 for _, r in s.history)
        assert v == pytest.approx(n_liked / 10)
        assert liked.count('"') == 2 * n_liked or n_liked == 0  # the same items the prompt calls liked


def test_item_mean_shrinks_to_global():
    from privrec.data import Sample

    mk = lambda item, label, u: Sample(f"u{u}-i{item}", u, item, 0, 5.0 if label else 1.0, label, ())
    train = [mk(1, 1, 1), mk(1, 1, 2), mk(2, 0, 1)]
    g = 2 / 3
    got = baselines.item_mean(train, [mk(1, 0, 3), mk(2, 0, 3), mk(3, 0, 3)])  # test users rate after training
    np.testing.assert_allclose(got, [(2 + 5 * g) / 7, (0 + 5 * g) / 6, g])


def test_logistic_regression_learns_a_planted_item_effect(tiny_splits, ml100k):
    rng = np.random.default_rng(0)
    good = set(rng.choice(sorted(ml100k.items), 800, replace=False).tolist())
    relabel = lambda ss: [dataclasses.replace(s, label=int(s.item_id in good)) for s in ss]
    from privrec.config import parse_config
    from privrec.data import build_splits

    sp = build_splits(ml100k, parse_config({"data": {"n_train": 4000, "n_test": 300}}).data, 0)
    train, test = relabel(sp.train), relabel(sp.test)
    p = baselines.logistic_onehot(ml100k, train, test, 3.0, with_like_rate=False)
    assert auc([s.label for s in test], p) > 0.8
    refs = baselines.references(ml100k, train, test, 3.0)
    assert refs["item-mean"]["auc"] > 0.8 and abs(refs["like-rate"]["auc"] - 0.5) < 0.15
