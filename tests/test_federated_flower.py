"""The Flower app (flwr 1.41 Message API) runs the same federation as the in-process runner, every node reading
its own client folder, and no user id or sample crosses from the server to a client."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from fed_helpers import fed_config, restore_threads  # noqa: F401 (autouse fixture)

from privrec.errors import RunError, UserError

os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
pytest.importorskip("flwr")

# what a server -> client ConfigRecord may hold: the run's config, the client index, the round's instructions,
# the split to score
CONFIG_KEYS = {"yaml", "client", "round", "seed", "mu", "lr_scale", "split", "mixture"}


def _comparable(m: dict) -> dict:
    keep = {k: m[k] for k in ("overall", "clients", "balance", "failures", "n_train", "n_test",
                              "client_parameters", "server_parameters")}
    keep["rounds"] = [{k: r[k] for k in ("round", "mean_train_loss", "client_loss", "valid_auc", "failed",
                                         "samples_seen", "bytes")} for r in m["rounds"]]
    return json.loads(json.dumps(keep))  # the JSON view, as metrics.json holds it


def _lora_shapes(cfg) -> dict[str, tuple]:
    from privrec.federated.runner import build_model, plan_federation
    from privrec.model.adapters import adapter_state

    model = build_model(cfg, plan_federation(cfg).splits)
    return {k: tuple(v.shape) for k, v in adapter_state(model.model).items()}


def server_to_client_problems(messages, cfg, lora: dict[str, tuple]) -> list[str]:
    """Everything in recorded server -> client messages that could carry a user id or a sample: a record other
    than the LoRA state (exactly the adapter's tensor names and shapes) and a ConfigRecord of scalars (the
    config itself, client index, round, seed, FedProx mu, learning-rate scale, split name)."""
    from flwr.app import ArrayRecord, ConfigRecord

    problems = []
    for m in messages:
        kind = m.metadata.message_type
        for name, rec in m.content.items():
            if isinstance(rec, ArrayRecord):
                shapes = {k: tuple(a.shape) for k, a in zip(rec.keys(), rec.to_numpy_ndarrays())}
                every = {f"c{c}/{k}": v for c in range(cfg.federated.clients) for k, v in lora.items()}
                if name != "adapter" or (shapes != lora and not (rec_is_mixture(m) and shapes == every)):
                    problems.append(f"{kind}: array record {name!r} is not the LoRA state")
            elif isinstance(rec, ConfigRecord):
                if set(rec) - CONFIG_KEYS:
                    problems.append(f"{kind}: config keys {sorted(set(rec) - CONFIG_KEYS)}")
                problems += [f"{kind}: {k} is a list" for k, v in rec.items() if isinstance(v, list)]
                if rec.get("yaml", cfg.to_yaml()) != cfg.to_yaml():
                    problems.append(f"{kind}: yaml is not the run's config")
                if rec.get("split", "test") not in ("valid", "test"):
                    problems.append(f"{kind}: split {rec['split']!r}")
                if not 0 <= int(rec.get("client", 0)) < cfg.federated.clients:
                    problems.append(f"{kind}: client {rec['client']}")
            else:
                problems.append(f"{kind}: a {type(rec).__name__} {name!r}")
    return problems


def rec_is_mixture(m) -> bool:
    """A strategy-mixture evaluation: it carries every client's adapter (METHODS §10), nothing else."""
    return m.metadata.message_type == "evaluate" and bool(m.content["config"].get("mixture", False))


def test_flower_simulation_gives_the_in_process_metrics(tmp_path, monkeypatch):
    """With pooled scores on, the simulation (each virtual node on its own split folder) gives the in-process
    metrics and bit-identical adapters; the server sent no user id and no sample."""
    from privrec.federated.flower_app import run_flower_simulation
    from privrec.federated.runner import run_federate
    from privrec.model.adapters import read_adapter

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    cfg = fed_config(federated={"clients": 3, "rounds": 2, "strategy": "pplr", "pooled_scores": True})
    local = run_federate(cfg, tmp_path / "in-process", progress=False)
    sent: list = []
    flower = run_flower_simulation(cfg, tmp_path / "flower", record=sent)
    assert flower["runner"] == "flower" and local["runner"] == "in-process"
    assert _comparable(flower) == _comparable(local)
    for c in range(3):
        _, ma = read_adapter(tmp_path / "in-process" / "adapters" / f"client-{c}")
        _, mb = read_adapter(tmp_path / "flower" / "adapters" / f"client-{c}")
        assert ma["tensors_sha256"] == mb["tensors_sha256"]  # bit-identical adapters
    # 3 queries, then per round 3 train + 3 evaluate(valid), then 3 evaluate(test)
    assert [m.metadata.message_type for m in sent].count("train") == 6 and len(sent) == 3 + 2 * 6 + 3
    assert server_to_client_problems(sent, cfg, _lora_shapes(cfg)) == []


