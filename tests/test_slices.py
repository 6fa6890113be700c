"""Forgetting one person fast (METHODS §9) on the tiny model: a semantic-users partition with SISA slices.

A user's samples sit in one shard and one slice; forgetting them restores the checkpoint before that slice
and replays the later stages. Exactness is checked bit for bit (fp32 pinned): the replayed adapter is what
sliced training from scratch on the remaining samples gives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import certificate_body, only_certificate
from test_unlearning import KILL_AT  # the same kill -9 at a fault point

from privrec.cli import main
from privrec.config import load_config
from privrec.model.adapters import adapter_state, read_adapter, read_meta, tensors_digest
from privrec.unlearning.exact.ledger import Ledger
from privrec.unlearning.exact.shards import ApaConfig, build_model, source_data
from privrec.unlearning.exact.slices import (
    INIT,
    StageState,
    checkpoint_records,
    stage_dir,
    train_sliced,
)

ROOT = Path(__file__).resolve().parents[1]
R = 3


def cli(capsys, *argv):
    code = main(["--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def shard_metas(run: Path) -> dict[int, dict]:
    return {int(p.name.split("-")[1]): read_meta(p) for p in sorted((run / "adapters").glob("shard-*"))}


def all_bytes(run: Path, under: str) -> dict[str, bytes]:
    """Every adapter weight file under ``run/under``, by relative path."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / under).rglob("adapter_model.safetensors"))}


def cache_copy(trained: Path, dst: Path) -> Path:
    """A copy of the frozen-layer cache shard-train filled. The frozen layers' output for a prompt can differ
    in the last bit with the batch it was computed in, so exact comparisons share the cache, as every command
    on one model directory does."""
    shutil.copytree(trained.parent / "cache", dst, dirs_exist_ok=True)
    return dst


def certificate(run: Path) -> dict:
    return only_certificate(run)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    raw = yaml.safe_load((ROOT / "configs" / "apa-tiny.yaml").read_text())
    raw["model"]["precision"] = "fp32"  # exact equality below
    raw["shards"].update(partition="semantic-users", slices=R)
    path = tmp_path_factory.mktemp("cfg") / "sliced.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def ctx(config_file):
    cfg = load_config(config_file, cls=ApaConfig)
    return cfg, *source_data(cfg)


