"""The model-directory manifest (privrec.models): every training command writes one, it is validated on load,
and directories written before it existed are read by inferring it from their files, or refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from privrec import models
from privrec.cli import main
from privrec.config import load_config
from privrec.data import build_splits
from privrec.errors import RunError
from privrec.federated.config import FederatedConfig
from privrec.model.adapters import lineage_of, read_meta
from privrec.unlearning.exact.shards import ApaConfig

ROOT = Path(__file__).resolve().parents[1]
TINY, APA_TINY, PPLR_TINY = (str(ROOT / "configs" / n) for n in ("tiny.yaml", "apa-tiny.yaml", "pplr-tiny.yaml"))
FAST = ["--set", "train.epochs=1", "--set", "model.precision=fp32"]


def train(*argv) -> None:
    assert main(["--no-progress", *argv]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One model directory of every kind, written by the commands themselves."""
    d = tmp_path_factory.mktemp("models")
    train("train", TINY, "--out", str(d / "single"), *FAST, "--set", "eval.zero_shot=false")
    train("shard-train", APA_TINY, "--out", str(d / "shards"), "--set", "model.precision=fp32")
    train("federate", PPLR_TINY, "--out", str(d / "clients"), *FAST, "--set", "federated.rounds=1")
    train("unlearn", str(d / "single"), "--method", "original", "--forget-fraction", "0.2", "--out",
          str(d / "student"), "--set", "unlearn.mia.max_samples=16")
    return d


def test_every_training_command_writes_its_kind_with_lineage(runs, ml100k):
    single, shards, clients, student = (models.load(runs / k) for k in ("single", "shards", "clients", "student"))
    assert (single.kind, shards.kind, clients.kind, student.kind) == ("single", "shards", "clients", "student")
    assert (runs / "single" / "model.json").is_file() and not single.inferred

    train_samples = build_splits(ml100k, load_config(TINY).data, 0).train
    [a] = single.adapters
    assert a.path == "adapters/default" and a.sample_ids == sorted(s.sample_id for s in train_samples)
    assert a.lineage_sha256 == lineage_of(train_samples)
    assert a.tensors_sha256 == read_meta(runs / "single" / a.path)["tensors_sha256"]
    assert single.forget == ["retrain-all", "approximate"] and single.command == "train"

    assert [x.name for x in shards.adapters] == [f"shard-{k}" for k in range(4)]
    assert shards.forget == ["retrain-shards"] and shards.primary == "apa-nd"
    assert shards.aggregations == ["uniform", "apa-d", "apa-nd", "sisa"] and shards.partition == "semantic"
    by_id = {s.sample_id: s for s in build_splits(ml100k, load_config(APA_TINY, cls=ApaConfig).data, 0).train}
    ids = [i for x in shards.adapters for i in x.sample_ids]
    assert sorted(ids) == sorted(by_id)  # every training sample in exactly one shard
    assert all(x.lineage_sha256 == lineage_of([by_id[i] for i in x.sample_ids]) for x in shards.adapters)

    fed = build_splits(ml100k, load_config(PPLR_TINY, cls=FederatedConfig).data, 0)
    assert [x.name for x in clients.adapters] == ["client-0", "client-1", "client-2"]
    assert clients.strategy == "pplr" and clients.scoring == "client-of-user"
    assert clients.forget == ["retrain-federation"] and clients.strategy_allows == ["retrain-federation"]
    assert set(clients.clients) == {s.user_id for s in fed.train + fed.valid + fed.test}
    assert set(clients.clients.values()) == {0, 1, 2}
    assert all(x.lineage_sha256 == lineage_of(fed.train) for x in clients.adapters)  # PPLR mixes everyone

    assert student.method == "original" and not student.exact and student.forget == []
    assert student.original == str(runs / "single") and student.forgotten_users
    assert student.adapters[0].sample_ids == a.sample_ids  # approximate: the original's samples reached it


@pytest.mark.parametrize("case", ["not-json", "other-file", "newer-version", "missing-field", "unknown-kind",
                                  "unknown-key", "bad-forgetting"])
