"""Sharded exact unlearning end to end on the tiny model: shard-train, forget, resume, verify, tombstones."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import certificate_body, only_certificate
from safetensors.torch import load_file, save_file

from privrec.cli import main
from privrec.commands.forget import run_forget, run_resume
from privrec.config import load_config
from privrec.model.adapters import adapter_state, lineage_of, read_adapter, tensors_digest
from privrec.unlearning.exact.ledger import DONE, PENDING, RETRAINED, Ledger, shows_tombstoned
from privrec.unlearning.exact.shards import ApaConfig, build_model, source_data, train_shard

ROOT = Path(__file__).resolve().parents[1]
APA_TINY = str(ROOT / "configs" / "apa-tiny.yaml")
AGGS = {"uniform", "apa-d", "apa-nd", "sisa"}


def cli(capsys, *argv):
    code = main(["--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def metas(run: Path) -> dict[int, dict]:
    return {int(p.name.split("-")[1]): read_adapter(p)[1] for p in sorted((run / "adapters").glob("shard-*"))}


def tensor_bytes(run: Path) -> dict[int, bytes]:
    return {
        int(p.name.split("-")[1]): (p / "adapter_model.safetensors").read_bytes()
        for p in sorted((run / "adapters").glob("shard-*"))
    }


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def certificate(run: Path) -> dict:
    return only_certificate(run)


@pytest.fixture(scope="module")
def ctx():
    cfg = load_config(APA_TINY, cls=ApaConfig)
    _, universe, splits = source_data(cfg)
    return cfg, universe, splits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("apa") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_CACHE_DIR", str(out.parent / "cache"))
        assert main(["--no-progress", "shard-train", APA_TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def victim(trained, ctx):
    """The user with the most training samples in the run (several, so the deletion is not trivial)."""
    _, universe, _ = ctx
    users = [universe[i].user_id for m in metas(trained).values() for i in m["sample_ids"]]
    return max(set(users), key=lambda u: (users.count(u), -u))


@pytest.fixture(scope="module")
def forgotten(trained, victim, tmp_path_factory):
    """A copy of the trained run after ``forget --users victim``, uninterrupted: the reference."""
    out = copy_run(trained, tmp_path_factory.mktemp("forgotten") / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_CACHE_DIR", str(out.parent / "cache"))
        assert main(["--no-progress", "forget", str(out), "--users", str(victim)]) == 0
    return out


def test_shard_train_writes_disjoint_shards_with_lineage_and_metrics(trained, ctx):
    _, universe, splits = ctx
    m = json.loads((trained / "metrics.json").read_text())
    assert set(m["auc_by_aggregation"]) == AGGS
    assert all(0 <= v <= 1 for v in m["auc_by_aggregation"].values())
    assert m["auc"] == m["aggregations"]["apa-nd"]["auc"] and m["method"] == "apa-nd"
    assert m["shards"] == [16, 16, 16, 16] and len(m["single_shards"]) == 4
    lineages = metas(trained)
    ids = [i for meta in lineages.values() for i in meta["sample_ids"]]
    assert len(ids) == len(set(ids)) and set(ids) == {s.sample_id for s in splits.train}
    latest = Ledger(trained / "ledger.sqlite", create=False).latest_adapters()
    for k, meta in lineages.items():
        assert meta["lineage_sha256"] == lineage_of([universe[i] for i in meta["sample_ids"]])
        state, _ = read_adapter(trained / "adapters" / f"shard-{k}")
        assert tensors_digest(state) == meta["tensors_sha256"] == latest[k]["tensors_sha256"]
    with np.load(trained / "features.npz") as z:
        assert set(z["ids"].tolist()) == {s.sample_id for s in splits.train + splits.valid + splits.test}


def test_forget_user_clears_every_lineage_and_touches_only_affected_shards(
    trained, forgotten, victim, ctx, ml100k
):
    _, universe, splits = ctx
    before, after = metas(trained), metas(forgotten)
    held = {k for k, m in before.items() if any(universe[i].user_id == victim for i in m["sample_ids"])}
    assert held, "the victim must be in some shard"
    tomb = Ledger(forgotten / "ledger.sqlite", create=False).tombstones()
    assert tomb == {(victim, int(i)) for i in ml100k.inter[ml100k.inter.user_id == victim].item_id}
    for m in after.values():
        assert not any(universe[i].user_id == victim for i in m["sample_ids"])
        assert not any(shows_tombstoned(universe[i], tomb) for i in m["sample_ids"])
    old_bytes, new_bytes = tensor_bytes(trained), tensor_bytes(forgotten)
    for k in before:
        if k in held:
            assert new_bytes[k] != old_bytes[k] and len(after[k]["sample_ids"]) < len(before[k]["sample_ids"])
        else:
            assert new_bytes[k] == old_bytes[k], f"unaffected shard {k} changed"
            assert after[k] == before[k]
    cert = certificate(forgotten)
    body = cert["body"]
    assert body["affected_shards"] == sorted(held) and body["lineage_check"]["passed"]
    run_ids = {s.sample_id for s in splits.train + splits.valid + splits.test if s.user_id == victim}
    assert {x["sample_id"] for x in body["removed"]["samples"]} == run_ids
    for a in body["adapters"]:
        assert a["unchanged"] == (a["shard"] not in held)
    with np.load(forgotten / "features.npz") as z:
        assert not run_ids & set(z["ids"].tolist())  # derived copies purged too


def test_retrained_shard_is_exactly_a_fresh_training_without_the_deleted_samples(
    forgotten, trained, victim, ctx, ml100k, monkeypatch
):
    cfg, universe, _ = ctx
    k = certificate(forgotten)["body"]["affected_shards"][0]
    remaining = [universe[i] for i in metas(trained)[k]["sample_ids"] if universe[i].user_id != victim]
    model, init = build_model(cfg, ml100k)
    train_shard(model, init, remaining, cfg, k, progress=False)
    fresh = adapter_state(model.model)
    installed, _ = read_adapter(forgotten / "adapters" / f"shard-{k}")
    assert fresh.keys() == installed.keys()
    assert tensors_digest(fresh) == tensors_digest(installed)  # bit-identical: exact unlearning


KILL_AT = """
import os, signal, sys
from privrec.commands.forget import run_forget
def fault(point):
    if point == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)
