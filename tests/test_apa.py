"""APA's sample-adaptive weights (METHODS §4), checked against hand-computed values; no model needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privrec.unlearning.exact.apa import (
    aggregate,
    apa_weights,
    nearest,
    neighbour_errors,
    own_shares,
    prediction_errors,
    self_in_pool,
    softmax_weights,
    with_own,
)


def test_tau_zero_gives_uniform_weights():
    errors = np.random.default_rng(0).uniform(size=(7, 4))
    np.testing.assert_array_equal(softmax_weights(errors, 0.0), np.full((7, 4), 0.25))


def test_softmax_weights_match_hand_computation():
    w = softmax_weights(np.array([[0.1, 0.3]]), tau=10.0)
    # omega_0 = e^{-1} / (e^{-1} + e^{-3}) = 1 / (1 + e^{-2})
    assert w[0, 0] == pytest.approx(1 / (1 + math.exp(-2)), abs=1e-12)
    assert w.sum() == pytest.approx(1.0)
    # tau = 1000 (the paper's): practically all weight on the lowest-error adapter, no overflow
    w = softmax_weights(np.array([[0.30, 0.20, 0.25]]), tau=1000.0)
    assert w[0].argmax() == 1 and w[0, 1] > 0.999 and np.isfinite(w).all()


def test_prediction_errors():
    probs = np.array([[0.9, 0.2], [0.4, 0.7]])
    labels = [1, 0]
    np.testing.assert_allclose(prediction_errors(probs, labels, "abs"), [[0.1, 0.8], [0.4, 0.7]])
    np.testing.assert_allclose(prediction_errors(probs, labels, "squared"), [[0.01, 0.64], [0.16, 0.49]])


def test_neighbours_are_cosine_nearest_and_errors_their_mean():
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]])
    pool_errors = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.6], [0.5, 0.5]])
    query = np.array([[10.0, 0.5]])  # direction close to rows 0 and 2; its length must not matter
    assert nearest(query, pool, 2).tolist() == [[0, 2]]
    assert nearest(query, pool * np.array([[5.0], [1.0], [0.1], [1.0]]), 2).tolist() == [[0, 2]]
    np.testing.assert_allclose(neighbour_errors(query, pool, pool_errors, 2), [[0.1, 0.8]])
    # end to end: adapter 0 is better on the neighbours, so it gets the larger weight
    probs = 1 - pool_errors  # all labels 1 -> error = 1 - p
    w = apa_weights(query, pool, probs, [1, 1, 1, 1], n=2, tau=5.0)
    assert w[0, 0] == pytest.approx(1 / (1 + math.exp(-5 * 0.7)))


def test_a_query_that_is_a_pool_sample_can_be_left_out_of_its_own_neighbours():
    pool = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    ids = ["a", "b", "c"]
    assert self_in_pool(["x", "y"], ids) is None  # test samples: nothing to leave out
    mine = self_in_pool(["b", "x", "a"], ids)
    assert mine.tolist() == [1, -1, 0]
    query = np.array([pool[1], [0.95, 0.05], pool[0]])
    assert nearest(query, pool, 1).tolist() == [[1], [0], [0]]  # each pool sample's nearest is itself ...
    assert nearest(query, pool, 1, mine).tolist() == [[0], [0], [1]]  # ... unless it is left out
    assert nearest(query, pool, 5, mine).shape == (3, 2)  # at most the pool less one
    errors = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(neighbour_errors(query[:1], pool, errors, 1, mine[:1]), [[0.0, 1.0]])
    with pytest.raises(ValueError, match="only the sample itself"):
        nearest(pool[:1], pool[:1], 1, np.array([0]))
    # a one-sample pool: the sample itself has no neighbour (uniform weights), another query reads the sample
    w = apa_weights(pool[:2], pool[:1], 1 - errors[:1], [1], n=20, tau=5.0, exclude=np.array([0, -1]))
    np.testing.assert_allclose(w[0], [0.5, 0.5])
    np.testing.assert_allclose(w[1], softmax_weights(errors[:1], 5.0)[0])


def test_sisa_averages_the_adapters_outputs():
    per = np.array([[0.2, 0.4, 0.9], [0.5, 0.5, 0.8]])
    np.testing.assert_allclose(aggregate(None, "sisa", [], [{}, {}, {}], per_adapter=per), [0.5, 0.6])
    with pytest.raises(ValueError, match="omega"):
        aggregate(None, "apa-d", [], [{}])


def test_own_weight_moves_a_users_weights_to_the_shards_holding_their_history():
    # shard 0 holds users 1, 1, 2; shard 1 holds 2, 2, 2; user 3 has no training sample (cold)
    own = own_shares([1, 2, 3], [[1, 1, 2], [2, 2, 2]])
    np.testing.assert_allclose(own, [[1.0, 0.0], [0.25, 0.75], [0.0, 0.0]])
    omega = np.array([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    np.testing.assert_allclose(with_own(omega, own, 0.5), [[0.6, 0.4], [0.375, 0.625], [0.9, 0.1]])
    np.testing.assert_array_equal(with_own(omega, own, 0.0), omega)
    np.testing.assert_allclose(with_own(omega, own, 1.0)[:2], own[:2])  # w = 1: the user's own shards alone
    assert np.allclose(with_own(omega, own, 0.3).sum(axis=1), 1.0)
