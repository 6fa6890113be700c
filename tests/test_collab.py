"""Collaborative signal in the LLM (METHODS §12): the cross-fitted CF features, the projector at the cut, its
round trip with the adapter, and the trained CF reference."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import FP32, randomise_lora, tiny_config

from privrec import baselines
from privrec.features import CollabFeatures, input_size

DIM = 4


@pytest.fixture(scope="module")
def pool(tiny_splits):
    return tiny_splits.pool


@pytest.fixture(scope="module")
def features(pool):
    f = CollabFeatures.fit(pool, dim=DIM, epochs=30, folds=3, seed=0)
    f.pool = pool
    return f


def features_pool(features):
    return features.pool


def collab_cfg(**extra):
    return tiny_config(model=dict(FP32, name="tiny-random", threads=1), lora={"top_layers": 1},
                       collab={"inject": True, "dim": DIM, "epochs": 30, "folds": 3, "hidden": 16}, **extra)


@pytest.fixture(scope="module")
def collab_model(ml100k, tiny_splits, features):
    from privrec.prepare import build_model

    cfg = collab_cfg()
    model = build_model(cfg, ml100k, collab=features)
    randomise_lora(model)
    return cfg, model


def _fill_projector(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.model.named_parameters():
            if "collab_proj" in n and p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# --- features ----------------------------------------------------------------------------------------------
def test_a_training_prompt_never_reads_its_own_label(pool):
    """Cross-fitting: flipping a counted sample's rating leaves its own predicted rating and interaction term
    exactly as they were (its fold's MF never saw it); its coordinates move only through the fold's rotation
    onto the full fit, far less than the full fit's prompts move."""
    base = CollabFeatures.fit(pool, dim=DIM, epochs=30, folds=3, seed=0)
    s = pool[5]
    flip = 1.0 if s.rating > 3 else 5.0
    flipped = [replace(x, rating=flip) if x.sample_id == s.sample_id else x for x in pool]
    moved = CollabFeatures.fit(flipped, dim=DIM, epochs=30, folds=3, seed=0)
    v, w = base.vector(s), moved.vector(replace(s, rating=flip))
    assert base.predict(s) == pytest.approx(moved.predict(s), abs=1e-9)
    np.testing.assert_allclose(v[3 * DIM:], w[3 * DIM:], atol=1e-9)  # prediction, biases, known flags
    assert (v[2 * DIM: 3 * DIM].sum()) == pytest.approx(w[2 * DIM: 3 * DIM].sum(), abs=1e-9)  # p . q
    # without cross-fitting the sample reads a fit that saw its label: it moves, far more than the rotation
    plain = CollabFeatures.fit(pool, dim=DIM, epochs=30, folds=1, seed=0)
    plain_moved = CollabFeatures.fit(flipped, dim=DIM, epochs=30, folds=1, seed=0)
    assert abs(plain.predict(s) - plain_moved.predict(s)) > 1e-3
    assert np.linalg.norm(v - w) < 0.2 * np.linalg.norm(plain.vector(s) - plain_moved.vector(s))


def test_a_folds_rotation_keeps_its_predictions(features):
    """The Procrustes rotation onto the full fit changes a fold's coordinates, never what it predicts: the
    rotated fold predicts exactly as the same fit unrotated (and its rotation is orthogonal)."""
    from privrec.features import _fit

    pool = features_pool(features)
    which = np.random.default_rng(0).integers(0, 3, len(pool))
    ordered = sorted(pool, key=lambda s: s.sample_id)
    universe = (np.unique([s.user_id for s in pool]), np.unique([s.item_id for s in pool]))
    raw = _fit([s for s, k in zip(ordered, which) if k != 1], DIM, 30, 1e-4, 0, universe)
    rotated = features.folds[1]
    assert not np.allclose(raw.mf.Q, rotated.mf.Q)
    r = np.linalg.lstsq(raw.mf.Q, rotated.mf.Q, rcond=None)[0]
    np.testing.assert_allclose(r @ r.T, np.eye(DIM), atol=1e-8)
    for s in pool[:50]:
        assert rotated.predict(s.user_id, s.item_id) == pytest.approx(raw.predict(s.user_id, s.item_id), abs=1e-9)


def test_cold_start_reads_a_defined_fallback(features):
    v = features.vector_of(10**6, 10**6)  # neither user nor item was ever rated
    assert v.shape == (input_size(DIM),)
    assert np.all(v[: 3 * DIM] == 0) and v[-2:].tolist() == [0.0, 0.0]
    user = int(features.full.mf.user_ids[0])
    known_user = features.vector_of(user, 10**6)
    assert known_user[-2:].tolist() == [1.0, 0.0] and np.any(known_user[:DIM] != 0)
    assert features.full.predict(10**6, 10**6) == pytest.approx(features.full.mf.mu)


# --- the projector at the cut ------------------------------------------------------------------------------
def test_a_fresh_projector_adds_nothing_and_learns_from_the_first_step(collab_model, tiny_splits):
    cfg, model = collab_model
    items = model.encode(tiny_splits.test[:8])
    assert all(e.cf is not None and len(e.cf) == input_size(DIM) for e in items)
    z = model.score_logits(items, progress=False)
    saved, model.injects = model.injects, False  # the same prompts with no CF input at all
    try:
        z_text = model.score_logits(items, progress=False)
    finally:
        model.injects = saved
    np.testing.assert_array_equal(z, z_text)
    # one backward: the projector's output layer gets a gradient through the LoRA layers above the cut
    model.model.train()
    model.prepare(items, progress=False)
    loss = model.logits(model.collate(items)).sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.model.named_parameters() if "collab_proj" in n and p.requires_grad}
    assert grads and any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "fc2.weight" in n)
    model.model.zero_grad()
    model.model.eval()


