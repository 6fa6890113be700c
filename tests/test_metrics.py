"""Metrics against hand-computed closed forms."""

from __future__ import annotations

import math

import pytest

from privrec.metrics import accuracy, auc, binary_metrics, hit_rate, logloss, ndcg, ranking_metrics, uauc


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
