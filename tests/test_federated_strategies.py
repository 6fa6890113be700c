"""Aggregation maths (METHODS §2) on plain tensor dicts: no model, hand-computed where it can be."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from privrec.federated.config import FederatedSection
from privrec.federated.strategies import (
    PPLR,
    FedAvg,
    FedProx,
    Local,
    Update,
    aggregate_parts,
    cosine_similarity_matrix,
    heating_weights,
    mix,
    normalised_losses,
    pplr_mixing,
    weighted_average,
)


def rand_state(seed: int, layers=(0, 1, 2)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        out[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 16, generator=g)
        out[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(16, 4, generator=g)
    return out


def test_weighted_average_is_the_sample_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([5.0, -2.0])}
    out = weighted_average([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 15) / 4, (2 - 6) / 4]))
    assert out["w"].dtype == torch.float32


def test_fedavg_of_identical_clients_is_a_no_op():
    s = rand_state(0)
    strat = FedAvg(FederatedSection(strategy="fedavg"))
    updates = {c: Update({k: v.clone() for k, v in s.items()}, loss=0.3 + c, n_train=n)
               for c, n in enumerate([7, 50, 1])}
    out = strat.aggregate(0, {c: s for c in updates}, updates)
    for c in updates:
        for k in s:
            torch.testing.assert_close(out[c][k], s[k], atol=1e-6, rtol=1e-6)


def test_fedavg_gives_every_client_the_global_state_and_skips_failed_ones():
    s0, s1, s2 = rand_state(0), rand_state(1), rand_state(2)
    strat = FedAvg(FederatedSection(strategy="fedavg"))
    out = strat.aggregate(0, {0: s0, 1: s1, 2: s2}, {0: Update(s0, 0.5, 10), 1: Update(s1, 0.5, 30)})  # 2 failed
    expected = weighted_average([s0, s1], [10, 30])
    for c in (0, 1, 2):
        for k in s0:
            torch.testing.assert_close(out[c][k], expected[k])


def test_pplr_mixing_matches_the_formula_by_hand():
    # two clients, one scalar each: cos = sign(a*b) = -1 for opposite signs -> S_01 = 0; use 2-d vectors
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([1.0, 1.0])}
    losses, T, alpha, beta, t = [0.8, 0.7], 0.05, 0.7, 2.0, 1
    cos = 1 / math.sqrt(2)
    s = (cos + 1) / 2
    e = np.exp(np.array(losses) / T)
    nl = e / e.sum()
    w = np.tanh(alpha / nl ** (t + 1 / beta))
    M_hand = np.array([[1, s * w[0]], [s * w[1], 1]])
    M_hand = M_hand / M_hand.sum(1, keepdims=True)
    M = pplr_mixing([a, b], losses, t, alpha, beta, T)
    np.testing.assert_allclose(M, M_hand, rtol=1e-12)
    mixed = mix([a, b], M)
    torch.testing.assert_close(mixed[0]["w"], torch.tensor([1.0, M_hand[0, 1]], dtype=torch.float32))
    np.testing.assert_allclose(cosine_similarity_matrix([a, b]), [[1, s], [s, 1]], rtol=1e-12)
    np.testing.assert_allclose(normalised_losses(losses, T), nl, rtol=1e-12)


def test_pplr_high_loss_client_keeps_more_of_its_own_weights_early_than_later():
    states = [rand_state(i) for i in range(3)]
    losses = [0.65, 0.60, 0.60]  # client 0 is the struggling one: l~ = (0.58, 0.21, 0.21)
    own = [pplr_mixing(states, losses, t, alpha=0.7, beta=1.0, temperature=0.05)[0, 0] for t in range(5)]
    assert all(x > y for x, y in itertools.pairwise(own)), own  # mixes more and more as rounds pass
    assert own[0] > own[-1] + 0.03, own
    M0 = pplr_mixing(states, losses, 0, 0.7, 1.0, 0.05)
    assert M0[0, 0] > M0[1, 1] + 0.03 and M0[0, 0] > M0[2, 2] + 0.03  # more self-weight than the others
    # the low-loss clients' heating weight is already ~1: their own share barely moves over rounds
    assert abs(M0[1, 1] - pplr_mixing(states, losses, 4, 0.7, 1.0, 0.05)[1, 1]) < 5e-3
    # a larger beta shrinks the exponent t + 1/beta: the heating starts cooler (more self-weight in round 0)
    assert pplr_mixing(states, losses, 0, 0.7, 5.0, 0.05)[0, 0] > M0[0, 0]


def test_pplr_applies_the_curriculum_weight_at_beta_one():
    """The released script skips step 3 when beta == 1; privrec does not (METHODS §2)."""
    states = [rand_state(i) for i in range(3)]
    losses = [0.9, 0.5, 0.5]
    with_heating = pplr_mixing(states, losses, 0, alpha=0.7, beta=1.0, temperature=0.05)
    S = cosine_similarity_matrix(states)
    without = S / S.sum(1, keepdims=True)
    w = heating_weights(normalised_losses(losses, 0.05), 0, 0.7, 1.0)
    assert w[0] == pytest.approx(np.tanh(0.7 / normalised_losses(losses, 0.05)[0]))
    assert w[0] < 0.7  # tanh(0.7 / ~1) ~ 0.6: a real down-weighting of the others
    assert with_heating[0, 0] > without[0, 0] + 0.05


def test_heating_weight_survives_an_underflowing_normalised_loss():
    nl = normalised_losses([0.1, 60.0], 0.05)  # client 0's share underflows to 0
    assert nl[0] == 0.0
    assert heating_weights(nl, 0, 0.7, 1.0)[0] == 1.0  # alpha / 0 = inf -> tanh = 1, no NaN


def test_identical_pplr_clients_stay_identical_over_rounds():
    strat = PPLR(FederatedSection())
    twin, other = rand_state(0), rand_state(5)
    states = {0: twin, 1: {k: v.clone() for k, v in twin.items()}, 2: other}
    first = next(iter(twin))
    for t in range(4):
        updates = {c: Update(s, loss=[0.7, 0.7, 0.6][c], n_train=10) for c, s in states.items()}
        states = strat.aggregate(t, states, updates)
        for k in twin:
            assert torch.equal(states[0][k], states[1][k])
        if t == 0:  # (later rounds drive all three towards a consensus)
            assert not torch.allclose(states[0][first], states[2][first], atol=1e-3)


def test_pplr_leaves_failed_clients_out_and_keeps_their_state():
    strat = PPLR(FederatedSection())
    s = {c: rand_state(c) for c in range(3)}
    updates = {0: Update(s[0], 0.6, 5), 1: Update(s[1], 0.5, 5)}  # client 2 failed this round
    out = strat.aggregate(0, s, updates)
    assert out[2] is s[2]
    expected = mix([s[0], s[1]], pplr_mixing([s[0], s[1]], [0.6, 0.5], 0, 0.7, 1.0, 0.05))
    for k in s[0]:
        torch.testing.assert_close(out[0][k], expected[0][k])
        torch.testing.assert_close(out[1][k], expected[1][k])


def test_local_keeps_what_each_client_trained():
    s = {c: rand_state(c) for c in range(2)}
    new = rand_state(9)
    out = Local(FederatedSection(strategy="local")).aggregate(0, s, {0: Update(new, 0.1, 3)})
    assert out[0] is new and out[1] is s[1]


def test_instructions_fedprox_mu_and_pplr_learning_rate_scale():
    assert FedProx(FederatedSection(strategy="fedprox", mu=0.3)).instructions(2, 0, 7, {}).mu == 0.3
    assert FedAvg(FederatedSection(strategy="fedavg")).instructions(2, 0, 7, {}).mu == 0.0
    off = PPLR(FederatedSection())
    losses = {0: 0.9, 1: 0.5, 2: 0.5}
    assert off.instructions(1, 0, 7, losses).lr_scale == 1.0  # off by default
    on = PPLR(FederatedSection(lr_scale=True))
    assert on.instructions(0, 0, 7, {}).lr_scale == 1.0  # no losses yet in round 0
    scales = [on.instructions(1, c, 7, losses).lr_scale for c in range(3)]
    assert scales[0] > 1.0 > scales[1] and sum(scales) == pytest.approx(3.0)


def test_split_parts_are_aggregated_separately_with_the_same_strategy():
    strat = PPLR(FederatedSection())
    client_side = lambda name: ".layers.1." not in name
    states = {c: rand_state(c) for c in range(3)}
    updates = {c: Update(states[c], [0.8, 0.5, 0.6][c], 4) for c in range(3)}
    out = aggregate_parts(strat, 0, states, updates, client_side)
    assert all(set(out[c]) == set(states[c]) for c in range(3))
    for side in (True, False):
        part = lambda s, side=side: {k: v for k, v in s.items() if client_side(k) == side}
        expected = strat.aggregate(0, {c: part(s) for c, s in states.items()},
                                   {c: Update(part(u.state), u.loss, u.n_train) for c, u in updates.items()})
        for c in range(3):
            for k, v in expected[c].items():
                torch.testing.assert_close(out[c][k], v)
    # and this differs from mixing the whole state at once (each side has its own similarities)
    whole = strat.aggregate(0, states, updates)
    assert any(not torch.allclose(out[0][k], whole[0][k]) for k in out[0])
