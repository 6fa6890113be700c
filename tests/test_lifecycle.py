"""One model, its whole life, for every kind, through the privrec command on the tiny model:
train -> evaluate -> recommend -> forget one user -> verify -> recommend again.

A single model and a shards model forget exactly (retrain-all / retrain-shards); afterwards the forgotten
user's samples are gone from everything the model sees and their recommendations are refused in one line.
A clients model and a student cannot forget with privrec: they are refused in one line naming what can.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import certificate_body, only_certificate, run_cli
from safetensors.torch import load_file, save_file

from privrec import models
from privrec.cli import main
from privrec.config import load_config
from privrec.data import Sample, build_splits
from privrec.model.adapters import install_adapter, lineage_of, read_adapter, read_meta, tensors_digest
from privrec.prepare import build_model
from privrec.recommender import open_model
from privrec.unlearning.exact.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
TINY, APA_TINY, PPLR_TINY = (str(ROOT / "configs" / n) for n in ("tiny.yaml", "apa-tiny.yaml", "pplr-tiny.yaml"))
FAST = ["--set", "train.epochs=1", "--set", "model.precision=fp32"]


def cli(capsys, *argv):
    try:
        return run_cli(capsys, *argv)
    except SystemExit as e:  # argparse
        return e.code, "", capsys.readouterr().err


def one_line_exit_2(capsys, *argv) -> str:
    code, _, err = cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("privrec: error")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def recommended(out: str) -> list[tuple[str, float]]:
    """(title, P(Yes)) of each line `privrec recommend` printed."""
    rows = []
    for line in out.strip().splitlines():
        _, p, title = line.split(None, 2)
        rows.append((title, float(p)))
    return rows


def user_with_training_samples(ml100k, cfg_path, cls=None) -> int:
    """The user with the most training samples in the config's draw (so forgetting them retrains)."""
    train = build_splits(ml100k, load_config(cfg_path, cls=cls).data if cls else load_config(cfg_path).data, 0).train
    users = [s.user_id for s in train]
    return max(set(users), key=lambda u: (users.count(u), -u))


def titles_rated_by(ml100k, user: int) -> set[str]:
    return {ml100k.items[int(i)].title for i in ml100k.inter[ml100k.inter.user_id == user].item_id}


# --- single: retrain-all --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("life") / "single"
    assert main(["--no-progress", "train", TINY, "--out", str(out), *FAST, "--set", "eval.zero_shot=false"]) == 0
    return out


def test_single_model_whole_life(single, ml100k, tmp_path, capsys):
    run = tmp_path / "single"
    shutil.copytree(single, run)
    victim = user_with_training_samples(ml100k, TINY)
    trained = json.loads((run / "metrics.json").read_text())

    # evaluate reproduces training's test metrics; recommend lists unseen items
    code, out, _ = cli(capsys, "evaluate", str(run))
    assert code == 0 and json.loads((run / "eval_test.json").read_text())["auc"] == pytest.approx(trained["auc"])
    code, out, _ = cli(capsys, "recommend", str(run), "--user", str(victim), "--top", "5", "--max-candidates", "40")
    assert code == 0 and len(recommended(out)) == 5
    assert not {t.rsplit(" (", 1)[0] for t, _ in recommended(out)} & titles_rated_by(ml100k, victim)

    # forget the user: the one adapter is retrained from scratch without their data, certified
    before = read_meta(run / "adapters" / "default")
    code, out, err = cli(capsys, "forget", str(run), "--users", str(victim))
    assert code == 0, err
    cert = only_certificate(run)
    body, rid = cert["body"], cert["body"]["request"]["id"]
    assert body["run"]["kind"] == "single" and body["run"]["forget"] == "retrain-all"
    assert body["affected_shards"] == [0] and body["lineage_check"]["passed"]
    after = read_meta(run / "adapters" / "default")
    gone = {i for i in before["sample_ids"] if i.startswith(f"u{victim}-")}
    assert gone and not gone & set(after["sample_ids"]) and set(after["sample_ids"]) == set(before["sample_ids"]) - gone
    assert after["tensors_sha256"] != before["tensors_sha256"]
    assert not (run / "checkpoint.pt").exists()  # it held the old weights
    assert models.load(run).adapters[0].tensors_sha256 == after["tensors_sha256"]  # the manifest follows

    # exact: `privrec train` of the same config into a directory with the same deletions gives the same adapter
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(run / "ledger.sqlite", fresh / "ledger.sqlite")
    assert main(["--no-progress", "train", TINY, "--out", str(fresh), *FAST, "--set", "eval.zero_shot=false"]) == 0
    assert read_meta(fresh / "adapters" / "default")["tensors_sha256"] == after["tensors_sha256"]
    assert read_meta(fresh / "adapters" / "default")["lineage_sha256"] == after["lineage_sha256"]

    # what the model sees: none of the user's samples, in any split
    md = open_model(run)
    splits = md.splits()
    assert not any(s.user_id == victim for s in splits.train + splits.valid + splits.test)
    assert after["lineage_sha256"] == lineage_of(splits.train)
    assert victim not in set(md.seen(splits.dataset).inter.user_id)

    # verify, then recommend again: refused for the forgotten user, served for the others
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 0 and "all checks passed" in out and f"certificate {rid}: ok" in out
    assert f"forgotten by deletion request {rid}" in one_line_exit_2(capsys, "recommend", str(run), "--user",
                                                                     str(victim))
    other = next(u for u in sorted(set(ml100k.inter.user_id)) if u != victim)
    code, out, _ = cli(capsys, "recommend", str(run), "--user", str(other), "--top", "3", "--max-candidates", "20")
    assert code == 0 and len(recommended(out)) == 3
    code, out, _ = cli(capsys, "evaluate", str(run))
    assert code == 0 and json.loads((run / "eval_test.json").read_text())["n"] == len(splits.test)

    # tampering shows
    weights = run / "adapters" / "default" / "adapter_model.safetensors"
    state = load_file(weights)
    name = min(state)
    state[name] = state[name] + 1e-3
    save_file(state, weights, metadata={"format": "pt"})
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 1 and "adapter default: FAILED" in out and "tensors differ" in out


