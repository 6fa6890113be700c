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
    assert manifest["forget"] == ["retrain-all"]


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