@pytest.mark.parametrize("federated,match", [
    ({"strategy": "centralised"}, "in-process"),
    ({"split": {"client_first": 1, "client_last": 1}}, "in-process only"),
])
def test_flower_app_refuses_what_it_cannot_run(federated, match):
    from privrec.federated.flower_app import check_flower_config

    with pytest.raises(UserError, match=match):
        check_flower_config(fed_config(federated=federated))


class _FakeGrid:
    """A Grid that hands each message to a ClientApp in this process (no Ray), one node per data folder (a
    deployed SuperNode's ``--node-config data=...``), turning a raised exception into the error reply a
    SuperNode sends; ``crash`` names a node whose training raises. Replies are kept in ``replies``."""

    def __init__(self, folders, crash: int | None = None):
        from flwr.app import Context, RecordDict

        from privrec.federated.flower_app import make_client_app

        self.app = make_client_app()  # a deployed ClientApp: no simulation data root
        self.nodes = list(range(10, 10 + len(folders)))
        self.ctx = {nd: Context(run_id=1, node_id=nd, node_config={"data": str(f)}, state=RecordDict(),
                                run_config={}) for nd, f in zip(self.nodes, folders)}
        self.crash, self.replies = crash, []

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        out = []
        for m in messages:
            nd = m.metadata.dst_node_id
            try:
                if nd == self.crash and m.metadata.message_type == "train":
                    raise RuntimeError(f"disk full on node {nd}")
                out.append(self.app(m, self.ctx[nd]))
            except Exception as e:  # noqa: BLE001 - what a SuperNode does with a ClientApp exception
                out.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m))
        self.replies += out
        return out


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _run_on(grid, cfg, out, sent=None):
    from privrec.federated.flower_app import FlowerDispatcher
    from privrec.federated.runner import run_federate

    return run_federate(cfg, out, progress=False, runner="flower", make_dispatcher=lambda fed, model, strategy:
                        FlowerDispatcher(grid, fed, timeout=5, record=sent))


def _split(cfg, out):
    from privrec.federated.client_data import split_data

    split_data(cfg, out)
    return [out / f"client-{c}" for c in range(cfg.federated.clients)]


def test_a_failing_flower_client_is_left_out_of_the_round(tmp_path, task_identity):
    cfg = fed_config(federated={"clients": 3, "rounds": 2})
    m = _run_on(_FakeGrid(_split(cfg, tmp_path / "split"), crash=12), cfg, tmp_path / "run")
    assert [(f["round"], f["client"]) for f in m["failures"]] == [(1, 2), (2, 2)]
    assert "disk full on node 12" in m["failures"][0]["error"]
    assert all(r["failed"] == [2] and sorted(r["client_loss"]) == ["0", "1"] for r in m["rounds"])
    assert len(m["clients"]) == 3  # it still scores with the adapter it holds