def test_scores_move_with_the_users_cf_vector_and_only_theirs(collab_model, tiny_splits, features, monkeypatch):
    cfg, model = collab_model
    _fill_projector(model)
    test = tiny_splits.test
    user = test[0].user_id
    before = model.score_logits(model.encode(test), progress=False)
    rows = features.full
    k = rows.users[user]
    P = rows.mf.P.copy()
    P[k] += 1.0
    monkeypatch.setattr(rows, "mf", replace(rows.mf, P=P))
    after = model.score_logits(model.encode(test), progress=False)
    mine = np.array([s.user_id == user for s in test])
    assert np.all(np.abs(after[mine] - before[mine]) > 1e-6)
    np.testing.assert_array_equal(after[~mine], before[~mine])


def test_scores_move_with_the_items_cf_vector_and_only_its_prompts(collab_model, tiny_splits, features, monkeypatch):
    cfg, model = collab_model
    _fill_projector(model)
    test = tiny_splits.test
    item = test[0].item_id
    before = model.score_logits(model.encode(test), progress=False)
    rows = features.full
    Q = rows.mf.Q.copy()
    Q[rows.items[item]] -= 1.0
    monkeypatch.setattr(rows, "mf", replace(rows.mf, Q=Q))
    after = model.score_logits(model.encode(test), progress=False)
    mine = np.array([s.item_id == item for s in test])
    assert np.all(np.abs(after[mine] - before[mine]) > 1e-6)
    np.testing.assert_array_equal(after[~mine], before[~mine])


def test_shared_prefix_ranking_injects_as_whole_prompts(collab_model, tiny_splits):
    """The slot is each candidate's last token: the shared-prefix ranking path and whole prompts agree."""
    from privrec.model.encoding import PrefixGroup

    cfg, model = collab_model
    _fill_projector(model, seed=3)
    s = tiny_splits.test[0]
    cands = [replace(s, item_id=i, sample_id=f"u{s.user_id}-i{i}") for i in (1, 50, 100, 181)]
    group = PrefixGroup.of(model.encode(cands))
    assert group.cf is not None
    shared = model.score_groups([group], "yes", shared=True, progress=False)[0]
    whole = model.score_groups([group], "yes", shared=False, progress=False)[0]
    np.testing.assert_allclose(shared, whole, atol=1e-4)
    assert len(set(np.round(shared, 6))) == len(cands)


