"""Measures of forgetting (privrec.unlearning.measures) against hand-computed values; no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privrec.unlearning import measures as M
from privrec.unlearning.measures import MiaSets, Outputs


def kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_symmetric_kl_is_the_mean_of_both_directions_by_hand():
    # KL(0.8 || 0.5) = 0.8 ln 1.6 + 0.2 ln 0.4; KL(0.5 || 0.8) = 0.5 ln 0.625 + 0.5 ln 2.5
    by_hand = 0.5 * ((0.8 * math.log(1.6) + 0.2 * math.log(0.4)) + (0.5 * math.log(0.625) + 0.5 * math.log(2.5)))
    assert M.symmetric_kl([0.8], [0.5]) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(0.2079442, abs=1e-6)
    # a mean over samples
    assert M.symmetric_kl([0.8, 0.3], [0.5, 0.3]) == pytest.approx(by_hand / 2, rel=1e-12)
    assert M.bernoulli_kl([0.8], [0.5])[0] == pytest.approx(kl(0.8, 0.5), rel=1e-12)
    assert M.bernoulli_kl([0.8], [0.5])[0] != pytest.approx(M.bernoulli_kl([0.5], [0.8])[0])  # not symmetric


def test_jsd_by_hand_symmetric_zero_for_equal_and_at_most_ln2():
    m = 0.65
    by_hand = 0.5 * kl(0.8, m) + 0.5 * kl(0.5, m)
    assert M.jensen_shannon([0.8], [0.5]) == pytest.approx(by_hand, rel=1e-12)
    rng = np.random.default_rng(0)
    p, q = rng.uniform(size=500), rng.uniform(size=500)
    per = M.jensen_shannon_per_sample(p, q)
    np.testing.assert_allclose(per, M.jensen_shannon_per_sample(q, p), rtol=0, atol=1e-15)  # symmetric
    assert np.all(per >= 0) and np.all(per <= math.log(2))
    assert M.jensen_shannon(p, p) == 0.0
    assert M.jensen_shannon([0.0, 1.0], [1.0, 0.0]) == pytest.approx(math.log(2), abs=1e-12)  # the maximum
    assert M.jensen_shannon([0.0, 1.0], [0.0, 1.0]) == 0.0  # certain and equal: no clipping artefacts
    # JSD <= 1/4 (KL(p||q) + KL(q||p)) = 1/2 of the symmetric KL, per sample
    p, q = rng.uniform(0.01, 0.99, 300), rng.uniform(0.01, 0.99, 300)
    sym = 0.5 * (M.bernoulli_kl(p, q) + M.bernoulli_kl(q, p))
    assert np.all(M.jensen_shannon_per_sample(p, q) <= 0.5 * sym + 1e-12)
    with pytest.raises(ValueError):
        M.jensen_shannon([0.5], [1.5])
    with pytest.raises(ValueError):
        M.symmetric_kl([0.5, 0.2], [0.5])


def test_loss_threshold_is_fit_between_members_and_non_members():
    t = M.fit_loss_threshold([0.1, 0.2, 0.3], [0.5, 0.6])
    assert t == pytest.approx(0.4)
    # overlapping: the best balanced split keeps 2/3 members below and all non-members above
    t = M.fit_loss_threshold([0.1, 0.2, 0.9], [0.5, 0.6])
    assert 0.2 < t < 0.5
    assert M.balanced_attack_accuracy([True, True, False], [False, False]) == pytest.approx(0.5 * (2 / 3 + 1))
    assert M.sample_loss([1, 0], [0.9, 0.9]) == pytest.approx([-math.log(0.9), -math.log(0.1)])


def _outputs(rng, n, memorised: bool):
    """A model's outputs: on memorised samples P(Yes) sits near the label; elsewhere it is unrelated (so 3% of
    unseen samples look memorised: the best attack scores about 0.985)."""
    y = rng.integers(0, 2, n)
    p = np.where(y == 1, rng.uniform(0.97, 1.0, n), rng.uniform(0.0, 0.03, n)) if memorised else rng.uniform(size=n)
    return Outputs(y, p)


@pytest.mark.parametrize("attack", ["loss", "logistic"])
def test_mia_tells_remembered_from_unseen_and_is_at_chance_otherwise(attack):
    rng = np.random.default_rng(1)
    members, unseen_fit, unseen_eval = (_outputs(rng, 2000, True), _outputs(rng, 2000, False),
                                        _outputs(rng, 2000, False))
    remembered = MiaSets(members, unseen_fit, _outputs(rng, 2000, True), unseen_eval)
    forgotten = MiaSets(members, unseen_fit, _outputs(rng, 2000, False), unseen_eval)
    run = M.loss_threshold_attack if attack == "loss" else M.logistic_attack
    key = M.MIA_LOSS_ACC if attack == "loss" else M.MIA_LR_ACC
    hi, lo = run(remembered), run(forgotten)
    assert hi[key] > 0.95
    assert abs(lo[key] - 0.5) < 0.03
    fit_key = M.MIA_LOSS_FIT_ACC if attack == "loss" else M.MIA_LR_FIT_ACC
    assert lo[fit_key] > 0.95  # the attack itself works; the forgotten samples just look unseen


def test_forgetting_measures_has_every_key_and_uses_the_reference():
    rng = np.random.default_rng(2)
    test, forget = _outputs(rng, 50, False), _outputs(rng, 40, True)
    mia = MiaSets(_outputs(rng, 30, True), _outputs(rng, 30, False), forget, _outputs(rng, 30, False))
    ref = rng.uniform(size=40)
    m = M.forgetting_measures(test, forget, test_users=rng.integers(0, 5, 50), retain=mia.members_fit, mia=mia,
                              reference_forget_probs=ref, seconds=2.0, reference_seconds=30.0)
    for key in (M.TEST_AUC, M.TEST_UAUC, M.TEST_LOGLOSS, M.TEST_ACC, M.FORGET_AUC, M.FORGET_LOGLOSS, M.FORGET_ACC,
                M.RETAIN_AUC, M.KL_SYM, M.JSD, M.MIA_LOSS_ACC, M.MIA_LR_ACC, M.MIA_LOSS_FORGET_RATE,
                M.MIA_LR_FORGET_RATE, M.UNLEARN_SECONDS, M.SPEEDUP):
        assert m[key] is not None, key
    assert m[M.JSD] == pytest.approx(M.jensen_shannon(forget.probs, ref))
    assert m[M.KL_SYM] == pytest.approx(M.symmetric_kl(forget.probs, ref))
    assert m[M.SPEEDUP] == pytest.approx(15.0)
    assert m[M.FORGET_AUC] == 1.0 and m["n_forget"] == 40
    bare = M.forgetting_measures(test, forget)
    assert bare[M.JSD] is None and bare[M.SPEEDUP] is None and M.MIA_LOSS_ACC not in bare
    with pytest.raises(ValueError, match="reference"):
        M.forgetting_measures(test, forget, reference_forget_probs=ref[:10])


def test_table_shows_one_row_per_run_with_formatted_measures():
    runs = [("r", {"method": "retrain", M.TEST_AUC: 0.71234, M.JSD: 0.0, M.UNLEARN_SECONDS: 100.0,
                   M.SPEEDUP: 1.0}),
            ("e", {"method": "e2urec", M.TEST_AUC: 0.7, M.JSD: 0.001234, M.UNLEARN_SECONDS: 10.0, M.SPEEDUP: 10.0})]
    md = M.render_table(runs, markdown=True).splitlines()
    assert len(md) == 4 and md[0].startswith("| run | method | test AUC")
    assert "| e | e2urec | 0.7000 |" in md[3] and "0.00123" in md[3] and "10.00x" in md[3]
    plain = M.render_table(runs).splitlines()
    assert len(plain) == 3 and "0.7123" in plain[1] and plain[2].split()[1] == "e2urec"