def test_client_local_protocol_sends_no_user_and_replies_only_client_metrics(tmp_path, task_identity):
    """The deployment protocol with per-client evaluation (the default): nodes hold only their folders' users,
    the server sends them no user id and no sample, evaluation replies carry no per-sample score, and
    metrics.json's overall is what those replies allow (exact where a mean decomposes over clients)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from privrec.federated import flower_app
    from privrec.federated.client_data import load_client_data
    from privrec.federated.runner import plan_federation, run_federate

    # whole users drawn for valid / test (3 samples each), so that UAUC is defined
    cfg = fed_config(data={"eval_draw": "users"}, federated={"clients": 3, "rounds": 2, "strategy": "fedavg"})
    assert cfg.federated.pooled_scores is False  # the default
    folders = _split(cfg, tmp_path / "split")
    grid, sent = _FakeGrid(folders[::-1]), []  # node 10 holds client 2's folder: the server learns it by query
    m = _run_on(grid, cfg, tmp_path / "flower", sent)
    local = run_federate(cfg, tmp_path / "in-process", progress=False)

    lora = _lora_shapes(cfg)
    assert server_to_client_problems(sent, cfg, lora) == []
    # the checker does flag what the old simulation protocol sent (the users of each client)
    old = Message(RecordDict({"config": ConfigRecord({"yaml": cfg.to_yaml(), "client": 0, "users": [1, 2]})}),
                  dst_node_id=10, message_type="train")
    assert server_to_client_problems([old], cfg, lora) == ["train: config keys ['users']", "train: users is a list"]
    assert {msg.metadata.dst_node_id: msg.content["config"]["client"] for msg in sent
            if "config" in msg.content} == {10: 2, 11: 1, 12: 0}

    # each node's client holds exactly its own users' samples, built from its own folder
    fed = plan_federation(cfg)
    held = {c.cid: c for (_, folder, _), c in flower_app._CLIENTS.items() if folder in folders}
    assert sorted(held) == [0, 1, 2]
    for c, client in held.items():
        users = {u for u, cc in fed.assignment.items() if cc == c}
        assert [client.samples[k] for k in ("train", "valid", "test")] == list(fed.samples(c))
        data = load_client_data(folders[c], cfg)
        assert set(data.dataset.users) == users and set(data.dataset.inter["user_id"]) == users

    # evaluation replies: the client's metrics, scalars only; no P(Yes), label or user id per sample
    evals = [r for r in grid.replies if r.metadata.message_type == "evaluate"]
    assert len(evals) == 3 * 3  # valid after 2 rounds + test, 3 clients
    for r in evals:
        assert list(r.content.keys()) == ["metrics"]
        assert all(isinstance(v, (int, float)) for v in r.content["metrics"].values())
        assert {"probs", "labels", "users"}.isdisjoint(r.content["metrics"])

    # per client the same metrics as in-process; overall: exact for the means, AUC the weighted client mean
    assert m["overall_kind"] == "client-weighted" and local["overall_kind"] == "pooled"
    assert len(m["clients"]) == len(local["clients"]) == 3
    for a, b in zip(m["clients"], local["clients"]):
        assert a == pytest.approx(b, rel=1e-9)
    for k in ("logloss", "accuracy", "uauc", "positive_rate", "n"):
        assert np.isfinite(local["overall"][k]) and m["overall"][k] == pytest.approx(local["overall"][k], rel=1e-9), k
    rows = local["clients"]
    weighted = sum(r["auc"] * r["n_test"] for r in rows) / sum(r["n_test"] for r in rows)
    assert m["overall"]["auc"] == pytest.approx(weighted, rel=1e-12)
    assert m["overall"]["auc"] != pytest.approx(local["overall"]["auc"], abs=1e-6)  # not the pooled AUC
    assert np.isfinite(m["rounds"][-1]["valid_auc"])


@pytest.mark.parametrize("pooled,features", [(True, False), (False, False), (True, True)],
                         ids=["pooled", "client-metrics", "pooled-counted-features"])
def test_mixture_on_flower_gives_the_in_process_metrics(tmp_path, task_identity, pooled, features):
    """Strategy mixture on Flower: every node trains alone (no adapter travels in training), the test
    evaluation sends each node every client's adapter and nothing else, and the node weighs them on its own
    validation samples: the in-process metrics (per client exactly; overall pooled, or the client-weighted
    mean without pooled scores) and bit-identical adapters. With counted features (METHODS §12) each node
    counts them over its own folder's share of the pool, as the in-process client does."""
    from privrec.federated.runner import run_federate
    from privrec.model.adapters import read_adapter

    extra = {"prompt": {"item_stats": True}} if features else {}
    cfg = fed_config(federated={"clients": 3, "rounds": 2, "strategy": "mixture", "pooled_scores": pooled}, **extra)
    sent: list = []
    m = _run_on(_FakeGrid(_split(cfg, tmp_path / "split")), cfg, tmp_path / "flower", sent)
    local = run_federate(cfg, tmp_path / "in-process", progress=False)
    assert server_to_client_problems(sent, cfg, _lora_shapes(cfg)) == []
    assert sum(rec_is_mixture(x) for x in sent) == 3
    for a, b in zip(m["clients"], local["clients"]):
        assert a == pytest.approx(b, rel=1e-9, nan_ok=True)
    assert all("mixture_own_weight" in c for c in m["clients"])
    if pooled:
        assert m["overall"] == pytest.approx(local["overall"], rel=1e-9, nan_ok=True)
    for c in range(3):
        flower_meta = read_adapter(tmp_path / "flower" / "adapters" / f"client-{c}")[1]
        local_meta = read_adapter(tmp_path / "in-process" / "adapters" / f"client-{c}")[1]
        assert flower_meta["tensors_sha256"] == local_meta["tensors_sha256"]
        assert flower_meta.get("features") == local_meta.get("features")
    if features:
        from privrec.federated import flower_app
        from privrec.federated.runner import plan_federation

        fed = plan_federation(cfg)
        held = {c.cid: c for c in flower_app._CLIENTS.values()}
        for c, client in held.items():
            assert client.counted == fed.counted(c)  # from its folder alone, as the run counts it
            assert {s.user_id for s in client.counted} <= {u for u, cc in fed.assignment.items() if cc == c}


