"""Federated forgetting (METHODS §10): the ``mixture`` strategy never mixes weights, forgetting a user retrains
only their client's adapter (exactly: as training it again without them would), a client leaving drops its
adapter, and a PPLR / FedAvg model forgets only by a full federated retrain, asked for and certified."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import certificate_body, run_cli
from fed_helpers import fed_config, restore_threads  # noqa: F401 (autouse fixture)

from privrec import models
from privrec.cli import main
from privrec.commands import forget
from privrec.errors import UserError
from privrec.federated.runner import plan_federation, run_federate
from privrec.model.adapters import read_adapter, read_meta
from privrec.unlearning.exact.forget import resolve_interactions


def one_line_exit_2(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("privrec: error")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def _digests(run) -> dict[str, str]:
    return {a.name: a.tensors_sha256 for a in models.load(run).adapters}


def _interactions(cfg, users) -> set[tuple[int, int]]:
    return {(u, i) for u, i, _ in resolve_interactions(plan_federation(cfg).splits.dataset, users)}


def _train_user(run) -> tuple[int, int]:
    """(a user with training samples in the run, their client)."""
    m = models.load(run)
    meta = read_meta(run / "adapters" / "client-0")
    user = int(meta["sample_ids"][0].split("-")[0][1:])
    return user, m.clients[user]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A mixture run, the local run of the same config and a PPLR run (tiny model, 3 clients)."""
    base = tmp_path_factory.mktemp("fedforget")
    out = {}
    for strategy in ("mixture", "local", "pplr"):
        cfg = fed_config(federated={"strategy": strategy})
        out[strategy] = (cfg, run_federate(cfg, base / strategy, progress=False), base / strategy)
    return out


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_mixture_trains_like_local_and_each_adapter_holds_only_its_clients_samples(runs):
    """No weights are mixed during training: the mixture's adapters are bit-identical to local's, and each
    client adapter's lineage is exactly its own training samples."""
    cfg, m, run = runs["mixture"]
    _, _, local = runs["local"]
    assert _digests(run) == _digests(local)
    fed = plan_federation(cfg)
    for a in models.load(run).adapters:
        c = int(a.name.split("-")[1])
        assert a.sample_ids == sorted(s.sample_id for s in fed.samples(c)[0])
    manifest = models.load(run)
    assert manifest.strategy == "mixture" and manifest.scoring == "mixture"
    assert manifest.forget == ["retrain-client"] and manifest.strategy_allows == ["retrain-client"]
    assert m["rounds"][-1]["bytes"]["adapters"] == 0  # nothing travels during training


def test_mixture_scores_with_every_clients_adapter(runs, tmp_path, capsys):
    """A mixture client's test AUC differs from local's (it scores with all adapters), every client's prompts
    weigh all adapters (weights in [0, 1]), and the saved model's scorer (privrec evaluate) gives the run's
    metrics; changing another client's adapter changes a client's scores."""
    _, m, run = runs["mixture"]
    _, loc, _ = runs["local"]
    assert m["auc"] != pytest.approx(loc["auc"], abs=1e-9)
    assert all(0.0 <= c["mixture_own_weight"] <= 1.0 for c in m["clients"])

    assert main(["--no-progress", "evaluate", str(run)]) == 0
    e = json.loads((run / "eval_test.json").read_text())
    assert e["overall"]["auc"] == pytest.approx(m["overall"]["auc"], abs=1e-6)
    assert [c["auc"] for c in e["clients"]] == pytest.approx([c["auc"] for c in m["clients"]], abs=1e-6)

    from privrec.recommender import ClientMixture, open_model, scorer_of

    md = open_model(run)
    splits = md.splits()
    scorer = scorer_of(md, splits)
    assert isinstance(scorer, ClientMixture)
    client0 = [s for s in splits.test if md.manifest.clients[s.user_id] == 0]
    before = scorer.score(client0, progress=False)
    scorer.states[1] = {k: v * 3 for k, v in scorer.states[1].items()}  # another client's adapter
    scorer._pools.clear()
    assert not np.allclose(scorer.score(client0, progress=False), before, atol=1e-7)