def test_a_bad_manifest_is_refused_in_one_line(runs, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(runs / "single", run)
    path = run / "model.json"
    m = json.loads(path.read_text())
    if case == "not-json":
        path.write_text("{not json")
    else:
        if case == "other-file":
            m = {"hello": 1}
        elif case == "newer-version":
            m["version"] = 2
        elif case == "missing-field":
            del m["adapters"]
        elif case == "unknown-kind":
            m["kind"] = "ensemble"
        elif case == "unknown-key":
            m["colour"] = "blue"
        else:
            m["forget"] = ["forget-everything"]
        path.write_text(json.dumps(m))
    with pytest.raises(RunError) as e:
        models.load(run)
    assert "model.json" in str(e.value) and "\n" not in str(e.value)
    code = main(["--no-progress", "evaluate", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "model.json" in err and "Traceback" not in err


def _ids_only_hash(ids: list[str]) -> str:
    """The lineage hash the code before the one definition wrote for train / unlearn / federate (ids only)."""
    h = hashlib.sha256()
    for sid in sorted(ids):
        h.update(sid.encode() + b"\0" + b"\n")
    return h.hexdigest()


def old_single_dir(src: Path, dst: Path) -> Path:
    """What ``privrec train`` wrote before model manifests: ``adapter/`` with an ids-only lineage hash."""
    shutil.copytree(src, dst)
    shutil.move(dst / "adapters" / "default", dst / "adapter")
    (dst / "adapters").rmdir()
    (dst / "model.json").unlink()
    meta_path = dst / "adapter" / "privrec.json"
    meta = json.loads(meta_path.read_text())
    meta["lineage_sha256"] = _ids_only_hash(meta["sample_ids"])
    meta_path.write_text(json.dumps(meta, indent=1))
    return dst


def test_an_old_train_directory_loads_by_inference(runs, tmp_path):
    old = old_single_dir(runs / "single", tmp_path / "old")
    m = models.load(old)
    assert m.kind == "single" and m.inferred and m.adapters[0].path == "adapter"
    assert m.adapters[0].sample_ids == models.load(runs / "single").adapters[0].sample_ids
    assert m.adapters[0].lineage_sha256 is None  # its ids-only hash is not the one lineage hash
    assert m.forget == []  # it cannot forget until it is trained again
    assert not (old / "model.json").exists()  # reading writes nothing


def test_an_old_shard_directory_loads_and_an_old_federate_directory_is_refused(runs, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(runs / "shards", shards)
    (shards / "model.json").unlink()
    m = models.load(shards)
    assert m.kind == "shards" and m.inferred and m.forget == ["retrain-shards"] and m.primary == "apa-nd"
    assert [a.lineage_sha256 for a in m.adapters] == [a.lineage_sha256 for a in models.load(runs / "shards").adapters]

    clients = tmp_path / "clients"
    shutil.copytree(runs / "clients", clients)
    (clients / "model.json").unlink()
    with pytest.raises(RunError, match="before model manifests"):
        models.load(clients)


def test_a_directory_without_a_model_is_refused(tmp_path, runs):
    with pytest.raises(RunError, match="not a privrec model directory"):
        models.load(tmp_path)
    with pytest.raises(RunError, match="not found"):
        models.load(tmp_path / "nope")
    half = tmp_path / "half"
    shutil.copytree(runs / "single", half)
    (half / "model.json").unlink()  # killed between saving the adapter and writing the manifest
    with pytest.raises(RunError, match="did not finish"):
        models.load(half)


def test_report_takes_every_kind(runs, capsys):
    code = main(["--no-progress", "report", *(str(runs / k) for k in ("single", "shards", "clients", "student")),
                 "--markdown"])
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if " | train" in line
            or " | shard-train" in line or " | federate" in line or " | unlearn" in line}
    assert "| single | 1 | 64 | retrain-all, approximate | train |" in rows["single"]
    assert "| shards | 4 | 64 | retrain-shards | shard-train |" in rows["shards"]
    assert "| clients | 3 | 120 | retrain-federation | federate |" in rows["clients"]
    assert "| student | 1 | 64 | - | unlearn |" in rows["student"]
    assert "| shards: apa-nd |" in out and "| clients: federated pplr |" in out  # their metrics rows too


@pytest.mark.parametrize("strategy", ["local", "mixture", "fedavg", "fedprox", "pplr", "centralised"])
def test_what_a_strategy_allows_is_what_forget_does(strategy):
    """The manifest's ``strategy_allows`` and ``forget`` agree for every strategy; the centralised reference pools
    every client's data into each adapter, so it forgets by retraining the federation (docs/lifecycle.md)."""
    assert models.strategy_allows(strategy) == models.clients_forgetting(strategy)
    want = ["retrain-client"] if strategy in ("local", "mixture") else ["retrain-federation"]
    assert models.strategy_allows(strategy) == want


def test_every_kind_is_in_the_registry():
    assert set(models.KINDS) == {"single", "shards", "clients", "student"}
    assert {k: s.trained_by for k, s in models.KINDS.items()} == {
        "single": "train", "shards": "shard-train", "clients": "federate", "student": "unlearn"}
