"""Features with lineage (METHODS §12, issue 35) on the one-adapter kind: a model whose prompts read features
counted from other samples' labels (the item like-rate line, the CF vectors) records what they were counted
over, forgets by retraining with them recomputed without the deleted data, and is refused / fails verification
when its features came from outside that record."""

import json

import pytest
from conftest import run_cli

from privrec.config import load_config
from privrec.features import features_digest
from privrec.prepare import collab_features, features_record, item_stats, labelled_pool, setup_data

SETS = ["prompt.item_stats=true", "collab.inject=true", "collab.hidden=16", "collab.epochs=10",
        "model.precision=fp32", "eval.zero_shot=false", "train.epochs=1", "data.n_train=32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model with both counted features, and a user of the training pool that none of its drawn
    training, validation or test samples belongs to (only the features saw them)."""
    from privrec.cli import main

    out = tmp_path_factory.mktemp("lineage") / "m"
    argv = ["--no-progress", "train", "configs/tiny.yaml", "--out", str(out)]
    for s in SETS:
        argv += ["--set", s]
    assert main(argv) == 0
    cfg = load_config(out / "config.yaml")
    splits = setup_data(cfg)
    drawn = {s.user_id for part in (splits.train, splits.valid, splits.test) for s in part}
    pool_only = next(s.user_id for s in splits.pool if s.user_id not in drawn)
    return out, cfg, pool_only


def _meta(out):
    return json.loads((out / "adapters" / "default" / "privrec.json").read_text())


def test_the_adapter_records_what_its_features_were_counted_over(trained):
    out, cfg, _ = trained
    rec = _meta(out)["features"]
    assert rec["uses"] == ["prompt.item_stats", "collab.inject"]
    assert rec == features_record(cfg, setup_data(cfg))
    assert rec["n_samples"] == len(setup_data(cfg).pool)
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["forget"] == ["retrain-all", "approximate"]


def test_forgetting_a_pool_only_user_retrains_without_their_labels_in_any_feature(trained, tmp_path, capsys):
    import shutil

    src, cfg, user = trained
    out = tmp_path / "m"
    shutil.copytree(src, out)
    before = _meta(out)
    code, _, err = run_cli(capsys, "forget", str(out), "--users", str(user))
    assert code == 0, err
    after = _meta(out)
    assert after["tensors_sha256"] != before["tensors_sha256"]  # only the features saw the user: still retrained
    from privrec.unlearning.exact.ledger import deleted_interactions

    tomb = deleted_interactions(out)
    assert tomb and all(u == user for u, _ in tomb)
    remaining = setup_data(cfg, tomb)
    assert after["features"] == features_record(cfg, remaining)  # recomputed without the deleted data
    assert after["features"]["n_samples"] < before["features"]["n_samples"]
    counted = labelled_pool(cfg, remaining)
    assert not any(s.user_id == user for s in counted)
    stats = item_stats(cfg, remaining)
    assert not any(sid.startswith(f"u{user}-") for sid in stats.members)
    assert not any(sid.startswith(f"u{user}-") for sid in collab_features(cfg, remaining).fold_of)
    # the retrained adapter is bit for bit what training from scratch on the remaining data gives (fp32)
    from privrec.train import retrain_single

    fresh = retrain_single(cfg, tomb, tmp_path / "fresh", tmp_path / "ck", progress=False)
    assert fresh["tensors_sha256"] == after["tensors_sha256"]
    assert fresh["features"] == after["features"]
    # inference reads features of the data that remains, never the deleted user's labels
    from privrec.recommender import Recommender

    served = Recommender(out).scorer.model
    assert features_digest(served.builder.item_stats, served.collab) == after["features"]["digest"]
    code, out_text, err = run_cli(capsys, "forget", str(out), "--verify")
    assert code == 0, out_text + err


def test_approximate_unlearning_recounts_the_features_without_the_forgotten_users(trained, tmp_path, capsys):
    """An approximate method (METHODS §8) works and serves under features counted over its retained set: the
    forgotten users' labels are in no feature the unlearnt model reads, and its adapter records so."""
    from privrec.prepare import counted_features, user_interactions
    from privrec.recommender import Recommender

    src, cfg, _ = trained
    splits = setup_data(cfg)
    user = splits.train[0].user_id
    (tmp_path / "users.txt").write_text(f"{user}\n")
    out = tmp_path / "neggrad"
    code, _, err = run_cli(capsys, "unlearn", str(src), "--method", "neggrad", "--forget-users",
                           str(tmp_path / "users.txt"), "--out", str(out))
    assert code == 0, err
    kept = setup_data(cfg, user_interactions(splits.dataset, [user]))
    meta = _meta(out)
    assert meta["features"] == features_record(cfg, kept) != _meta(src)["features"]
    assert not any(s.user_id == user for s in labelled_pool(cfg, kept))
    served = Recommender(out).scorer.model
    assert features_digest(*served.features) == meta["features"]["digest"]
    assert not any(sid.startswith(f"u{user}-") for sid in served.builder.item_stats.members)
    assert not any(sid.startswith(f"u{user}-") for sid in served.collab.fold_of)
    # the pooled features (the original's) differ: the recount is what changed them
    assert features_digest(*counted_features(cfg, labelled_pool(cfg, splits))) == _meta(src)["features"]["digest"]


def test_a_student_of_an_original_that_forgot_counts_neither(trained, tmp_path, capsys):
    """Unlearning from a model that already forgot a user by request: the student's features leave out both the
    deleted user and the unlearnt one, and opening it tells the two apart (the deleted user was deleted by the
    original's request; the unlearnt one is refused as unlearnt)."""
    import shutil

    from privrec.errors import UserError
    from privrec.prepare import user_interactions
    from privrec.recommender import Recommender
    from privrec.unlearning.exact.ledger import deleted_interactions

    src, cfg, pool_only = trained
    original = shutil.copytree(src, tmp_path / "m")
    code, _, err = run_cli(capsys, "forget", str(original), "--users", str(pool_only))
    assert code == 0, err
    splits = setup_data(cfg)
    user = next(s.user_id for s in splits.train if s.user_id != pool_only)
    (tmp_path / "users.txt").write_text(f"{user}\n")
    out = tmp_path / "student"
    code, _, err = run_cli(capsys, "unlearn", str(original), "--method", "neggrad", "--forget-users",
                           str(tmp_path / "users.txt"), "--out", str(out))
    assert code == 0, err
    kept = setup_data(cfg, deleted_interactions(original) | user_interactions(splits.dataset, [user]))
    assert _meta(out)["features"] == features_record(cfg, kept)
    rec = Recommender(out)
    assert features_digest(*rec.scorer.model.features) == _meta(out)["features"]["digest"]
    assert {s.user_id for s in labelled_pool(cfg, kept)}.isdisjoint({user, pool_only})
    with pytest.raises(UserError, match="deletion request"):
        rec.history(pool_only)
    with pytest.raises(UserError, match="unlearnt"):
        rec.history(user)


def test_features_from_outside_the_lineage_are_refused_and_fail_verification(trained, tmp_path, capsys):
    import shutil

    src, _, user = trained
    tampered = tmp_path / "t"
    shutil.copytree(src, tampered)
    path = tampered / "adapters" / "default" / "privrec.json"
    meta = json.loads(path.read_text())
    meta["features"]["digest"] = "0" * 64
    path.write_text(json.dumps(meta))
    code, out, err = run_cli(capsys, "forget", str(tampered), "--verify")
    assert code == 1 and "features" in out + err

    old = tmp_path / "old"  # a directory trained before features had lineage: no record at all
    shutil.copytree(src, old)
    path = old / "adapters" / "default" / "privrec.json"
    meta = json.loads(path.read_text())
    del meta["features"]
    path.write_text(json.dumps(meta))
    code, out, err = run_cli(capsys, "forget", str(old), "--users", str(user))
    assert code == 2 and "features" in err and len(err.strip().splitlines()) == 1


# --- shards: each shard's features from its own samples ------------------------------------------------------
SHARD_SETS = ["prompt.item_stats=true", "prompt.cf_score=true", "collab.epochs=10", "model.precision=fp32",
              "shards.aggregations=[uniform,apa-nd]",
              "shards.partition=semantic-users"]


def _shard_train(out, *sets):
    from privrec.cli import main

    argv = ["--no-progress", "shard-train", "configs/apa-tiny.yaml", "--out", str(out)]
    for s in (*SHARD_SETS, *sets):
        argv += ["--set", s]
    assert main(argv) == 0


def _shard_metas(out):
    return {p.name: json.loads((p / "privrec.json").read_text()) for p in sorted((out / "adapters").iterdir())}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "m"
    _shard_train(out)
    return out


def test_each_shard_counts_its_features_over_its_own_samples_and_the_partition_reads_no_label(
        sharded, tmp_path):
    from privrec.unlearning.exact.shards import ApaConfig, features_record, setup_shard_data

    cfg = load_config(sharded / "config.yaml", cls=ApaConfig)
    by_id = {s.sample_id: s for s in setup_shard_data(cfg, set()).train}
    metas = _shard_metas(sharded)
    for meta in metas.values():
        rec = meta["features"]
        assert rec["uses"] == ["prompt.item_stats", "prompt.cf_score"]
        assert rec["n_samples"] == len(meta["sample_ids"])
        assert rec == features_record(cfg, [by_id[i] for i in meta["sample_ids"]])
    assert len({m["features"]["digest"] for m in metas.values()}) == len(metas)  # counted apart
    assert json.loads((sharded / "model.json").read_text())["forget"] == ["retrain-shards"]
    # the partition reads the prompts without the counted line: the same shards as without the feature
    plain = tmp_path / "plain"
    _shard_train(plain, "prompt.item_stats=false", "prompt.cf_score=false")
    assert {k: m["sample_ids"] for k, m in metas.items()} == \
        {k: m["sample_ids"] for k, m in _shard_metas(plain).items()}


def test_own_weight_scores_a_user_with_the_shard_that_holds_their_history(sharded, capsys):
    """shards.own_weight=1 on semantic-users shards: a user's test sample is scored by the one shard adapter that
    holds their training samples; a cold user's score is the plain aggregation's."""
    import numpy as np

    from privrec.metrics import auc
    from privrec.recommender import ShardAggregation, open_model
    from privrec.unlearning.exact.apa import score_each

    md = open_model(sharded, ["shards.own_weight=1"])
    splits = md.splits()
    scorer = ShardAggregation(md, splits)
    test = splits.test
    got = scorer.score(test, progress=False, aggregation="apa-nd")
    per = score_each(scorer.model, scorer.model.encode(test), scorer.states, 16, False)
    home = {u: k for k, users in enumerate(scorer.shard_users) for u in users}
    warm = [i for i, s in enumerate(test) if s.user_id in home]
    assert warm
    np.testing.assert_allclose(got[warm], per[warm, [home[test[i].user_id] for i in warm]], atol=1e-5)
    plain = ShardAggregation(open_model(sharded), splits).score(test, progress=False, aggregation="apa-nd")
    cold = [i for i in range(len(test)) if i not in set(warm)]
    np.testing.assert_allclose(got[cold], plain[cold], atol=1e-6)
    assert not np.allclose(got[warm], plain[warm], atol=1e-4)
    # evaluate tries a value on the trained model; what would change an adapter is refused in one line
    code, text, err = run_cli(capsys, "evaluate", str(sharded), "--set", "shards.own_weight=1")
    assert code == 0, err
    assert json.loads(text[text.index("{"):])["auc"] == pytest.approx(  # apa-nd: the primary
        auc([s.label for s in test], got))
    code, _, err = run_cli(capsys, "evaluate", str(sharded), "--set", "train.lr=0.1")
    assert code == 2 and "scoring" in err and len(err.strip().splitlines()) == 1


def test_a_validation_sample_is_never_its_own_neighbour(sharded, capsys):
    """APA's neighbour pool is the validation split: scoring that split (``evaluate --split valid``, the serving
    scorer) weighs each sample on the pool without it, as on a test sample; with itself in the pool its own
    label would choose its weights."""
    import numpy as np

    from privrec.metrics import auc
    from privrec.recommender import ShardAggregation, open_model
    from privrec.unlearning.exact.apa import aggregate, apa_weights

    md = open_model(sharded)
    splits = md.splits()
    scorer = ShardAggregation(md, splits)
    valid, s = splits.valid, md.cfg.shards
    got = scorer.score(valid, progress=False, aggregation="apa-nd", own_samples=True)
    f, per = scorer.pool(False)
    labels = np.array([x.label for x in valid], dtype=np.float64)
    keep = [np.arange(len(valid)) != i for i in range(len(valid))]
    by_hand = np.concatenate([apa_weights(f[i:i + 1], f[k], per[k], labels[k], s.neighbours, s.tau, s.error)
                              for i, k in enumerate(keep)])
    leaky = apa_weights(f, f, per, labels, s.neighbours, s.tau, s.error)
    assert not np.allclose(by_hand, leaky, atol=1e-3)  # leaving the sample out changes its weights
    items = scorer.model.encode(valid)
    np.testing.assert_allclose(got, aggregate(scorer.model, "apa-nd", items, scorer.states, omega=by_hand,
                                              batch_size=16, progress=False), atol=1e-6)
    code, text, err = run_cli(capsys, "evaluate", str(sharded), "--split", "valid")
    assert code == 0, err
    assert json.loads(text[text.index("{"):])["auc"] == pytest.approx(auc(list(labels), got), abs=1e-6)


def test_forgetting_a_user_reaches_only_the_shards_whose_features_counted_them(sharded, tmp_path, capsys):
    import shutil

    import torch

    from privrec.model.adapters import adapter_state, read_adapter
    from privrec.prepare import counted_features
    from privrec.recommender import Recommender
    from privrec.unlearning.exact.ledger import deleted_interactions
    from privrec.unlearning.exact.shards import ApaConfig, build_model, features_record, setup_shard_data, train_shard

    out = tmp_path / "m"
    shutil.copytree(sharded, out)
    cfg = load_config(out / "config.yaml", cls=ApaConfig)
    before = _shard_metas(out)
    user = int(before["shard-0"]["sample_ids"][0].split("-")[0][1:])
    code, _, err = run_cli(capsys, "forget", str(out), "--users", str(user))
    assert code == 0, err
    after = _shard_metas(out)
    tomb = deleted_interactions(out)
    remaining = setup_shard_data(cfg, tomb)
    by_id = {s.sample_id: s for s in remaining.train}
    changed = {k for k in after if after[k]["tensors_sha256"] != before[k]["tensors_sha256"]}
    assert changed == {k for k in before if any(i.startswith(f"u{user}-") for i in before[k]["sample_ids"])}
    for k, meta in after.items():  # no remaining shard counted the user's labels, and each says so
        assert not any(i.startswith(f"u{user}-") for i in meta["sample_ids"])
        assert meta["features"] == features_record(cfg, [by_id[i] for i in meta["sample_ids"]])
        if k not in changed:
            assert meta["features"] == before[k]["features"]
    # the retrained shard is bit for bit the shard trained from scratch on its remaining samples (fp32)
    model, init = build_model(cfg, remaining)
    (k,) = changed
    samples = [by_id[i] for i in after[k]["sample_ids"]]
    train_shard(model, init, samples, cfg, int(k.split("-")[1]), progress=False)
    state, _ = read_adapter(out / "adapters" / k)
    fresh = adapter_state(model.model)
    assert fresh.keys() == state.keys() and all(torch.equal(fresh[n], state[n]) for n in state)
    # inference shows features counted over the data that remains
    served = Recommender(out).scorer.model
    assert features_digest(*served.features) == features_digest(*counted_features(cfg, remaining.train))
    assert not any(i.startswith(f"u{user}-") for i in served.builder.item_stats.members)
    assert not any(i.startswith(f"u{user}-") for i in served.collab.fold_of)
    code, text, err = run_cli(capsys, "forget", str(out), "--verify")
    assert code == 0, text + err
    # features that came from outside a shard's lineage fail verification in one line
    path = out / "adapters" / k / "privrec.json"
    meta = json.loads(path.read_text())
    meta["features"]["digest"] = "0" * 64
    path.write_text(json.dumps(meta))
    code, text, err = run_cli(capsys, "forget", str(out), "--verify")
    assert code == 1 and "features" in text + err


def test_shards_refuse_what_is_not_counted_per_shard_yet(tmp_path, capsys):
    from privrec.errors import ConfigError
    from privrec.unlearning.exact.shards import ApaConfig

    with pytest.raises(ConfigError, match="collab.inject"):
        load_config("configs/apa-tiny.yaml", cls=ApaConfig, overrides=[*SHARD_SETS, "collab.inject=true"])


# --- slices: a stage's features from the slices it has seen ---------------------------------------------------
@pytest.fixture(scope="module")
def sliced(tmp_path_factory):
    out = tmp_path_factory.mktemp("sliced") / "m"
    _shard_train(out, "shards.slices=2")
    return out


def _stage_meta(out, shard, s):
    return json.loads((out / "slices" / shard / f"stage-{s}" / "privrec.json").read_text())


def test_a_stage_counts_over_the_slices_it_has_seen_and_a_replay_recounts_only_later_stages(sliced, tmp_path,
                                                                                             capsys):
    import shutil

    import torch

    from privrec.model.adapters import adapter_state, read_adapter
    from privrec.unlearning.exact.ledger import deleted_interactions
    from privrec.unlearning.exact.shards import ApaConfig, build_model, setup_shard_data
    from privrec.unlearning.exact.slices import StageState, load_checkpoint, run_stages, stage_features_record

    cfg = load_config(sliced / "config.yaml", cls=ApaConfig)
    by_id = {s.sample_id: s for s in setup_shard_data(cfg, set()).train}
    before = _shard_metas(sliced)
    for name, meta in before.items():  # stage 1 showed slice 1's counts, not the whole shard's
        stage = _stage_meta(sliced, name, 1)
        assert stage["sample_ids"] == sorted(meta["slices"][0])
        assert stage["features"] == stage_features_record(cfg, [by_id[i] for i in stage["sample_ids"]], 1)
        assert stage["features"]["digest"] != meta["features"]["digest"]
    # a user of slice 2: the stage-1 checkpoint keeps its features, stage 2 (the adapter) is recounted
    name = next(n for n, m in before.items() if m["slices"][1])
    user = int(before[name]["slices"][1][0].split("-")[0][1:])
    out = tmp_path / "m"
    shutil.copytree(sliced, out)
    code, _, err = run_cli(capsys, "forget", str(out), "--users", str(user))
    assert code == 0, err
    after = _shard_metas(out)
    assert _stage_meta(out, name, 1) == _stage_meta(sliced, name, 1)
    assert after[name]["features"] != before[name]["features"]
    remaining = {s.sample_id: s for s in setup_shard_data(cfg, deleted_interactions(out)).train}
    for shard, meta in after.items():  # no adapter or checkpoint counted the user's labels
        assert not any(i.startswith(f"u{user}-") for i in meta["sample_ids"])
        for s in range(1, len(meta["slices"])):
            stage = _stage_meta(out, shard, s)
            assert stage["features"] == stage_features_record(cfg, [remaining[i] for i in stage["sample_ids"]], s)
    # the replayed shard is bit for bit stage 2 trained again from the kept checkpoint on what remains, and
    # sliced training from scratch on what remains up to the frozen-layer cache's rounding (fp32: the purge of the
    # old stage-2 prompts drops cache pieces the stage-1 prompts share, recomputed in another batch)
    model, init = build_model(cfg, setup_shard_data(cfg, deleted_interactions(out)))
    slices = [[remaining[i] for i in sl] for sl in after[name]["slices"]]
    k = int(name.split("-")[1])
    state, _ = read_adapter(out / "adapters" / name)
    run_stages(model, load_checkpoint(out / "slices" / name / "stage-1")[0], slices, cfg, k, 2, progress=False)
    replayed = adapter_state(model.model)
    assert replayed.keys() == state.keys() and all(torch.equal(replayed[n], state[n]) for n in state)
    from privrec.unlearning.exact import slices as slices_mod

    shown, real_train = [], slices_mod.train

    def spy(m, items, *a, **kw):  # the features each stage's prompts were rendered under
        shown.append(features_digest(*m.features))
        return real_train(m, items, *a, **kw)

    slices_mod.train = spy
    try:
        run_stages(model, StageState(init, None), slices, cfg, k, 1, progress=False)
    finally:
        slices_mod.train = real_train
    assert shown == [_stage_meta(out, name, 1)["features"]["digest"], after[name]["features"]["digest"]]
    fresh = adapter_state(model.model)
    for n in state:
        torch.testing.assert_close(fresh[n], state[n], rtol=0, atol=1e-6)
    old, _ = read_adapter(sliced / "adapters" / name)
    assert any((old[n] - state[n]).abs().max() > 1e-4 for n in state)  # the replay did change the adapter
    code, text, err = run_cli(capsys, "forget", str(out), "--verify")
    assert code == 0, text + err
    # a checkpoint whose features came from outside its slices fails verification
    path = out / "slices" / name / "stage-1" / "privrec.json"
    meta = json.loads(path.read_text())
    meta["features"]["digest"] = "0" * 64
    path.write_text(json.dumps(meta))
    code, text, err = run_cli(capsys, "forget", str(out), "--verify")
    assert code == 1 and "checkpoint stage-1: its features' digest" in text + err