class Crash(Exception):
    pass


def test_single_forget_interrupted_resumes_to_the_same_certificate(single, ml100k, tmp_path, capsys):
    from privrec.commands.forget import run_forget, run_resume

    victim = user_with_training_samples(ml100k, TINY)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    shutil.copytree(single, whole)
    shutil.copytree(single, cut)
    reference = run_forget(whole, users=[victim], progress=False)

    def fault(point):
        if point == "retrained":
            raise Crash(point)

    with pytest.raises(Crash):
        run_forget(cut, users=[victim], progress=False, fault=fault)
    assert Ledger(cut / "ledger.sqlite", create=False).unfinished()["status"] == "retrained"
    assert read_meta(cut / "adapters" / "default") == read_meta(single / "adapters" / "default")  # not swapped yet
    # while the request is unfinished, the model is not used
    assert "--resume" in one_line_exit_2(capsys, "recommend", str(cut), "--user", "1")
    assert "--resume" in one_line_exit_2(capsys, "forget", str(cut), "--users", "1")
    os.replace(cut / "adapters" / "default", cut / "adapters" / ".default.old")  # as if killed mid-swap
    cert = run_resume(cut, progress=False)
    assert certificate_body(cert) == certificate_body(reference)
    assert tensors_digest(read_adapter(cut / "adapters" / "default")[0]) == reference["body"]["adapters"][0]["after"]
    code, out, _ = cli(capsys, "forget", str(cut), "--resume")
    assert code == 0 and "nothing to resume" in out
    assert not (cut / "adapters" / ".default.old").exists()


def test_a_student_keeps_what_its_original_forgot(single, ml100k, tmp_path, capsys):
    original = tmp_path / "original"
    shutil.copytree(single, original)
    victim = user_with_training_samples(ml100k, TINY)
    train_users = sorted({s.user_id for s in build_splits(ml100k, load_config(TINY).data, 0).train} - {victim})
    (tmp_path / "users.txt").write_text(f"{train_users[0]}\n")
    code, _, err = cli(capsys, "unlearn", str(original), "--method", "original", "--forget-users",
                       str(tmp_path / "users.txt"), "--out", str(tmp_path / "student"), "--set",
                       "unlearn.mia.max_samples=16")
    assert code == 0, err
    code, out, _ = cli(capsys, "recommend", str(tmp_path / "student"), "--user", str(victim), "--top", "2",
                       "--max-candidates", "4")
    assert code == 0  # served until its original forgets them
    assert cli(capsys, "forget", str(original), "--users", str(victim))[0] == 0
    rid = only_certificate(original)["body"]["request"]["id"]
    assert f"forgotten by deletion request {rid}" in one_line_exit_2(capsys, "recommend", str(tmp_path / "student"),
                                                                     "--user", str(victim))


