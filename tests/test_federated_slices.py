"""SISA slices inside a federated client (METHODS §9, §10; ``federated.slices``) on the tiny model.

A mixture client's samples are cut into R slices of whole users (newest last); round t trains on the slices
it has reached, and the state before each new slice enters is a checkpoint with its own lineage. Forgetting a
user restores the checkpoint before the first round that saw their slice and replays the later rounds: the
adapter is bit for bit what sliced training from scratch on the remaining samples (same slice map) gives, the
checkpoints that held the user are replaced, and the other clients are untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import certificate_body
from fed_helpers import fed_config, restore_threads  # noqa: F401 (autouse fixture)
from test_unlearning import KILL_AT  # the same kill -9 at a fault point

from privrec import models
from privrec.commands import forget
from privrec.errors import ConfigError
from privrec.federated.client import FederatedClient
from privrec.federated.runner import build_model, plan_federation, run_federate
from privrec.federated.slicing import checkpoint_after, first_round, slices_seen
from privrec.model.adapters import adapter_state, read_adapter, read_meta, tensors_digest
from privrec.unlearning.exact.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
R, ROUNDS = 3, 3


def sliced_config(**federated):
    return fed_config(model={"precision": "fp32"},  # exact equality below
                      data={"n_train": 120},
                      federated={"strategy": "mixture", "rounds": ROUNDS, "slices": R, **federated})


def digests(run: Path) -> dict[str, str]:
    return {a.name: a.tensors_sha256 for a in models.load(run).adapters}


def checkpoint_bytes(run: Path) -> dict[str, bytes]:
    base = run / "slices"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*.safetensors"))}


@pytest.mark.parametrize("rounds,r", [(3, 3), (4, 2), (5, 3), (4, 4), (2, 1)])
def test_every_slice_enters_once_and_every_checkpoint_is_the_state_before_it(rounds, r):
    seen = [slices_seen(t, r, rounds) for t in range(rounds)]
    assert seen[0] == 1 and seen[-1] == r and all(0 <= b - a <= 1 for a, b in zip(seen, seen[1:]))
    for s in range(1, r + 1):
        assert seen[first_round(s, r, rounds)] == s and (first_round(s, r, rounds) == 0 or
                                                         seen[first_round(s, r, rounds) - 1] == s - 1)
    stages = [checkpoint_after(t, r, rounds) for t in range(rounds)]
    assert sorted(s for s in stages if s is not None) == list(range(1, r))
    for t, s in enumerate(stages):
        if s is not None:
            assert t + 1 == first_round(s + 1, r, rounds)  # the state just before slice s + 1 enters


def test_slices_need_a_strategy_that_never_mixes_and_at_most_one_per_round():
    with pytest.raises(ConfigError, match="never mixes"):
        fed_config(federated={"strategy": "pplr", "slices": 2})
    with pytest.raises(ConfigError, match="exceeds federated.rounds"):
        fed_config(federated={"strategy": "local", "slices": 3, "rounds": 2})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("fedslices")
    cfg = sliced_config()
    metrics = run_federate(cfg, base / "run", progress=False)
    unsliced = run_federate(sliced_config(slices=1), base / "unsliced", progress=False)
    return cfg, metrics, base / "run", unsliced


def test_a_sliced_client_trains_on_whole_users_newest_last_with_checkpoints_of_their_own_lineage(trained):
    cfg, metrics, run, unsliced = trained
    fed = plan_federation(cfg)
    for c in fed.clients:
        meta = read_meta(run / "adapters" / f"client-{c}")
        train = fed.samples(c)[0]
        by_id = {s.sample_id: s for s in train}
        slices = meta["slices"]
        assert sorted(i for sl in slices for i in sl) == sorted(by_id) and len(slices) == R
        users = [{by_id[i].user_id for i in sl} for sl in slices]
        assert all(not (a & b) for j, a in enumerate(users) for b in users[j + 1:])  # a user is in one slice
        first = {u: min(s.timestamp for s in train if s.user_id == u) for u in {s.user_id for s in train}}
        nonempty = [u for u in users if u]
        assert all(max(first[u] for u in a) <= min(first[u] for u in b) for a, b in zip(nonempty, nonempty[1:]))
        assert [rec["stage"] for rec in meta["checkpoints"]] == list(range(1, R))
        for rec in meta["checkpoints"]:
            state, cmeta = read_adapter(run / "slices" / f"client-{c}" / f"stage-{rec['stage']}")
            assert cmeta["sample_ids"] == sorted(i for sl in slices[:rec["stage"]] for i in sl)
            assert tensors_digest(state) == rec["tensors_sha256"]
    # round t trained only on the slices it reached: fewer samples seen than the unsliced run
    assert metrics["samples_seen"] < unsliced["samples_seen"]
    assert digests(run) != digests(trained[2].parent / "unsliced")
    assert forget.run_verify(run)["ok"]


def victim(run: Path, client: int, slice_no: int) -> int:
    """A user of ``client``'s slice ``slice_no`` (from 1)."""
    meta = read_meta(run / "adapters" / f"client-{client}")
    return int(meta["slices"][slice_no - 1][0].split("-")[0][1:])


