"""Metrics against hand-computed closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privrec.metrics import (
    accuracy,
    auc,
    binary_metrics,
    hit_rate,
    logloss,
    ndcg,
    random_ranking_metrics,
    ranking_metrics,
    ranks_by_group,
    ranks_from_scores,
    uauc,
)


def test_auc_hand_computed():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # ties count half
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_logloss_and_accuracy_hand_computed():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert accuracy([1, 0, 1], [0.9, 0.6, 0.4]) == pytest.approx(1 / 3)


def test_uauc_averages_within_users_and_skips_one_class_users():
    users = ["a", "a", "a", "b", "b", "c"]
    labels = [1, 0, 0, 1, 0, 1]
    scores = [0.9, 0.1, 0.95, 0.2, 0.7, 0.5]
    # a: positive 0.9 vs negatives 0.1, 0.95 -> 1/2; b: 0.2 vs 0.7 -> 0; c skipped
    assert uauc(users, labels, scores) == pytest.approx(0.25)
    assert binary_metrics(labels, scores, users)["uauc"] == pytest.approx(0.25)


def test_ranking_metrics_hand_computed():
    ranks = [1, 2, 4, 11]
    assert hit_rate(ranks, 1) == 0.25 and hit_rate(ranks, 3) == 0.5 and hit_rate(ranks, 10) == 0.75
    assert ndcg(ranks, 3) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert ndcg(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)
    assert set(ranking_metrics(ranks)) == {"hr@1", "hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10"}


def test_ranks_from_scores_hand_computed_ties_pessimistic():
    scores = [[0.1, 0.5, 0.3],  # true 0.3: one higher -> rank 2
              [0.9, 0.2, 0.9],  # true 0.9 tied with one other -> placed below it: rank 2
              [0.4, 0.4, 0.4],  # constant scorer -> rank n, never 1
              [0.7, 0.1]]  # lists may differ in length: true 0.7 -> rank 1
    assert ranks_from_scores(scores, [2, 0, 1, 0]).tolist() == [2, 2, 3, 1]
    assert ranks_from_scores([[float("nan"), 0.2, -5.0]], [0]).tolist() == [3]  # NaN counts as -inf
    assert ranks_from_scores(np.array([[3.0, 1.0, 2.0]]), [2]).tolist() == [2]
    # ranks -> metrics by hand: ranks 2, 2, 3, 1 -> HR@1 1/4, HR@3 1, NDCG@3 (2/log2(3) + 1/2 + 1) / 4
    m = ranking_metrics([2, 2, 3, 1])
    assert m["hr@1"] == 0.25 and m["hr@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx((2 / math.log2(3) + 0.5 + 1) / 4)


def test_ranks_by_group_finds_each_groups_positive():
    users = ["a", "a", "a", "b", "b", "c", "c"]
    labels = [0, 1, 0, 1, 0, 0, 0]  # c has no positive: skipped
    scores = [0.9, 0.5, 0.1, 0.3, 0.3, 0.2, 0.1]
    assert ranks_by_group(users, labels, scores).tolist() == [2, 2]


def test_random_ranking_metrics_closed_form():
    r = random_ranking_metrics(10)
    assert r["hr@1"] == pytest.approx(0.1) and r["hr@5"] == pytest.approx(0.5) and r["hr@10"] == 1.0
    assert r["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3) + 1 / 2) / 10)
    # the expectation over every rank of a uniformly placed true item
    assert r["ndcg@5"] == pytest.approx(ranking_metrics(list(range(1, 11)))["ndcg@5"])


def test_uauc_equals_the_mean_of_per_user_aucs_with_ties():
    rng = np.random.default_rng(0)
    users, labels = rng.integers(0, 15, 300), rng.integers(0, 2, 300)
    scores = np.round(rng.random(300), 1)  # many ties
    per_user = [auc(labels[users == u], scores[users == u]) for u in np.unique(users)
                if 0 < labels[users == u].sum() < (users == u).sum()]
    assert uauc(users, labels, scores) == pytest.approx(np.mean(per_user), abs=1e-12)