def test_a_single_model_forgets_a_user_without_training_samples_without_retraining(single, ml100k, tmp_path,
                                                                                  capsys):
    run = tmp_path / "run"
    shutil.copytree(single, run)
    splits = build_splits(ml100k, load_config(TINY).data, 0)
    trained_users = {s.user_id for s in splits.train + splits.valid}
    only_test = next(s.user_id for s in splits.test if s.user_id not in trained_users)
    before = read_meta(run / "adapters" / "default")["tensors_sha256"]
    code, _, _ = cli(capsys, "forget", str(run), "--users", str(only_test))
    assert code == 0
    body = only_certificate(run)["body"]
    assert body["affected_shards"] == [] and {x["split"] for x in body["removed"]["samples"]} == {"test"}
    assert read_meta(run / "adapters" / "default")["tensors_sha256"] == before  # no adapter held their data
    assert not any(f"u{only_test}-" in line for line in (run / "predictions_test.csv").read_text().splitlines())


# --- shards: retrain-shards ------------------------------------------------------------------------------------
def test_shards_model_whole_life(ml100k, tmp_path, capsys):
    run = tmp_path / "shards"
    assert main(["--no-progress", "shard-train", APA_TINY, "--out", str(run), "--set", "model.precision=fp32"]) == 0
    from privrec.unlearning.exact.shards import ApaConfig

    victim = user_with_training_samples(ml100k, APA_TINY, ApaConfig)
    trained = json.loads((run / "metrics.json").read_text())

    code, out, _ = cli(capsys, "evaluate", str(run))
    m = json.loads((run / "eval_test.json").read_text())
    assert code == 0 and m["kind"] == "shards" and m["method"] == "apa-nd"
    assert m["auc"] == pytest.approx(trained["auc"]) and m["auc_by_aggregation"] == pytest.approx(
        trained["auc_by_aggregation"])  # the primary aggregation, and every other one, as shard-train scored them
    code, out, _ = cli(capsys, "recommend", str(run), "--user", str(victim), "--top", "4", "--max-candidates", "30")
    assert code == 0 and len(recommended(out)) == 4
    assert not {t.rsplit(" (", 1)[0] for t, _ in recommended(out)} & titles_rated_by(ml100k, victim)

    held = {a.name for a in models.load(run).adapters if any(i.startswith(f"u{victim}-") for i in a.sample_ids)}
    code, _, err = cli(capsys, "forget", str(run), "--users", str(victim))
    assert code == 0, err
    body = only_certificate(run)["body"]
    assert body["run"]["forget"] == "retrain-shards" and {f"shard-{k}" for k in body["affected_shards"]} == held
    for a in models.load(run).adapters:
        assert not any(i.startswith(f"u{victim}-") for i in a.sample_ids)
    splits = open_model(run).splits()
    assert not any(s.user_id == victim for s in splits.train + splits.valid + splits.test)

    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 0 and "all checks passed" in out
    assert "forgotten" in one_line_exit_2(capsys, "recommend", str(run), "--user", str(victim))
    code, out, _ = cli(capsys, "evaluate", str(run))
    assert code == 0 and json.loads((run / "eval_test.json").read_text())["n"] == len(splits.test)
    # what a shards model cannot do
    assert "acts on one adapter" in one_line_exit_2(capsys, "unlearn", str(run), "--method", "e2urec", "--out",
                                                    str(tmp_path / "u"))
    assert not (tmp_path / "u").exists()
    assert "only scoring reads" in one_line_exit_2(capsys, "evaluate", str(run), "--set", "task=ranking")