def test_a_mixture_validation_sample_is_not_its_own_neighbour(runs):
    """The mixture's neighbour pool is the client's validation samples: scoring them weighs each on the pool
    without it (with itself in, its own label would choose its weights)."""
    from privrec.federated.mixture import Pool, mixture_weights
    from privrec.model.mixture import score_mixture
    from privrec.recommender import open_model, scorer_of

    _, _, run = runs["mixture"]
    md = open_model(run)
    scorer = scorer_of(md, md.splits())
    fcfg, states = md.cfg.federated, list(scorer.states.values())
    c = max(md.manifest.clients.values(), key=lambda k: len(scorer.valid_of(k)))
    valid = scorer.valid_of(c)
    assert len(valid) >= 3
    got = scorer.score(valid, progress=False)
    pool = scorer.pool(c, False)
    rest = [np.arange(len(valid)) != i for i in range(len(valid))]
    by_hand = np.concatenate([mixture_weights(fcfg, pool.features[i:i + 1],
                                              Pool(pool.features[k], pool.probs[k], pool.labels[k]), len(states))
                              for i, k in enumerate(rest)])
    assert not np.allclose(by_hand, mixture_weights(fcfg, pool.features, pool, len(states)), atol=1e-3)
    mode = "d" if fcfg.mixture_aggregation == "apa-d" else "nd"
    want = score_mixture(scorer.model, scorer.encode(c, valid), states, by_hand, mode, scorer.batch_size, False)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_forgetting_a_user_retrains_only_their_client_exactly(runs, tmp_path):
    """The user's client retrains alone, to the adapter a federation trained from scratch without the user
    (same clients) gives that client; every other adapter stays bit-identical; certificate and verify pass."""
    cfg, _, src = runs["mixture"]
    run = _copy(src, tmp_path)
    user, client = _train_user(run)
    before = _digests(run)
    cert = forget.run_forget(run, users=[user], progress=False)
    body = cert["body"]
    assert body["affected_shards"] == [client] and body["lineage_check"]["passed"]
    assert body["run"]["forget"] == "retrain-client" and body["run"]["kind"] == "clients"
    after = _digests(run)
    assert {n for n in before if before[n] != after[n]} == {f"client-{client}"}
    held = [i for a in models.load(run).adapters for i in a.sample_ids]
    assert held and not any(i.startswith(f"u{user}-") for i in held)

    fresh = run_federate(cfg, tmp_path / "fresh", progress=False, tombstones=_interactions(cfg, [user]),
                         assignment=dict(models.load(src).clients))
    assert fresh["n_train"] < cfg.data.n_train
    assert _digests(tmp_path / "fresh")[f"client-{client}"] == after[f"client-{client}"]
    assert forget.run_verify(run)["ok"]

    # the forgotten user is refused; the service-style submit works for a mixture model too
    from privrec.recommender import Recommender

    with pytest.raises(UserError, match="forgotten"):
        Recommender(run, progress=False).recommend(user, 3, max_candidates=4)


def test_a_client_leaving_drops_its_adapter_and_keeps_the_others(runs, tmp_path, capsys):
    cfg, _, src = runs["mixture"]
    run = _copy(src, tmp_path)
    before = _digests(run)
    code, out, err = run_cli(capsys, "forget", str(run), "--clients", "1")
    assert code == 0 and "clients [1]" in err
    cert = json.loads(out)
    fed = plan_federation(cfg)
    removed = {x["sample_id"] for x in cert["body"]["removed"]["samples"]}
    assert {s.sample_id for part in fed.samples(1) for s in part} <= removed  # its samples, in the certificate
    assert cert["body"]["request"]["kind"] == "clients" and cert["body"]["affected_shards"] == [1]
    after = _digests(run)
    assert sorted(after) == ["client-0", "client-2"] and all(after[n] == before[n] for n in after)
    assert not (run / "adapters" / "client-1").exists()
    code, out, _ = run_cli(capsys, "forget", str(run), "--verify")
    assert code == 0 and "all checks passed" in out

    # the remaining clients still score, with the mixture of the two adapters left
    assert main(["--no-progress", "evaluate", str(run)]) == 0
    e = json.loads((run / "eval_test.json").read_text())
    assert [c["client"] for c in e["clients"]] == [0, 2]

    assert "not a client" in one_line_exit_2(capsys, "forget", str(run), "--clients", "7")
    code, out, _ = run_cli(capsys, "forget", str(run), "--clients", "1")
    assert code == 0 and "nothing to forget" in out