@pytest.mark.parametrize("slices", [1, 2])
def test_a_deletion_reaches_only_the_node_that_holds_the_user(tmp_path, task_identity, slices):
    """privrec forget on a mixture model deployed on Flower: the nodes are asked which client they are (no user
    id), then one message, to the node holding the user, names the user; that node retrains its client alone
    and the model gets the adapter an in-process forget gives (bit-identical), certified and verified. With
    ``federated.slices`` the node cuts its slices from its own samples, replays from the checkpoint the server
    sent (a user of the last slice: the last round only) and returns the replayed checkpoints."""
    import shutil

    from privrec import models
    from privrec.commands.forget import run_forget, run_verify
    from privrec.federated.flower_app import FORGET, flower_retrain
    from privrec.model.adapters import read_meta

    cfg = fed_config(federated={"clients": 3, "rounds": 2, "strategy": "mixture", "slices": slices})
    grid = _FakeGrid(_split(cfg, tmp_path / "split"))
    _run_on(grid, cfg, tmp_path / "flower")
    shutil.copytree(tmp_path / "flower", tmp_path / "here")
    manifest = models.load(tmp_path / "flower")
    user = next(u for u, c in sorted(manifest.clients.items()) if c == 1)
    if slices > 1:  # a user of client 1's last slice
        user = int(read_meta(tmp_path / "flower" / "adapters" / "client-1")["slices"][-1][0].split("-")[0][1:])

    sent: list = []
    grid.replies.clear()
    cert = run_forget(tmp_path / "flower", users=[user], progress=False,
                      remote=flower_retrain(grid, cfg, dict(manifest.clients), timeout=5, record=sent))
    here = run_forget(tmp_path / "here", users=[user], progress=False)
    assert cert["body"]["affected_shards"] == [1] and cert["body"]["lineage_check"]["passed"]
    assert cert["body"]["adapters"] == here["body"]["adapters"]  # the node's retrain is the in-process one
    assert run_verify(tmp_path / "flower")["ok"]

    kinds = [(m.metadata.message_type, m.metadata.dst_node_id) for m in sent]
    node_of_1 = {m.metadata.dst_node_id for m in sent if m.metadata.message_type == FORGET}
    assert kinds.count((FORGET, next(iter(node_of_1)))) == 1 and len(node_of_1) == 1
    assert all(t == "query" for t, _ in kinds if t != FORGET)  # the other nodes only say who they are
    assert all(not m.content for m in sent if m.metadata.message_type == "query")
    forget_msg = next(m for m in sent if m.metadata.message_type == FORGET)
    assert list(forget_msg.content["config"]["users"]) == [user] and forget_msg.content["config"]["client"] == 1
    assert forget_msg.content["config"]["first"] == slices - 1  # the round it replays from
    assert sorted(p.relative_to(tmp_path / "flower") for p in (tmp_path / "flower").rglob("*.safetensors")) == \
        sorted(p.relative_to(tmp_path / "here") for p in (tmp_path / "here").rglob("*.safetensors"))
    for p in (tmp_path / "here" / "slices").rglob("*.safetensors"):  # the checkpoints, bit-identical
        assert (tmp_path / "flower" / p.relative_to(tmp_path / "here")).read_bytes() == p.read_bytes()