def test_unlearn_measures_a_shards_model_forgetting_exactly(ml100k, tmp_path, capsys):
    """privrec unlearn on a shards model: a copy forgets with retrain-shards (ledger, certificate), and every
    measure of forgetting is taken under its primary aggregation, as for the one-adapter methods."""
    from test_unlearning_cli import documented_keys

    run = tmp_path / "shards"
    assert main(["--no-progress", "shard-train", APA_TINY, "--out", str(run), "--set", "model.precision=fp32"]) == 0
    users = tmp_path / "users.txt"
    from privrec.unlearning.exact.shards import ApaConfig

    victim = user_with_training_samples(ml100k, APA_TINY, ApaConfig)
    users.write_text(f"{victim}\n")
    out = tmp_path / "forgot"
    code, stdout, err = cli(capsys, "unlearn", str(run), "--method", "retrain", "--forget-users", str(users), "--out",
                            str(out), "--set", "unlearn.mia.max_samples=16")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) == documented_keys() and m["method"] == "retrain-shards" and m["exact"]
    assert m["details"]["aggregation"] == "apa-nd" and m["n_forget_users"] == 1
    assert m["jsd_vs_retrain"] == 0.0  # it is its own exact reference
    assert only_certificate(out) and models.load(out).kind == "shards"
    assert not any(i.startswith(f"u{victim}-") for a in models.load(out).adapters for i in a.sample_ids)
    assert not (run / "certificates").exists()  # the model it came from is untouched
    code, stdout, _ = cli(capsys, "forget", str(out), "--verify")
    assert code == 0 and "all checks passed" in stdout
    assert "forgotten" in one_line_exit_2(capsys, "recommend", str(out), "--user", str(victim))
    assert "exists" in one_line_exit_2(capsys, "unlearn", str(run), "--method", "original", "--forget-users",
                                       str(users), "--out", str(out))


# --- clients: the adapter of the user's client; forgets by a federated retrain ----------------------------------
def test_clients_model_whole_life(ml100k, tmp_path, capsys):
    from privrec.federated.config import FederatedConfig

    run = tmp_path / "clients"
    assert main(["--no-progress", "federate", PPLR_TINY, "--out", str(run), *FAST, "--set",
                 "federated.rounds=1"]) == 0
    trained = json.loads((run / "metrics.json").read_text())
    manifest = models.load(run)

    code, out, _ = cli(capsys, "evaluate", str(run))
    m = json.loads((run / "eval_test.json").read_text())
    assert code == 0 and m["overall"]["auc"] == pytest.approx(trained["overall"]["auc"])
    assert [c["auc"] for c in m["clients"]] == pytest.approx([c["auc"] for c in trained["clients"]], nan_ok=True)

    # recommend scores a user's candidates with the adapter of the client that holds the user
    cfg = load_config(PPLR_TINY, cls=FederatedConfig)
    user = sorted(manifest.clients)[0]
    client = manifest.clients[user]
    code, out, _ = cli(capsys, "recommend", str(run), "--user", str(user), "--top", "3", "--max-candidates", "6")
    assert code == 0
    rows = recommended(out)
    ds = ml100k
    hist_rows = ds.inter[ds.inter.user_id == user]
    hist = tuple((int(i), float(r)) for i, r in zip(hist_rows.item_id.tail(10), hist_rows.rating.tail(10)))
    by_title = {ds.items[i].title + f" ({ds.items[i].year})": i for i in ds.items}
    samples = [Sample(f"u{user}-i{by_title[t]}", user, by_title[t], int(hist_rows.timestamp.max()), 0.0, 0, hist)
               for t, _ in rows]
    own = build_model(cfg, ds)
    folder = run / "adapters" / f"client-{client}"
    install_adapter(own, folder, *read_adapter(folder), cfg.model.name)
    p_own = own.score(own.encode(samples), 8, progress=False)
    # recommend shares the user's prefix over its 6 candidates, score() the 3 samples' common prefix: under bf16
    # autocast the two paths round differently (test_precision.BF16_ATOL); under fp32 only the 4 printed decimals
    assert [p for _, p in rows] == pytest.approx(p_own.tolist(), abs=5e-3 if own.bf16 else 2e-4)
    other = next(c for c in range(3) if c != client)
    folder = run / "adapters" / f"client-{other}"
    install_adapter(own, folder, *read_adapter(folder), cfg.model.name)
    assert not np.allclose(own.score(own.encode(samples), 8, progress=False), p_own, atol=1e-6)

    # a user no client holds, and what a clients model cannot do: each one line, exit 2
    stranger = next(u for u in sorted(set(ds.inter.user_id)) if u not in manifest.clients)
    assert "belongs to no client" in one_line_exit_2(capsys, "recommend", str(run), "--user", str(stranger))
    # PPLR mixed every client into every adapter: forgetting is a full federated retrain, asked for by name
    # (tests/test_federated_forget.py runs it); its adapters verify against the data as trained
    line = one_line_exit_2(capsys, "forget", str(run), "--users", str(user))
    assert "clients model" in line and "--retrain-federation" in line and "whole federation" in line
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 0 and "all checks passed" in out
    assert "clients model" in one_line_exit_2(capsys, "unlearn", str(run), "--out", str(tmp_path / "u"))
    code, out, _ = cli(capsys, "recommend", str(run), "--user", str(user), "--top", "3", "--max-candidates", "6")
    assert code == 0 and recommended(out) == rows  # nothing was forgotten: the same recommendations


