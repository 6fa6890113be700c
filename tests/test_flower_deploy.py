"""A real Flower deployment on loopback (flower/run_local.py): a SuperLink and one SuperNode per client folder
as separate processes, each node holding only its own folder, give the in-process metrics. Minutes (every
message starts a ClientApp process that loads the model): marked slow."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from fed_helpers import restore_threads  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TINY_FED = str(ROOT / "configs" / "pplr-tiny.yaml")


def _run_local():
    """flower/run_local.py as a module (skips where Flower's deployment binaries are missing)."""
    pytest.importorskip("flwr")
    if not (Path(sys.executable).parent / "flower-superlink").exists():
        pytest.skip("flower-superlink is not installed beside this Python")
    spec = importlib.util.spec_from_file_location("run_local", ROOT / "flower" / "run_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_superlink_and_supernodes_on_loopback_give_the_in_process_metrics(tmp_path):
    from privrec.cli import main as privrec

    run_local = _run_local()
    pooled = ["--set", "federated.pooled_scores=true"]
    assert privrec(["--no-progress", "federate", TINY_FED, "--out", str(tmp_path / "in-process"), *pooled]) == 0
    assert run_local.main([TINY_FED, "--out", str(tmp_path / "dep"), *pooled, "--port", "8300", "--timeout", "1500",
                           "--compare", str(tmp_path / "in-process")]) == 0
    m = json.loads((tmp_path / "dep" / "run" / "metrics.json").read_text())
    assert m["runner"] == "flower" and m["overall_kind"] == "pooled" and not m["failures"]
    for c in range(3):  # each node was started with its own folder only
        log = (tmp_path / "dep" / "logs" / f"supernode-{c}.log").read_text()
        assert "Receiving: train message" in log


def test_a_deletion_on_a_deployed_mixture_reaches_only_its_supernode(tmp_path):
    """A mixture federation deployed on loopback, then `flwr run` with forget-users: only the SuperNode holding
    the user receives the deletion; the certificate passes and privrec forget --verify agrees."""
    from privrec import models
    from privrec.commands.forget import run_verify
    from privrec.config import load_config
    from privrec.federated.config import FederatedConfig
    from privrec.federated.runner import plan_federation

    run_local = _run_local()
    mix = ["--set", "federated.strategy=mixture"]
    fed = plan_federation(load_config(TINY_FED, ["federated.strategy=mixture"], cls=FederatedConfig))
    user = next(s.user_id for s in fed.splits.train if fed.assignment[s.user_id] == 2)
    assert run_local.main([TINY_FED, "--out", str(tmp_path / "dep"), *mix, "--port", "8400", "--timeout", "1500",
                           "--forget-user", str(user)]) == 0
    run = tmp_path / "dep" / "run"
    [cert] = [json.loads(p.read_text()) for p in (run / "certificates").glob("*.json")]
    assert cert["body"]["affected_shards"] == [2] and cert["body"]["lineage_check"]["passed"]
    assert run_verify(run)["ok"] and models.load(run).strategy == "mixture"
    logs = {c: (tmp_path / "dep" / "logs" / f"supernode-{c}.log").read_text() for c in range(3)}
    assert "train.forget" in logs[2] and not any("train.forget" in logs[c] for c in (0, 1))


def test_a_pplr_retrain_on_a_deployment_runs_on_the_supernodes(tmp_path):
    """A PPLR federation deployed on loopback, then `flwr run` with forget-users and retrain-federation: the
    whole federation trains again on the SuperNodes (every node trains again), the certificate passes, the
    adapters are those of the in-process retrain without the user, and privrec forget --verify agrees."""
    from privrec import models
    from privrec.cli import main as privrec
    from privrec.commands.forget import run_forget, run_verify
    from privrec.config import load_config
    from privrec.federated.config import FederatedConfig
    from privrec.federated.runner import plan_federation

    run_local = _run_local()
    fed = plan_federation(load_config(TINY_FED, [], cls=FederatedConfig))
    assert fed.cfg.federated.strategy == "pplr"
    user = next(s.user_id for s in fed.splits.train if fed.assignment[s.user_id] == 1)
    assert run_local.main([TINY_FED, "--out", str(tmp_path / "dep"), "--port", "8500", "--timeout", "1500",
                           "--forget-user", str(user), "--retrain-federation"]) == 0
    run = tmp_path / "dep" / "run"
    [cert] = [json.loads(p.read_text()) for p in (run / "certificates").glob("*.json")]
    assert cert["body"]["affected_shards"] == [0, 1, 2] and cert["body"]["run"]["forget"] == "retrain-federation"
    assert cert["body"]["lineage_check"]["passed"] and run_verify(run)["ok"]
    for c in range(3):  # every node trained again: two train phases in its log
        log = (tmp_path / "dep" / "logs" / f"supernode-{c}.log").read_text()
        assert log.count("Receiving: train message") >= 2 * fed.cfg.federated.rounds

    assert privrec(["--no-progress", "federate", TINY_FED, "--out", str(tmp_path / "here")]) == 0
    here = run_forget(tmp_path / "here", users=[user], progress=False, retrain_federation=True)
    assert cert["body"]["adapters"] == here["body"]["adapters"]
    assert {a.name: a.tensors_sha256 for a in models.load(run).adapters} == \
        {a.name: a.tensors_sha256 for a in models.load(tmp_path / "here").adapters}
