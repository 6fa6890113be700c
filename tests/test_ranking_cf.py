"""The trained CF references of the ranking protocol (METHODS §12): learnt from the training period only."""

from dataclasses import replace

import numpy as np

from privrec import ranking
from privrec.config import load_config
from privrec.prepare import setup_data

GRID = ((8, 5, 1e-4), (8, 10, 1e-4))  # small and quick: the test is about what the fit sees, not its quality


def _splits():
    return setup_data(load_config("configs/rank-tiny.yaml")).ranking


def test_training_interactions_hold_no_test_or_validation_target():
    rs = _splits()
    users, items, _ = ranking.training_interactions(rs)
    seen = set(zip(users.tolist(), items.tolist()))
    assert not {(r.user_id, r.target) for r in rs.test} & seen
    assert not {(r.user_id, r.target) for r in rs.valid} & seen
    assert {(r.user_id, r.target) for r in rs.train} <= seen  # the training targets are training data


def test_the_bpr_reference_moves_only_when_a_test_target_leaks_into_training(monkeypatch):
    rs = _splits()
    test = rs.test
    base = ranking.cf_references(rs, test, grid=GRID)
    # the test labels changed (another true item among the same candidates): the fit does not move, only the
    # metrics that read the labels do
    moved = [replace(r, target=r.candidates[(r.true_index + 1) % len(r.candidates)]) for r in test]
    again = ranking.cf_references(rs, moved, grid=GRID)
    assert again["bpr"]["chosen"] == base["bpr"]["chosen"]
    # the test targets put into the training interactions: the reference now ranks them higher
    real = ranking.training_interactions

    def leaky(splits):
        u, i, r = real(splits)
        extra = [(t.user_id, t.target) for t in test] * 5
        return (np.r_[u, [a for a, _ in extra]], np.r_[i, [b for _, b in extra]],
                np.r_[r, np.full(len(extra), 5.0, dtype=np.float32)])

    monkeypatch.setattr(ranking, "training_interactions", leaky)
    leaked = ranking.cf_references(rs, test, grid=GRID)
    assert leaked["bpr"]["mean_rank"] < base["bpr"]["mean_rank"]
    assert leaked["bpr"]["hr@1"] > base["bpr"]["hr@1"]


def test_privrec_baseline_prints_the_ranking_references(tmp_path, capsys, monkeypatch):
    from conftest import run_cli

    monkeypatch.setattr(ranking, "BPR_GRID", GRID)
    code, out, err = run_cli(capsys, "baseline", "configs/rank-tiny.yaml", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert "reference: bpr" in out and "reference: mf" in out and "reference: popularity" in out
