"""Client-local data: `privrec federate-split-data` writes one folder per client of federate's own partition,
each holding only its users' rows, from which a node rebuilds exactly its client's samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fed_helpers import fed_config, restore_threads  # noqa: F401 (autouse fixture)

from privrec.cli import main
from privrec.data import load_dataset
from privrec.errors import DataError, UserError
from privrec.federated.client import Predictions, split_metrics
from privrec.federated.client_data import client_folders, load_client_data, split_data
from privrec.federated.runner import overall_from_clients, plan_federation, summarise

ROOT = Path(__file__).resolve().parents[1]
TINY_FED = str(ROOT / "configs" / "pplr-tiny.yaml")


def _user_rows(path: Path, header: int) -> dict[int, list[bytes]]:
    rows: dict[int, list[bytes]] = {}
    for line in path.read_bytes().splitlines()[header:]:
        rows.setdefault(int(line.split(b"\t", 1)[0]), []).append(line)
    return rows


@pytest.mark.parametrize("sections", [
    {},  # all-users protocol, random partition (fed_config's)
    {"data": {"protocol": "tallrec", "n_train": 64, "n_valid": 32, "n_test": 48},  # the global time cut
     "federated": {"partition": "kmeans", "mf_epochs": 5}},
    {"task": "ranking", "data": {"protocol": "tallrec", "n_train": 30, "n_valid": 9, "n_test": 15}},
], ids=["all-users-random", "tallrec-kmeans", "ranking"])
def test_split_data_is_federates_partition_and_each_folder_only_its_users(tmp_path, sections):
    from privrec.assets import fetch_movielens

    task = sections.pop("task", None)
    cfg = fed_config(**sections)
    if task:
        cfg = cfg.model_copy(update={"task": task})
    fed = plan_federation(cfg)
    content = split_data(cfg, tmp_path / "split")
    assert {int(u): c for u, c in content["assignment"].items()} == fed.assignment
    saved = json.loads((tmp_path / "split" / "assignment.json").read_text())
    assert saved["assignment"] == content["assignment"]
    src = fetch_movielens()
    source_rows = _user_rows(src / "ml-100k.inter", 1)
    seen_users: set[int] = set()
    for c in fed.clients:
        folder = tmp_path / "split" / f"client-{c}"
        users = {u for u, cc in fed.assignment.items() if cc == c}
        rows = _user_rows(folder / "ml-100k.inter", 1)
        assert set(rows) == users  # its users' interactions, every one of them, and nobody else's
        assert all(rows[u] == source_rows[u] for u in users)
        assert set(_user_rows(folder / "ml-100k.user", 1)) == users
        assert (folder / "ml-100k.item").read_bytes() == (src / "ml-100k.item").read_bytes()  # the catalogue
        assert not (folder / "assignment.json").exists()  # the operator's file stays out of the folders
        # the folder is a data.path its source reads, and a node rebuilds exactly its client's samples
        assert set(load_dataset("ml-100k", str(folder)).users) == users
        data = load_client_data(folder, cfg)
        assert data.client == c and (data.train, data.valid, data.test) == fed.samples(c)
        seen_users |= users
    assert seen_users == set(fed.assignment)
    assert sorted(client_folders(tmp_path / "split", cfg)) == list(fed.clients)


def test_split_data_refuses_what_it_cannot_use(tmp_path):
    cfg = fed_config()
    split_data(cfg, tmp_path / "split")
    with pytest.raises(UserError, match="exists and is not empty"):
        split_data(cfg, tmp_path / "split")
    other = fed_config(federated={"clients": 2})
    for bad in (tmp_path / "split", tmp_path / "split" / "client-0"):
        with pytest.raises(DataError, match="split for another config"):
            (client_folders if bad.name == "split" else load_client_data)(bad, other)
    with pytest.raises(DataError, match="client data folder not found"):
        load_client_data(tmp_path / "missing", cfg)
    with pytest.raises(DataError, match="not a client folder"):
        load_client_data(tmp_path, cfg)
    with pytest.raises(DataError, match="not a folder written by privrec federate-split-data"):
        client_folders(tmp_path / "split" / "client-0", cfg)
    # a folder whose interactions lost a user's rows cannot give its samples
    folder = tmp_path / "split" / "client-1"
    lines = (folder / "ml-100k.inter").read_bytes().splitlines(keepends=True)
    first = lines[1].split(b"\t", 1)[0]
    (folder / "ml-100k.inter").write_bytes(b"".join(x for x in lines if x.split(b"\t", 1)[0] != first))
    with pytest.raises(DataError, match="give no sample u"):
        load_client_data(folder, cfg)


def test_cli_split_data_then_flower_bad_folders_are_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["--no-progress", "federate-split-data", TINY_FED, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "client 2:" in printed and "assignment.json" in printed
    cases = [
        (["federate-split-data", TINY_FED, "--out", str(out)], "not empty"),
        (["federate", TINY_FED, "--out", str(tmp_path / "r"), "--runner", "flower", "--client-data",
          str(tmp_path / "nope")], "client data folder not found"),
        (["federate", TINY_FED, "--out", str(tmp_path / "r"), "--runner", "flower", "--client-data", str(out),
          "--set", "seed=1"], "split for another config"),
        (["federate", TINY_FED, "--out", str(tmp_path / "r"), "--client-data", str(out)], "--runner flower"),
    ]
    for argv, match in cases:
        code = main(["--no-progress", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and match in err[0], (argv, err)
    assert not (tmp_path / "r").exists()


def test_overall_from_client_metrics_is_exact_where_the_means_decompose():
    """LogLoss, accuracy, UAUC and HR/NDCG from per-client metrics equal the pooled values; AUC is the
    sample-weighted mean of the client AUCs."""
    rng = np.random.default_rng(0)
    preds = {}
    for c, users in enumerate([range(0, 5), range(5, 12), range(12, 15)]):
        u = np.repeat(np.array(list(users)), 4)  # 4 candidates per user, the first one the true item
        labels = np.tile([1.0, 0, 0, 0], len(users))
        preds[c] = Predictions(rng.random(len(u)), labels, u)
    pooled = Predictions(*(np.concatenate([getattr(p, k) for p in preds.values()]) for k in ("probs", "labels",
                                                                                             "users")))
    want = split_metrics(pooled, ranked=True)
    rows = [split_metrics(p, ranked=True) for p in preds.values()]
    got = overall_from_clients(rows, ranked=True)
    for k in ("logloss", "accuracy", "positive_rate", "uauc", "hr@1", "hr@5", "ndcg@3", "ndcg@10"):
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    assert got["n"] == want["n"] == 60
    assert got["auc"] == pytest.approx(sum(r["auc"] * r["n"] for r in rows) / 60, rel=1e-12)
    assert got["auc"] != pytest.approx(want["auc"], abs=1e-6)


def test_summarise_without_scores_labels_its_overall(tmp_path):
    from privrec.federated.client import ClientMetrics

    cfg = fed_config()
    fed = plan_federation(cfg)
    rng = np.random.default_rng(1)
    preds = {}
    for c in fed.clients:
        te = fed.samples(c)[2]
        preds[c] = Predictions(rng.random(len(te)), np.array([s.label for s in te], float),
                               np.array([s.user_id for s in te]))
    pooled = summarise(fed, preds)
    only = summarise(fed, {c: ClientMetrics(split_metrics(p)) for c, p in preds.items()})
    assert pooled["overall_kind"] == "pooled" and only["overall_kind"] == "client-weighted"
    assert only["clients"] == pooled["clients"] and only["balance"] == pooled["balance"]
    assert only["overall"]["logloss"] == pytest.approx(pooled["overall"]["logloss"], rel=1e-12)
