"""The federate procedure and its in-process runner, end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fed_helpers import deep_config, fed_config, restore_threads  # noqa: F401 (autouse fixture)

from privrec.cli import main
from privrec.federated import client as client_mod
from privrec.federated.client import FederatedClient
from privrec.federated.config import FederatedConfig
from privrec.federated.runner import (
    Federation,
    InProcessDispatcher,
    build_model,
    run_federate,
    run_rounds,
    state_bytes,
)
from privrec.federated.split import layer_index
from privrec.federated.strategies import Instructions, make_strategy
from privrec.model.adapters import adapter_state, lineage_of, read_adapter

ROOT = Path(__file__).resolve().parents[1]
TINY_FED = str(ROOT / "configs" / "pplr-tiny.yaml")


@pytest.fixture(scope="module")
def fed_splits(ml100k):
    from privrec.data import build_splits

    return build_splits(ml100k, fed_config().data, 0)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`privrec federate configs/pplr-tiny.yaml` (PPLR, 3 random clients, 2 rounds)."""
    out = tmp_path_factory.mktemp("fed") / "pplr"
    assert main(["--no-progress", "federate", TINY_FED, "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_federate_writes_the_metrics_the_issue_names(cli_run):
    out, m = cli_run
    assert {"auc", "logloss", "accuracy", "n"} <= set(m["overall"])
    assert [c["client"] for c in m["clients"]] == [0, 1, 2]
    assert all({"client", "n_train", "n_test", "auc"} <= set(c) for c in m["clients"])
    assert sum(c["n_train"] for c in m["clients"]) == m["n_train"] == 120
    assert sum(c["n_test"] for c in m["clients"]) == m["overall"]["n"] == 96
    aucs = np.array([c["auc"] for c in m["clients"]])
    assert m["balance"]["std"] == pytest.approx(aucs.std())
    assert m["balance"]["min"] == pytest.approx(aucs.min())
    assert m["balance"]["gap"] == pytest.approx(aucs.max() - aucs.min())
    assert [r["round"] for r in m["rounds"]] == [1, 2]
    assert all(r["mean_train_loss"] > 0 and 0 <= r["valid_auc"] <= 1 for r in m["rounds"])
    assert len(m["bytes_per_round"]) == 2 and all(b["adapters"] > 0 and b["activations"] == 0
                                                  for b in m["bytes_per_round"])
    assert m["client_parameters"] == m["total_parameters"] > 0 and m["server_parameters"] == 0
    assert m["failures"] == [] and m["strategy"] == "pplr"
    assert (out / "config.yaml").is_file() and "federated:" in (out / "config.yaml").read_text()
    assert "round 2/2" in (out / "log.txt").read_text()


def test_one_personalised_adapter_per_client(cli_run, ml100k):
    from privrec.config import load_config
    from privrec.data import build_splits

    train = build_splits(ml100k, load_config(TINY_FED, cls=FederatedConfig).data, 0).train
    out, _m = cli_run
    states, metas = [], []
    for c in range(3):
        state, meta = read_adapter(out / "adapters" / f"client-{c}")
        assert meta["client"] == c and meta["strategy"] == "pplr" and meta["base_fingerprint"]
        assert len(meta["sample_ids"]) == 120  # PPLR mixes every client's update into every adapter
        assert meta["lineage_sha256"] == lineage_of(train)  # the one lineage hash: ids + content
        states.append(state)
        metas.append(meta)
    assert metas[0]["tensors_sha256"] != metas[1]["tensors_sha256"] != metas[2]["tensors_sha256"]
    k = next(iter(states[0]))
    assert not torch.equal(states[0][k], states[1][k])


def test_identical_clients_end_with_identical_adapters(fed_splits):
    cfg = fed_config(federated={"strategy": "pplr", "rounds": 2})
    model = build_model(cfg, fed_splits)
    tr, va, te = fed_splits.train, fed_splits.valid, fed_splits.test
    clients = {0: FederatedClient(0, model, tr[:32], va[:12], te[:12], cfg),
               1: FederatedClient(1, model, tr[:32], va[:12], te[:12], cfg),  # the same data as client 0
               2: FederatedClient(2, model, tr[32:64], va[12:24], te[12:24], cfg)}
    fed = Federation(cfg, fed_splits, {})
    states, rounds, _ = run_rounds(fed, make_strategy(cfg.federated), InProcessDispatcher(clients),
                                   adapter_state(model.model))
    assert rounds[0]["client_loss"]["0"] == rounds[0]["client_loss"]["1"] != rounds[0]["client_loss"]["2"]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_fedavg_of_identical_clients_equals_training_one_of_them_alone(fed_splits):
    tr = fed_splits.train[:32]
    finals = {}
    for strategy, n in (("fedavg", 2), ("local", 1)):
        cfg = fed_config(federated={"strategy": strategy, "rounds": 2, "clients": n, "valid_every_round": False})
        model = build_model(cfg, fed_splits)
        clients = {c: FederatedClient(c, model, tr, [], [], cfg) for c in range(n)}
        states, _, _ = run_rounds(Federation(cfg, fed_splits, {}), make_strategy(cfg.federated),
                                  InProcessDispatcher(clients), adapter_state(model.model))
        finals[strategy] = states[0]
    for k in finals["local"]:
        torch.testing.assert_close(finals["fedavg"][k], finals["local"][k], atol=1e-6, rtol=1e-5)
    init = adapter_state(build_model(fed_config(), fed_splits).model)
    assert any(not torch.allclose(finals["local"][k], init[k]) for k in init)  # it did train


def test_fedprox_pulls_a_client_towards_the_global_state(fed_splits):
    cfg = fed_config(train={"epochs": 2, "lr": 5e-3})
    model = build_model(cfg, fed_splits)
    client = FederatedClient(0, model, fed_splits.train[:40], [], [], cfg)
    start = adapter_state(model.model)

    def drift(mu):
        new = client.fit(start, Instructions(rnd=0, seed=1, mu=mu)).update.state
        return float(sum(((new[k] - start[k]) ** 2).sum() for k in start)) ** 0.5

    free, prox = drift(0.0), drift(200.0)
    assert prox < 0.8 * free, (free, prox)


def test_a_client_failing_mid_round_is_left_out_and_the_run_goes_on(tmp_path, monkeypatch):
    state = {"fail": False, "batches": 0}
    real_fit, real_loss = FederatedClient.fit, client_mod.bce_loss

    def fit(self, st, ins):
        state["fail"], state["batches"] = (self.cid == 1 and ins.rnd == 0), 0
        return real_fit(self, st, ins)

    def loss(z, batch):
        state["batches"] += 1
        if state["fail"] and state["batches"] == 3:  # after two optimizer steps of client 1, round 1
            raise RuntimeError("client 1 lost its connection")
        return real_loss(z, batch)

    monkeypatch.setattr(FederatedClient, "fit", fit)
    monkeypatch.setattr(client_mod, "bce_loss", loss)
    m = run_federate(fed_config(federated={"rounds": 2}), tmp_path / "run", progress=False)
    assert [(f["round"], f["client"]) for f in m["failures"]] == [(1, 1)]
    assert "RuntimeError: client 1 lost its connection" in m["failures"][0]["error"]
    assert m["rounds"][0]["failed"] == [1] and sorted(m["rounds"][0]["client_loss"]) == ["0", "2"]
    assert m["rounds"][1]["failed"] == [] and sorted(m["rounds"][1]["client_loss"]) == ["0", "1", "2"]
    assert all(c["auc"] is not None for c in m["clients"]) and (tmp_path / "run" / "adapters" / "client-1").is_dir()
    assert "client 1 failed" in (tmp_path / "run" / "log.txt").read_text()


def test_centralised_reference_trains_one_adapter_on_the_union(tmp_path):
    m = run_federate(fed_config(federated={"strategy": "centralised", "rounds": 1}), tmp_path / "c", progress=False)
    assert m["rounds"][0]["samples_seen"] == m["n_train"]  # one pass over everyone's samples
    assert m["rounds"][0]["client_loss"].keys() == {"-1"}
    digests = {json.loads((tmp_path / "c" / "adapters" / f"client-{c}" / "privrec.json").read_text())
               ["tensors_sha256"] for c in range(3)}
    assert len(digests) == 1 and len(m["clients"]) == 3
    assert m["bytes_per_round"][0]["adapters"] == 0


def test_split_federation_end_to_end(tmp_path):
    cfg = deep_config(federated={"strategy": "pplr", "rounds": 2, "split": {"client_first": 1, "client_last": 1}})
    m = run_federate(cfg, tmp_path / "s", progress=False)
    assert 0 < m["client_parameter_share"] < 1 and m["server_parameters"] > 0
    assert m["client_parameters"] + m["server_parameters"] == m["total_parameters"]
    assert all(r["bytes"]["activations"] > 0 for r in m["rounds"])
    seen = sum(r["samples_seen"] for r in m["rounds"])
    assert m["bytes_per_training_sample"] == pytest.approx(sum(r["bytes"]["activations"] for r in m["rounds"]) / seen)
    states = [read_adapter(tmp_path / "s" / "adapters" / f"client-{c}")[0] for c in range(3)]
    server_keys = [k for k in states[0] if layer_index(k) in (1, 2)]
    assert server_keys and len(server_keys) < len(states[0])
    # the server keeps one set of middle-layer LoRA weights per client (personalised by PPLR)
    assert not torch.equal(states[0][server_keys[0]], states[1][server_keys[0]])
    # what travels for aggregation is the client part only
    client_part = {k: v for k, v in states[0].items() if layer_index(k) not in (1, 2)}
    assert m["rounds"][0]["bytes"]["adapters"] == pytest.approx(6 * state_bytes(client_part), rel=0.01)


def test_keep_best_valid_ends_with_the_best_rounds_adapters(tmp_path, monkeypatch):
    """federated.keep=best-valid: the run ends with (and scores) the adapters of the round whose validation AUC was
    highest, bit-identical to a run stopped after that round; later rounds' training does not leak into them."""
    from privrec.federated import runner

    curve = iter([0.60, 0.70, 0.65])  # the second round validates best
    real = runner.pooled_auc
    monkeypatch.setattr(runner, "pooled_auc", lambda preds: (real(preds), next(curve))[1])
    cfg = fed_config(federated={"strategy": "fedavg", "rounds": 3, "keep": "best-valid"})
    m = run_federate(cfg, tmp_path / "best", progress=False)
    assert m["kept_round"] == 2 and [r.get("kept", False) for r in m["rounds"]] == [False, True, False]
    assert "kept round 2/3" in (tmp_path / "best" / "log.txt").read_text()
    monkeypatch.setattr(runner, "pooled_auc", real)
    two = run_federate(fed_config(federated={"strategy": "fedavg", "rounds": 2}), tmp_path / "two", progress=False)
    three = run_federate(fed_config(federated={"strategy": "fedavg", "rounds": 3}), tmp_path / "three",
                         progress=False)
    digest = {name: json.loads((tmp_path / name / "adapters" / "client-0" / "privrec.json").read_text())
              ["tensors_sha256"] for name in ("best", "two", "three")}
    assert digest["best"] == digest["two"] != digest["three"]
    assert m["auc"] == two["auc"] != three["auc"] and three["kept_round"] == 3


@pytest.mark.parametrize("federated,match", [
    ({"strategy": "mixture", "keep": "best-valid"}, "mixture client retrains alone"),
    ({"strategy": "fedavg", "keep": "best-valid", "valid_every_round": False}, "valid_every_round"),
])
def test_keep_best_valid_is_refused_where_a_forget_could_not_choose_again(federated, match):
    from privrec.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        fed_config(federated=federated)


@pytest.mark.parametrize("argv,match", [
    (["--set", "federated.clients=400"], "users"),
    (["--set", "federated.split.client_first=2"], "no layer for the server"),
    (["--runner", "flower", "--set", "federated.strategy=centralised"], "in-process"),
    (["--set", "federated.rounds=0"], "federated.rounds"),
])
def test_cli_federate_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, match):
    code = main(["--no-progress", "federate", TINY_FED, "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