run_forget(sys.argv[1], users=[int(sys.argv[2])], progress=False, fault=fault)
"""


def test_forget_killed_between_retrain_and_install_resumes_to_the_same_certificate(
    trained, forgotten, victim, tmp_path, capsys
):
    run = copy_run(trained, tmp_path / "run")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        PRIVREC_CACHE_DIR=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
    )
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT, str(run), str(victim), "retrained"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    req = Ledger(run / "ledger.sqlite", create=False).unfinished()
    assert req["status"] == RETRAINED
    assert tensor_bytes(run) == tensor_bytes(trained)  # killed before any adapter was replaced
    assert list((run / "staging" / req["id"]).glob("shard-*"))
    code, out, _ = cli(capsys, "forget", str(run), "--resume")
    assert code == 0
    resumed, reference = certificate(run), certificate(forgotten)
    assert certificate_body(resumed) == certificate_body(reference)
    assert tensor_bytes(run) == tensor_bytes(forgotten)
    assert not list((run / "staging").glob("*"))
    code, out, _ = cli(capsys, "forget", str(run), "--resume")
    assert code == 0 and "nothing to resume" in out  # never applied twice


class Crash(Exception):
    pass


@pytest.mark.parametrize("point", ["recorded", "installed-shard"])
def test_forget_interrupted_elsewhere_resumes_to_the_same_certificate(
    trained, forgotten, victim, tmp_path, capsys, point
):
    run = copy_run(trained, tmp_path / "run")

    def fault(p):
        if p.startswith(point):
            raise Crash(p)

    with pytest.raises(Crash):
        run_forget(run, users=[victim], progress=False, fault=fault)
    ledger = Ledger(run / "ledger.sqlite", create=False)
    assert ledger.unfinished()["status"] == (PENDING if point == "recorded" else RETRAINED)
    # an unfinished request blocks new ones until it is finished
    code, _, err = cli(capsys, "forget", str(run), "--users", "1")
    assert code == 2 and "--resume" in err
    cert = run_resume(run, progress=False)
    assert certificate_body(cert) == certificate_body(certificate(forgotten))
    assert tensor_bytes(run) == tensor_bytes(forgotten)
    assert [r["status"] for r in ledger.requests()] == [DONE]


def test_verify_passes_then_fails_on_tampering(forgotten, tmp_path, capsys):
    run = copy_run(forgotten, tmp_path / "run")
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 0 and "all checks passed" in out
    cert = certificate(run)
    k = cert["body"]["affected_shards"][0]
    folder = run / "adapters" / f"shard-{k}"
    pristine = {p.name: p.read_bytes() for p in folder.iterdir()}

    state = load_file(folder / "adapter_model.safetensors")  # 1. tensors changed
    name = min(state)
    state[name] = state[name] + 1e-3
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 1 and f"shard {k}: FAILED" in out and "tensors differ" in out

    for n, b in pristine.items():
        (folder / n).write_bytes(b)
    meta = json.loads((folder / "privrec.json").read_text())  # 2. a deleted sample put back in the lineage
    meta["sample_ids"] = sorted(meta["sample_ids"] + [cert["body"]["removed"]["samples"][0]["sample_id"]])
    (folder / "privrec.json").write_text(json.dumps(meta))
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 1 and "deleted samples" in out and "back in a lineage" in out

    for n, b in pristine.items():
        (folder / n).write_bytes(b)
    [path] = (run / "certificates").glob("*.json")  # 3. the certificate edited
    edited = json.loads(path.read_text())
    edited["body"]["affected_shards"] = []
    path.write_text(json.dumps(edited))
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 1 and "altered" in out

    path.write_text(json.dumps(cert))  # 4. a stray copy of a shard: shards must stay disjoint
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 0, out
    shutil.copytree(folder, run / "adapters" / "shard-9")
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 1 and "in two shards" in out and "not recorded in the ledger" in out


def test_tombstoned_samples_stay_out_of_later_training(forgotten, victim, ctx, tmp_path, capsys):
    _, universe, splits = ctx
    run = copy_run(forgotten, tmp_path / "run")
    n_removed = sum(s.user_id == victim for s in splits.train)
    code, _, _ = cli(
        capsys,
        "shard-train",
        APA_TINY,
        "--out",
        str(run),
        "--set",
        "shards.k=2",
        "--set",
        "shards.partition=random",
        "--set",
        "shards.full_retrain=true",
    )
    assert code == 0
    lineages = metas(run)
    assert sorted(lineages) == [0, 1]  # re-partitioned into 2 shards; shards 2 and 3 removed
    ids = [i for m in lineages.values() for i in m["sample_ids"]]
    assert len(ids) == 64 - n_removed and not any(universe[i].user_id == victim for i in ids)
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_train"] == 64 - n_removed and m["retrain"]["n_train"] == 64 - n_removed  # full retrain too
    assert m["n_tombstoned_interactions"] > 0
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 0, out  # the old certificate still holds: its samples are in no lineage


def test_replaying_a_done_request_is_a_noop(forgotten, victim, tmp_path, capsys):
    run = copy_run(forgotten, tmp_path / "run")
    before = tensor_bytes(run)
    code, out, _ = cli(capsys, "forget", str(run), "--users", str(victim))
    assert code == 0 and "nothing to forget" in out
    assert len(Ledger(run / "ledger.sqlite", create=False).requests()) == 1 and tensor_bytes(run) == before


def test_forget_one_sample_from_a_file(trained, ctx, tmp_path, capsys):
    _, universe, _ = ctx
    run = copy_run(trained, tmp_path / "run")
    k, meta = next(iter(metas(run).items()))
    sid = meta["sample_ids"][0]
    (tmp_path / "ids.txt").write_text(f"# one sample\n{sid}\n")
    code, _, _ = cli(capsys, "forget", str(run), "--samples", str(tmp_path / "ids.txt"))
    assert code == 0
    body = certificate(run)["body"]
    s = universe[sid]
    assert body["removed"]["interactions"] == [[s.user_id, s.item_id, s.timestamp]]
    assert sid in {x["sample_id"] for x in body["removed"]["samples"]} and body["affected_shards"] == [k]
    assert sid not in metas(run)[k]["sample_ids"]


def test_cli_errors_are_one_line_exit_2(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    cases = [
        (["forget", str(tmp_path), "--users", "1"], "config.yaml"),
        (["forget", str(run), "--users", "a,b"], "--users"),
        (["forget", str(run), "--users", "99999"], "user 99999 not found"),
        (["forget", str(run), "--samples", str(tmp_path / "nope.txt")], "not found"),
        (["shard-train", APA_TINY, "--out", str(tmp_path / "x"), "--set", "shards.bogus=1"], "unknown key"),
        (
            ["shard-train", APA_TINY, "--out", str(tmp_path / "x"), "--set", "shards.aggregations=[sisa]"],
            "primary",
        ),
    ]
    (tmp_path / "bad.txt").write_text("u1-i999999\n")
    cases.append((["forget", str(run), "--samples", str(tmp_path / "bad.txt")], "not an interaction"))
    for argv, msg in cases:
        code, _, err = cli(capsys, *argv)
        assert code == 2, argv
        assert msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not Ledger(run / "ledger.sqlite", create=False).requests()  # nothing was recorded


def test_shard_train_resume_keeps_finished_shards_and_retrains_the_missing_one(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    shutil.rmtree(run / "adapters" / "shard-3")  # as if killed before shard 3 was saved
    code, _, _ = cli(capsys, "shard-train", APA_TINY, "--out", str(run), "--resume")
    assert code == 0
    log = (run / "log.txt").read_text()
    assert log.count("kept (resume)") == 3
    assert tensor_bytes(run) == tensor_bytes(trained)  # shard 3 retrained bit-identically (seeded)
    assert cli(capsys, "forget", str(run), "--verify")[0] == 0


def test_forgetting_a_whole_shard_retires_it(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    ids = metas(run)[0]["sample_ids"]
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    assert cli(capsys, "forget", str(run), "--samples", str(tmp_path / "ids.txt"))[0] == 0
    assert sorted(metas(run)) == [1, 2, 3]  # no data left to train shard 0: it is gone, not kept
    after = {a["shard"]: a for a in certificate(run)["body"]["adapters"]}
    assert after[0]["after"] is None and after[0]["n_after"] == 0 and not after[0]["unchanged"]
    affected = certificate(run)["body"]["affected_shards"]
    assert 0 in affected and all(after[k]["unchanged"] == (k not in affected) for k in (1, 2, 3))
    assert cli(capsys, "forget", str(run), "--verify")[0] == 0