def test_the_projector_round_trips_with_the_adapter_bit_identically(tmp_path, ml100k, tiny_splits, features):
    from privrec.model.adapters import install_adapter, read_adapter, save_adapter
    from privrec.prepare import build_model

    cfg = collab_cfg()
    a = build_model(cfg, ml100k, collab=features)
    randomise_lora(a)
    _fill_projector(a, seed=5)
    save_adapter(a.model, tmp_path / "ad", {"base_fingerprint": a.fingerprint})
    b = build_model(cfg, ml100k, collab=features)
    state, meta = read_adapter(tmp_path / "ad")
    assert any("collab_proj" in k for k in state)
    install_adapter(b, tmp_path / "ad", state, meta, cfg.model.name)
    items = tiny_splits.test
    np.testing.assert_array_equal(a.score_logits(a.encode(items), progress=False),
                                  b.score_logits(b.encode(items), progress=False))


def test_train_evaluate_round_trip(tmp_path, capsys):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "train", "configs/tiny.yaml", "--out", str(tmp_path / "m"),
                           "--set", "collab.inject=true", "--set", "collab.hidden=16", "--set", "model.precision=fp32",
                           "--set", "eval.zero_shot=false")
    assert code == 0, err
    import json

    trained = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert "mf" in trained["references"]
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "m"))
    assert code == 0, err
    again = json.loads((tmp_path / "m" / "eval_test.json").read_text())
    assert again["auc"] == trained["auc"] and again["logloss"] == trained["logloss"]


# --- the CF reference --------------------------------------------------------------------------------------
def test_the_mf_reference_learns_from_training_labels_only(tiny_splits):
    train, valid, test = tiny_splits.pool[:3000], tiny_splits.valid, tiny_splits.test
    p, chosen = baselines.mf_reference(train, valid, test, grid=((DIM, 30, 1e-4),))
    assert chosen["dim"] == DIM
    # a test label moved: the reference does not see it
    relabelled = [replace(s, rating=6 - s.rating, label=1 - s.label) for s in test]
    p2, _ = baselines.mf_reference(train, valid, relabelled, grid=((DIM, 30, 1e-4),))
    np.testing.assert_array_equal(p, p2)
    # the same test interaction put into the training data (with its label): the reference moves toward it
    s = test[0]
    leaked = [*train, replace(s, rating=5.0, label=1)] * 1
    p3, _ = baselines.mf_reference(leaked, valid, test, grid=((DIM, 30, 1e-4),))
    assert p3[0] > p[0]
    low = [*train, replace(s, rating=1.0, label=0)]
    p4, _ = baselines.mf_reference(low, valid, test, grid=((DIM, 30, 1e-4),))
    assert p4[0] < p[0]


def test_ranking_features_cross_fit_by_user():
    """BPR features of the ranking task: a training user's true item and negatives read the fold fit that
    never saw that true item; every other prompt reads the full fit."""
    from privrec.model.mf import fit_bpr

    rng = np.random.default_rng(0)
    users = rng.integers(1, 41, 600)
    items = rng.integers(1, 61, 600)
    pairs = sorted(set(zip(users.tolist(), items.tolist())))
    users, items = np.array([u for u, _ in pairs]), np.array([i for _, i in pairs])
    universe = np.arange(1, 61)
    from privrec.data import Sample

    def like(u, i, label):
        return Sample(f"u{u}-i{i}", u, i, 0, 5.0 if label else 0.0, label, ())

    first = {}
    for u, i in pairs:
        first.setdefault(u, i)
    counted = [like(u, i, 1) for u, i in first.items()] + [like(u, 60 - (i % 7), 0) for u, i in first.items()]
    f = CollabFeatures.fit_implicit(users, items, universe, counted, dim=4, epochs=3, folds=2, seed=0)
    u0, i0 = next(iter(first.items()))
    fold = f.fold_of[f"u{u0}-i{i0}"]
    held = {(u, i) for u, i in first.items() if f.fold_of[f"u{u}-i{i}"] == fold}
    keep = np.array([(u, i) not in held for u, i in pairs])
    alone = fit_bpr(users[keep], items[keep], universe, 4, 3, 0, 1e-4, users_universe=np.unique(users))
    k_u, k_i = int(np.searchsorted(alone.user_ids, u0)), int(np.searchsorted(alone.item_ids, i0))
    expected = alone.bi[k_i] + alone.P[k_u] @ alone.Q[k_i]
    assert f.predict(like(u0, i0, 1)) == pytest.approx(expected, abs=1e-9)
    assert f.fold_of[f"u{u0}-i{60 - (i0 % 7)}"] == fold  # the user's negatives read the same fold
    assert f.predict(like(999, i0, 1)) == pytest.approx(f.full.predict(999, i0))