def from_scratch(cfg, client: int, slices: list[list[str]], tombstoned_user: int) -> str:
    """Sliced training of ``client`` from the run's initial adapter on its remaining samples, same slice map."""
    fed = plan_federation(cfg)
    model = build_model(cfg, fed.splits)
    keep = [s for s in fed.samples(client)[0] if s.user_id != tombstoned_user]
    ids = {s.sample_id for s in keep}
    state, _ = FederatedClient(client, model, keep, [], [], cfg,
                               slices=[[i for i in sl if i in ids] for sl in slices]).train_alone(
        adapter_state(model.model))
    return tensors_digest(state)


@pytest.mark.parametrize("slice_no", [R, 1])
def test_forgetting_a_user_replays_from_their_slice_to_what_training_without_them_gives(trained, tmp_path, slice_no):
    cfg, _, src, _ = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    client = 1
    user = victim(run, client, slice_no)
    old = read_meta(run / "adapters" / f"client-{client}")
    before, ckpts = digests(run), checkpoint_bytes(run)

    cert = forget.run_forget(run, users=[user], progress=False)
    body = cert["body"]
    assert body["affected_shards"] == [client] and body["lineage_check"]["passed"]
    [row] = [a for a in body["adapters"] if a["shard"] == client]
    assert row["slices"]["restored"] == ("init" if slice_no == 1 else f"stage-{slice_no - 1}")
    assert row["slices"]["replayed_rounds"] == list(range(first_round(slice_no, R, ROUNDS) + 1, ROUNDS + 1))
    assert row["slices"]["checkpoints_replaced"] == [f"stage-{s}" for s in range(slice_no, R)]

    after = digests(run)
    assert {n for n in before if before[n] != after[n]} == {f"client-{client}"}
    assert after[f"client-{client}"] == from_scratch(cfg, client, old["slices"], user)

    now = checkpoint_bytes(run)
    for name, data in ckpts.items():  # checkpoints before the user's slice are kept, the later ones replaced
        c, stage = name.split("/")[:2]
        s = int(stage.split("-")[1])
        assert (now[name] == data) == (c != f"client-{client}" or s < slice_no), name
    for folder in (run / "slices").rglob("stage-*"):
        assert not any(i.startswith(f"u{user}-") for i in read_meta(folder)["sample_ids"])
    assert not list((run / "slices").rglob("*.old"))
    assert f"restored {row['slices']['restored']}" in (run / "log.txt").read_text()
    assert forget.run_verify(run)["ok"]

    # a checkpoint that still holds the user, put back, is caught
    if slice_no == 1:
        stage = run / "slices" / f"client-{client}" / "stage-1"
        shutil.rmtree(stage)
        shutil.copytree(src / "slices" / f"client-{client}" / "stage-1", stage)
        v = forget.run_verify(run)
        assert not v["ok"]


def test_kill_9_during_a_client_replay_then_resume_gives_the_same_certificate(trained, tmp_path):
    cfg, _, src, _ = trained
    client = 2
    user = victim(src, client, 1)
    clean = tmp_path / "clean"
    shutil.copytree(src, clean)
    want = forget.run_forget(clean, users=[user], progress=False)

    run = tmp_path / "run"
    shutil.copytree(src, run)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    point = f"checkpoint-client-{client}-stage-1"  # stage 1 replayed and staged, the rest not yet
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(run), str(user), point], env=env, check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    req = Ledger(run / "ledger.sqlite", create=False).unfinished()
    assert (run / "staging" / req["id"] / "slices" / f"client-{client}" / "stage-1").is_dir()
    assert checkpoint_bytes(run) == checkpoint_bytes(src)  # nothing installed yet
    got = forget.run_resume(run, progress=False)
    assert certificate_body(got) == certificate_body(want)
    assert checkpoint_bytes(run) == checkpoint_bytes(clean) and digests(run) == digests(clean)
    assert "replayed rounds 2..3" in (run / "log.txt").read_text()  # the resume continued from staged stage-1
    assert forget.run_verify(run)["ok"]


def test_a_sliced_client_leaving_takes_its_checkpoints_with_it(trained, tmp_path):
    _, _, src, _ = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    forget.run_forget(run, clients=[0], progress=False)
    assert not (run / "slices" / "client-0").exists() and (run / "slices" / "client-1").is_dir()
    assert forget.run_verify(run)["ok"]