def test_a_node_without_its_data_stops_the_run_with_one_line(tmp_path, task_identity):
    """The server learns which node is which client from the nodes' own folders, and stops on one that
    cannot serve: a missing folder, one split for another config, two nodes with the same client."""
    from flwr.app import Context, RecordDict

    from privrec.federated.client_data import split_data
    from privrec.federated.flower_app import FlowerDispatcher, node_folder
    from privrec.federated.runner import plan_federation

    cfg = fed_config(federated={"clients": 3, "rounds": 1})
    fed = plan_federation(cfg)
    folders = _split(cfg, tmp_path / "split")
    assert FlowerDispatcher(_FakeGrid(folders[::-1]), fed, timeout=5).node_of == {0: 12, 1: 11, 2: 10}
    split_data(fed_config(data={"sample_seed": 1}, federated={"clients": 3}), tmp_path / "other")
    for nodes, match in [
        ([folders[0], tmp_path / "nope", folders[2]], "Flower node 11: DataError: client data folder not found"),
        ([folders[0], folders[1], tmp_path / "other" / "client-2"], "node 12's data folder was split for another"),
        ([folders[0], folders[0], folders[2]], "Flower nodes 10 and 11 both hold client 0's data"),
    ]:
        with pytest.raises(RunError, match=match) as e:
            FlowerDispatcher(_FakeGrid(nodes), fed, timeout=5)
        assert "\n" not in str(e.value)
    bare = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(UserError, match="no data folder: start it with --node-config"):
        node_folder(bare)


def test_a_pplr_retrain_on_flower_tells_only_the_holding_node_what_was_deleted(tmp_path, task_identity):
    """privrec forget --retrain-federation on a PPLR model deployed on Flower: the whole federation trains again
    on the nodes; the deleted interactions travel only in the messages to the node that held them (``drop``),
    every other node is sent exactly what a federate run sends it (no user id, no sample); the adapters are
    those of the in-process federated retrain (bit-identical), certified and verified."""
    import shutil

    from privrec import models
    from privrec.commands.forget import run_forget, run_verify
    from privrec.federated.flower_app import flower_retrain

    cfg = fed_config(federated={"clients": 3, "rounds": 2, "strategy": "pplr"})
    grid = _FakeGrid(_split(cfg, tmp_path / "split"))
    _run_on(grid, cfg, tmp_path / "flower")
    shutil.copytree(tmp_path / "flower", tmp_path / "here")
    manifest = models.load(tmp_path / "flower")
    user = next(u for u, c in sorted(manifest.clients.items()) if c == 1)

    sent: list = []
    with pytest.raises(UserError, match="--retrain-federation"):  # still asked for by name
        run_forget(tmp_path / "flower", users=[user], progress=False,
                   remote=flower_retrain(grid, cfg, dict(manifest.clients), timeout=5))
    cert = run_forget(tmp_path / "flower", users=[user], progress=False, retrain_federation=True,
                      remote=flower_retrain(grid, cfg, dict(manifest.clients), timeout=5, record=sent))
    here = run_forget(tmp_path / "here", users=[user], progress=False, retrain_federation=True)
    assert cert["body"]["affected_shards"] == [0, 1, 2] and cert["body"]["lineage_check"]["passed"]
    assert cert["body"]["adapters"] == here["body"]["adapters"]  # the nodes' retrain is the in-process one
    assert run_verify(tmp_path / "flower")["ok"]

    node_of_1 = next(m.metadata.dst_node_id for m in sent if m.content and "config" in m.content
                     and m.content["config"]["client"] == 1)
    carrying = [m for m in sent if "config" in m.content and "drop" in m.content["config"]]
    assert carrying and {m.metadata.dst_node_id for m in carrying} == {node_of_1}
    flat = list(carrying[0].content["config"]["drop"])
    assert set(flat[::2]) == {user} and len(flat) // 2 == len([i for u, i in manifest_interactions(cfg, user)])
    others = [m for m in sent if m.metadata.dst_node_id != node_of_1]
    assert others and server_to_client_problems(others, cfg, _lora_shapes(cfg)) == []
    assert {m.metadata.message_type for m in sent} >= {"query", "train", "evaluate"}


def manifest_interactions(cfg, user: int) -> list[tuple[int, int]]:
    from privrec.federated.runner import plan_federation
    from privrec.unlearning.exact.forget import resolve_interactions

    return [(u, i) for u, i, _ in resolve_interactions(plan_federation(cfg).splits.dataset, [user])]
