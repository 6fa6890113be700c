"""The Flower app (flwr 1.41 Message API) runs the same federation as the in-process runner."""

from __future__ import annotations

import json
import os

import pytest
from fed_helpers import fed_config, restore_threads  # noqa: F401 (autouse fixture)

from privrec.errors import UserError

os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _comparable(m: dict) -> dict:
    keep = {k: m[k] for k in ("overall", "clients", "balance", "failures", "n_train", "n_test",
                              "client_parameters", "server_parameters")}
    keep["rounds"] = [{k: r[k] for k in ("round", "mean_train_loss", "client_loss", "valid_auc", "failed",
                                         "samples_seen", "bytes")} for r in m["rounds"]]
    return json.loads(json.dumps(keep))  # the JSON view, as metrics.json holds it


def test_flower_simulation_gives_the_in_process_metrics(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    from privrec.federated.flower_app import run_flower_simulation
    from privrec.federated.runner import run_federate
    from privrec.model.adapters import read_adapter

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    cfg = fed_config(federated={"clients": 3, "rounds": 2, "strategy": "pplr"})  # 3 clients x 2 rounds
    local = run_federate(cfg, tmp_path / "in-process", progress=False)
    flower = run_flower_simulation(cfg, tmp_path / "flower")
    assert flower["runner"] == "flower" and local["runner"] == "in-process"
    assert _comparable(flower) == _comparable(local)
    for c in range(3):
        _, ma = read_adapter(tmp_path / "in-process" / "adapters" / f"client-{c}")
        _, mb = read_adapter(tmp_path / "flower" / "adapters" / f"client-{c}")
        assert ma["tensors_sha256"] == mb["tensors_sha256"]  # bit-identical adapters


@pytest.mark.parametrize("federated,match", [
    ({"strategy": "centralised"}, "in-process"),
    ({"split": {"client_first": 1, "client_last": 1}}, "in-process only"),
])
def test_flower_app_refuses_what_it_cannot_run(federated, match):
    from privrec.federated.flower_app import check_flower_config

    with pytest.raises(UserError, match=match):
        check_flower_config(fed_config(federated=federated))


class _FakeGrid:
    """A Grid that hands each message to the ClientApp in this process (no Ray), turning a raised exception
    into the error reply a SuperNode sends; node 12 is a client whose training crashes."""

    def __init__(self, n):
        from flwr.app import Context, RecordDict

        from privrec.federated.flower_app import make_client_app

        self.app = make_client_app()
        self.nodes = list(range(10, 10 + n))
        self.ctx = {nd: Context(run_id=1, node_id=nd, node_config={"partition-id": nd - 10}, state=RecordDict(),
                                run_config={}) for nd in self.nodes}

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error, Message

        out = []
        for m in messages:
            nd = m.metadata.dst_node_id
            try:
                if nd == 12 and m.metadata.message_type == "train":
                    raise RuntimeError("disk full on node 12")
                out.append(self.app(m, self.ctx[nd]))
            except Exception as e:  # noqa: BLE001 - what a SuperNode does with a ClientApp exception
                out.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m))
        return out


def test_a_failing_flower_client_is_left_out_of_the_round(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, attr, 1)
    from privrec.federated.flower_app import FlowerDispatcher
    from privrec.federated.runner import run_federate

    cfg = fed_config(federated={"clients": 3, "rounds": 2})
    m = run_federate(cfg, tmp_path / "run", progress=False, runner="flower",
                     make_dispatcher=lambda fed, model, strategy: FlowerDispatcher(_FakeGrid(3), fed, timeout=5))
    assert [(f["round"], f["client"]) for f in m["failures"]] == [(1, 2), (2, 2)]
    assert "disk full on node 12" in m["failures"][0]["error"]
    assert all(r["failed"] == [2] and sorted(r["client_loss"]) == ["0", "1"] for r in m["rounds"])
    assert len(m["clients"]) == 3  # it still scores with the adapter it holds