@pytest.fixture(scope="module")
def trained(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sliced") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_CACHE_DIR", str(out.parent / "cache"))
        assert main(["--no-progress", "shard-train", str(config_file), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def victim(trained, ctx):
    """(user, shard) of a user in the first slice of a shard: forgetting them replays every stage."""
    _, _, universe, _ = ctx
    for k, meta in shard_metas(trained).items():
        users = sorted({universe[i].user_id for i in meta["slices"][0]})
        if users and meta["slices"][1]:
            return users[0], k
    pytest.fail("no shard has a user in its first slice")


@pytest.fixture(scope="module")
def forgotten(trained, victim, tmp_path_factory):
    out = tmp_path_factory.mktemp("forgotten") / "run"
    shutil.copytree(trained, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_CACHE_DIR", str(cache_copy(trained, out.parent / "cache")))
        assert main(["--no-progress", "forget", str(out), "--users", str(victim[0])]) == 0
    return out


def test_sliced_shards_keep_users_whole_and_record_each_checkpoints_lineage(trained, ctx):
    _, _, universe, _ = ctx
    m = json.loads((trained / "model.json").read_text())
    assert m["partition"] == "semantic-users" and m["slices"] == R
    seen: dict[int, tuple[int, int]] = {}
    for k, meta in shard_metas(trained).items():
        assert len(meta["slices"]) == R and sorted(i for sl in meta["slices"] for i in sl) == meta["sample_ids"]
        for j, sl in enumerate(meta["slices"]):
            for i in sl:
                assert seen.setdefault(universe[i].user_id, (k, j)) == (k, j), "a user spans shards or slices"
        assert [c["stage"] for c in meta["checkpoints"]] == list(range(1, R))
        for c in meta["checkpoints"]:  # each checkpoint's own lineage: exactly slices 1..s
            cm = read_meta(stage_dir(trained / "slices" / f"shard-{k}", c["stage"]))
            assert cm["sample_ids"] == sorted(i for sl in meta["slices"][: c["stage"]] for i in sl)
            assert cm["lineage_sha256"] == c["lineage_sha256"]


def test_forgetting_a_user_replays_one_shard_from_its_slice_and_deletes_its_checkpoints(
        trained, forgotten, victim, ctx):
    _, _, universe, _ = ctx
    user, k = victim
    body = certificate(forgotten)["body"]
    assert body["affected_shards"] == [k]  # semantic-users: one shard
    adapters = {a["shard"]: a for a in body["adapters"]}
    assert adapters[k]["slices"] == {"restored": INIT, "replayed": [1, 2, 3],
                                     "checkpoints_replaced": ["stage-1", "stage-2"]}
    assert all("slices" not in a for j, a in adapters.items() if j != k)
    before, after = all_bytes(trained, "adapters") | all_bytes(trained, "slices"), \
        all_bytes(forgotten, "adapters") | all_bytes(forgotten, "slices")
    for path, b in before.items():
        assert (after[path] == b) == (f"shard-{k}" not in path), path  # only shard k and its checkpoints changed
    # no checkpoint or adapter anywhere in the model directory still holds the user's samples
    for meta_file in forgotten.rglob("privrec.json"):
        ids = json.loads(meta_file.read_text())["sample_ids"]
        assert not any(universe[i].user_id == user for i in ids), meta_file
    old_hashes = {c["tensors_sha256"] for c in shard_metas(trained)[k]["checkpoints"]}
    assert not old_hashes & {c["tensors_sha256"] for c in shard_metas(forgotten)[k]["checkpoints"]}
    assert not list((forgotten / "staging").glob("*")) and not list((forgotten / "slices").glob(".*"))


def test_a_replayed_sliced_shard_equals_sliced_training_from_scratch_without_the_user(
        forgotten, victim, ctx, tmp_path, monkeypatch):
    cfg, ds, universe, _ = ctx
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(forgotten.parent / "cache"))
    _, k = victim
    meta = shard_metas(forgotten)[k]
    model, init = build_model(cfg, ds)
    slices = [[universe[i] for i in sl] for sl in meta["slices"]]
    train_sliced(model, StageState(init, None), slices, cfg, k, 1, tmp_path / "fresh", {}, progress=False)
    installed, _ = read_adapter(forgotten / "adapters" / f"shard-{k}")
    assert tensors_digest(adapter_state(model.model)) == tensors_digest(installed)  # bit-identical
    assert checkpoint_records(tmp_path / "fresh", R) == meta["checkpoints"]  # the checkpoints too


def test_a_deletion_in_a_later_slice_restores_the_checkpoint_before_it_and_still_equals_scratch(
        trained, ctx, tmp_path, capsys, monkeypatch):
    cfg, ds, universe, _ = ctx
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(cache_copy(trained, tmp_path / "shared-cache")))
    k, meta = next((k, m) for k, m in shard_metas(trained).items() if m["slices"][1])
    user = sorted({universe[i].user_id for i in meta["slices"][1]})[0]  # a user of slice 2
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, out, _ = cli(capsys, "forget", str(run), "--users", str(user))
    assert code == 0, out
    a = next(a for a in certificate(run)["body"]["adapters"] if a["shard"] == k)
    assert a["slices"] == {"restored": "stage-1", "replayed": [2, 3], "checkpoints_replaced": ["stage-2"]}
    after = shard_metas(run)[k]
    assert after["checkpoints"][0] == meta["checkpoints"][0]  # stage-1 never held the user: kept
    model, init = build_model(cfg, ds)
    slices = [[universe[i] for i in sl] for sl in after["slices"]]
    train_sliced(model, StageState(init, None), slices, cfg, k, 1, tmp_path / "fresh", {}, progress=False)
    installed, _ = read_adapter(run / "adapters" / f"shard-{k}")
    assert tensors_digest(adapter_state(model.model)) == tensors_digest(installed)  # bit-identical




def test_kill_9_during_a_replay_then_resume_gives_the_same_certificate(
        trained, forgotten, victim, tmp_path, capsys):
    user, k = victim
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cache = cache_copy(trained, tmp_path / "cache")  # the test's own cache folder (conftest), as the trained run's
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               PRIVREC_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")
    point = f"checkpoint-shard-{k}-stage-1"  # mid-replay: stage 1 replayed and saved, stages 2 and 3 not yet
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(run), str(user), point], env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    req = Ledger(run / "ledger.sqlite", create=False).unfinished()
    staged = run / "staging" / req["id"]
    assert (staged / "slices" / f"shard-{k}" / "stage-1").is_dir() and not (staged / f"shard-{k}").exists()
    assert all_bytes(run, "slices") == all_bytes(trained, "slices")  # nothing installed yet
    code, out, _ = cli(capsys, "forget", str(run), "--resume")
    assert code == 0, out
    resumed, reference = certificate(run), certificate(forgotten)
    assert certificate_body(resumed) == certificate_body(reference)
    assert all_bytes(run, "slices") == all_bytes(forgotten, "slices")
    assert "replayed stages 2..3" in (run / "log.txt").read_text()  # the resume continued from staged stage-1
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 0 and "all checks passed" in out


def test_verify_catches_a_checkpoint_that_still_holds_deleted_data(trained, forgotten, victim, tmp_path, capsys):
    _, k = victim
    run = tmp_path / "run"
    shutil.copytree(forgotten, run)
    stage = run / "slices" / f"shard-{k}" / "stage-2"
    shutil.rmtree(stage)
    shutil.copytree(trained / "slices" / f"shard-{k}" / "stage-2", stage)  # the pre-deletion checkpoint put back
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 1 and f"shard {k}: FAILED" in out and "checkpoint stage-2" in out and "deleted samples" in out
    shutil.rmtree(stage)
    shutil.copytree(trained / "slices" / f"shard-{k}", run / "slices" / "shard-9")  # a stray set
    code, out, _ = cli(capsys, "forget", str(run), "--verify")
    assert code == 1 and "belong to no current shard" in out