def test_pplr_forgets_only_by_a_full_federated_retrain_asked_for(runs, tmp_path, capsys):
    """PPLR mixed every client into every adapter: refused with its cost unless --retrain-federation; then
    every adapter is the one a federation trained from scratch without the user gives (bit-identical)."""
    cfg, _, src = runs["pplr"]
    run = _copy(src, tmp_path)
    user, _ = _train_user(run)
    line = one_line_exit_2(capsys, "forget", str(run), "--users", str(user))
    assert "--retrain-federation" in line and "rounds" in line and "whole federation" in line
    assert not (run / "ledger.sqlite").exists() or not forget.run_verify(run)["certificates"]

    before = _digests(run)
    cert = forget.run_forget(run, users=[user], progress=False, retrain_federation=True)
    assert cert["body"]["affected_shards"] == [0, 1, 2] and cert["body"]["run"]["forget"] == "retrain-federation"
    after = _digests(run)
    assert all(before[n] != after[n] for n in before)
    run_federate(cfg, tmp_path / "fresh", progress=False, tombstones=_interactions(cfg, [user]),
                 assignment=dict(models.load(src).clients))
    assert _digests(tmp_path / "fresh") == after
    assert all(not any(i.startswith(f"u{user}-") for i in a.sample_ids) for a in models.load(run).adapters)
    assert forget.run_verify(run)["ok"]
    assert not (run / "staging").exists() or not any((run / "staging").iterdir())

    # a client leaving a PPLR model: the federation retrains without it, its adapter is gone
    cert = forget.run_forget(run, clients=[2], progress=False, retrain_federation=True)
    assert sorted(_digests(run)) == ["client-0", "client-1"] and forget.run_verify(run)["ok"]
    assert "--retrain-federation is for" in one_line_exit_2(
        capsys, "forget", str(_copy(runs["mixture"][2], tmp_path, "mix")), "--users", str(user),
        "--retrain-federation")


def test_a_federated_retrain_killed_midway_resumes_to_the_same_certificate(runs, tmp_path):
    """A crash after the federation retrained (before the swap) and after the swap: --resume finishes with
    the certificate body an uninterrupted request gives."""
    _, _, src = runs["pplr"]
    user, _ = _train_user(src)
    clean = _copy(src, tmp_path, "clean")
    want = forget.run_forget(clean, users=[user], progress=False, retrain_federation=True)["body"]
    for point in ("retrained", "installed-shard-1"):
        run = _copy(src, tmp_path, point)

        def crash(p, point=point):
            if p == point:
                raise KeyboardInterrupt(p)

        with pytest.raises(KeyboardInterrupt):
            forget.run_forget(run, users=[user], progress=False, retrain_federation=True, fault=crash)
        got = forget.run_resume(run, progress=False)
        assert certificate_body(got) == certificate_body({"body": want})
        assert forget.run_verify(run)["ok"]


def test_forget_on_a_federated_model_refuses_bad_input_in_one_line(runs, tmp_path, capsys):
    _, _, src = runs["mixture"]
    assert "--clients expects" in one_line_exit_2(capsys, "forget", str(src), "--clients", "a,b")
    assert "--clients is empty" in one_line_exit_2(capsys, "forget", str(src), "--clients", ",")
    shard_like = tmp_path / "single"
    from conftest import tiny_config

    from privrec.commands.train import run_train

    run_train(tiny_config(train={"epochs": 1}), shard_like, progress=False)
    assert "--clients is for federated models" in one_line_exit_2(capsys, "forget", str(shard_like), "--clients", "0")
    assert read_adapter(src / "adapters" / "client-0")[1]["trained_on_clients"] == [0]