# --- student: an unlearnt model ---------------------------------------------------------------------------------
def test_student_model_whole_life(single, ml100k, tmp_path, capsys):
    victim = user_with_training_samples(ml100k, TINY)
    users = tmp_path / "users.txt"
    users.write_text(f"{victim}\n")
    out_dir = tmp_path / "student"
    code, _, err = cli(capsys, "unlearn", str(single), "--method", "neggrad", "--forget-users", str(users), "--out",
                       str(out_dir), "--set", "unlearn.mia.max_samples=16")
    assert code == 0, err
    m = models.load(out_dir)
    assert m.kind == "student" and m.method == "neggrad" and not m.exact and m.forgotten_users == [victim]

    code, out, _ = cli(capsys, "evaluate", str(out_dir))
    unlearnt = json.loads((out_dir / "metrics.json").read_text())
    assert code == 0 and json.loads((out_dir / "eval_test.json").read_text())["auc"] == pytest.approx(
        unlearnt["test_auc"])
    assert "unlearnt" in one_line_exit_2(capsys, "recommend", str(out_dir), "--user", str(victim))
    other = next(u for u in sorted(set(ml100k.inter.user_id)) if u != victim)
    code, out, _ = cli(capsys, "recommend", str(out_dir), "--user", str(other), "--top", "3", "--max-candidates", "9")
    assert code == 0 and len(recommended(out)) == 3
    line = one_line_exit_2(capsys, "forget", str(out_dir), "--users", str(other))
    assert "student model" in line and f"privrec forget {single}" in line
    assert "an unlearning run" in one_line_exit_2(capsys, "unlearn", str(out_dir), "--out", str(tmp_path / "u2"))


# --- old directories and bad input on the new paths ----------------------------------------------------------
def test_an_old_train_directory_is_used_but_cannot_forget(single, tmp_path, capsys):
    from test_models import old_single_dir

    old = old_single_dir(single, tmp_path / "old")
    code, out, _ = cli(capsys, "evaluate", str(old))
    trained = json.loads((single / "metrics.json").read_text())
    assert code == 0 and json.loads((old / "eval_test.json").read_text())["auc"] == pytest.approx(trained["auc"])
    code, out, _ = cli(capsys, "recommend", str(old), "--user", "1", "--top", "2", "--max-candidates", "5")
    assert code == 0 and len(recommended(out)) == 2
    assert "before lineage hashes covered sample content" in one_line_exit_2(capsys, "forget", str(old), "--users",
                                                                              "1")
    assert "before lineage hashes" in one_line_exit_2(capsys, "unlearn", str(old), "--out", str(tmp_path / "u"))


@pytest.mark.parametrize("case", ["no-model", "unknown-user", "bad-users", "forget-item-stats", "missing-dir"])
def test_bad_input_on_the_new_paths(single, tmp_path, capsys, case):
    if case == "no-model":
        (tmp_path / "config.yaml").write_text((single / "config.yaml").read_text())
        line = one_line_exit_2(capsys, "recommend", str(tmp_path), "--user", "1")
        assert "no trained model" in line
    elif case == "unknown-user":
        assert "not found" in one_line_exit_2(capsys, "recommend", str(single), "--user", "999999")
    elif case == "bad-users":
        assert "--users" in one_line_exit_2(capsys, "forget", str(single), "--users", "x,y")
    elif case == "forget-item-stats":
        run = tmp_path / "stats"
        assert main(["--no-progress", "train", TINY, "--out", str(run), *FAST, "--set", "eval.zero_shot=false",
                     "--set", "prompt.item_stats=true"]) == 0
        # its counted features carry their lineage (METHODS §12): it forgets by retraining, and approximately with
        # them recounted over the retained users (tests/test_features_lineage.py); a forget user it never had is
        # still one line
        assert models.load(run).forget == ["retrain-all", "approximate"]
        (tmp_path / "users.txt").write_text("999999\n")
        assert "no training samples" in one_line_exit_2(capsys, "unlearn", str(run), "--forget-users",
                                                        str(tmp_path / "users.txt"), "--out", str(tmp_path / "u"))
    else:
        assert "not found" in one_line_exit_2(capsys, "evaluate", str(tmp_path / "nope"))
