"""The Flower app (flwr 1.41, Message API): a ServerApp and a ClientApp around the same classes.

The ServerApp runs :func:`privrec.federated.runner.run_federate` with a :class:`FlowerDispatcher`: the
rounds, the strategy classes, the metrics and the adapters are the in-process runner's own code; only the
transport differs. Each round the ServerApp sends every client a ``train`` message (its LoRA state as an
``ArrayRecord``, the round's instructions, the run's resolved config and, in this simulation protocol, the
ids of the users whose data the client holds); the ClientApp runs
:meth:`~privrec.federated.client.FederatedClient.fit` and replies with its new state, loss and sample
count. ``evaluate`` messages ask a client to score its own validation or test samples and reply with
P(Yes) and the labels (what the pooled overall AUC needs). A client whose ClientApp raises sends an error
reply; it is left out of that round's aggregation and the run goes on, as in-process.

- Simulation: :func:`run_flower_simulation` (``flwr.simulation.run_simulation``); ``privrec federate CONFIG
  --out DIR --runner flower``.
- Across machines: ``privrec.federated.flower_deploy:server_app`` / ``:client_app`` are what
  ``flower/pyproject.toml`` names for ``flwr run``; see docs/federated.md (SuperLink, SuperNodes, what
  crosses the network).

The executed layer split and the centralised reference run in-process only (see ``check_flower_config``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from privrec.errors import RunError, UserError
from privrec.federated.client import FederatedClient, FitResult, Predictions
from privrec.federated.config import FederatedConfig
from privrec.federated.strategies import Instructions, State, Update

TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is first imported; no usage pings


def check_flower_config(cfg: FederatedConfig) -> None:
    """Raises: UserError for settings the Flower app does not run."""
    if cfg.federated.strategy == "centralised":
        raise UserError("the centralised reference pools every client's data: run it with --runner in-process")
    if cfg.federated.split is not None:
        raise UserError("federated.split runs in-process only: the server's middle layers need a synchronous "
                        "channel inside every training step, which Flower's round messages do not provide")


# --- client side ----------------------------------------------------------------------------------------
_RUNTIME: dict[str, tuple] = {}  # per ClientApp process: config digest -> (cfg, splits, model)
_CLIENTS: dict[tuple[str, int], FederatedClient] = {}


def _runtime(cfg_yaml: str):
    """The config, samples and model of this process, built once per config (a process serves many clients)."""
    key = hashlib.sha256(cfg_yaml.encode()).hexdigest()
    if key not in _RUNTIME:
        from privrec.config import parse_config
        from privrec.federated.runner import build_model
        from privrec.prepare import setup_data

        cfg = parse_config(yaml.safe_load(cfg_yaml), FederatedConfig)
        splits = setup_data(cfg)
        _RUNTIME.clear()
        _CLIENTS.clear()
        _RUNTIME[key] = (cfg, splits, build_model(cfg, splits))
    return key, _RUNTIME[key]


def _client_for(msg) -> FederatedClient:
    conf = msg.content["config"]
    key, (cfg, splits, model) = _runtime(str(conf["yaml"]))
    cid = int(conf["client"])
    if (key, cid) not in _CLIENTS:
        users = {int(u) for u in conf["users"]}
        parts = [[s for s in part if s.user_id in users] for part in (splits.train, splits.valid, splits.test)]
        _CLIENTS[(key, cid)] = FederatedClient(cid, model, *parts, cfg, progress=False)
    return _CLIENTS[(key, cid)]


def _state_from(record) -> State:
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in zip(record.keys(), record.to_numpy_ndarrays())}


def _client_train(msg, context):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    client = _client_for(msg)
    conf = msg.content["config"]
    ins = Instructions(rnd=int(conf["round"]), seed=int(conf["seed"]), mu=float(conf["mu"]),
                       lr_scale=float(conf["lr_scale"]))
    res = client.fit(_state_from(msg.content["adapter"]), ins)
    metrics = MetricRecord({"loss": res.update.loss, "n_train": res.update.n_train, "seconds": res.seconds,
                            "samples_seen": res.samples_seen})
    return Message(RecordDict({"adapter": ArrayRecord(res.update.state), "metrics": metrics}), reply_to=msg)


def _client_evaluate(msg, context):
    from flwr.app import Message, MetricRecord, RecordDict

    client = _client_for(msg)
    p = client.predict(_state_from(msg.content["adapter"]), str(msg.content["config"]["split"]))
    rec = MetricRecord({"probs": [float(x) for x in p.probs], "labels": [int(x) for x in p.labels],
                        "users": [int(x) for x in p.users]})
    return Message(RecordDict({"predictions": rec}), reply_to=msg)


def _client_query(msg, context):
    from flwr.app import Message, MetricRecord, RecordDict

    return Message(RecordDict({"node": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}),
                   reply_to=msg)


def make_client_app():
    """A ClientApp with the three handlers; every piece of its work is :class:`FederatedClient`'s."""
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(_client_train)
    app.evaluate()(_client_evaluate)
    app.query()(_client_query)
    return app


# --- server side ----------------------------------------------------------------------------------------
class FlowerDispatcher:
    """The runner's dispatcher over a Flower ``Grid``: one message per client per request."""

    def __init__(self, grid, fed, timeout: float = 600.0):
        self.grid, self.fed, self.timeout = grid, fed, timeout
        self.cfg_yaml = fed.cfg.to_yaml()
        self.users = {c: sorted(u for u, cc in fed.assignment.items() if cc == c) for c in fed.clients}
        self.node_of = self._discover(len(fed.clients))
        self.client_of = {n: c for c, n in self.node_of.items()}

    def _discover(self, n: int) -> dict[int, int]:
        """client id -> node id, from each node's ``partition-id``.

        Raises:
            RunError: fewer nodes than clients connected within the timeout.
        """
        from flwr.app import Message, RecordDict

        deadline = time.monotonic() + self.timeout
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < n and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < n:
            raise RunError(f"only {len(nodes)} Flower nodes connected; federated.clients={n}")
        replies = self.grid.send_and_receive([Message(RecordDict(), dst_node_id=nd, message_type=QUERY)
                                              for nd in nodes], timeout=self.timeout)
        out = {}
        for r in replies:
            if not r.has_error():
                pid = int(r.content["node"]["partition-id"])
                if pid < n:
                    out[pid] = r.metadata.src_node_id
        missing = [c for c in range(n) if c not in out]
        if missing:
            raise RunError(f"no Flower node reports partition-id(s) {missing}")
        return out

    def _message(self, cid: int, kind: str, state: State, extra: dict, group: str):
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        conf = ConfigRecord({"yaml": self.cfg_yaml, "client": cid, "users": self.users[cid], **extra})
        return Message(RecordDict({"adapter": ArrayRecord(state), "config": conf}), dst_node_id=self.node_of[cid],
                       message_type=kind, group_id=group)

    def _exchange(self, messages) -> dict[int, object]:
        replies = self.grid.send_and_receive(messages, timeout=self.timeout)
        return {self.client_of[r.metadata.src_node_id]: r for r in replies}

    def fit(self, rnd: int, tasks: dict[int, tuple[State, Instructions]]) -> dict[int, FitResult | str]:
        msgs = [self._message(c, TRAIN, st, {"round": ins.rnd, "seed": ins.seed, "mu": float(ins.mu),
                                              "lr_scale": float(ins.lr_scale)}, str(rnd))
                for c, (st, ins) in sorted(tasks.items())]
        replies = self._exchange(msgs)
        out: dict[int, FitResult | str] = {}
        for c in sorted(tasks):
            r = replies.get(c)
            if r is None:
                out[c] = "no reply within the timeout"
            elif r.has_error():
                out[c] = f"ClientApp error: {' '.join(str(r.error.reason).split())}"[:500]
            else:
                m = r.content["metrics"]
                out[c] = FitResult(Update(_state_from(r.content["adapter"]), float(m["loss"]), int(m["n_train"])),
                                   float(m["seconds"]), int(m["samples_seen"]), 0)
        return out

    def predict(self, split: str, states: dict[int, State]) -> dict[int, Predictions]:
        replies = self._exchange([self._message(c, EVALUATE, st, {"split": split}, f"eval-{split}")
                                  for c, st in sorted(states.items())])
        out = {}
        for c in sorted(states):
            r = replies.get(c)
            if r is None or r.has_error():
                raise RunError(f"client {c} could not score its {split} samples: "
                               f"{r.error.reason if r is not None else 'no reply'}")
            p = r.content["predictions"]
            out[c] = Predictions(np.asarray(p["probs"], dtype=np.float64), np.asarray(p["labels"], dtype=np.float64),
                                 np.asarray(p["users"], dtype=np.int64))
        return out


def make_server_app(cfg: FederatedConfig, out: str | Path, progress: bool = False, result: dict | None = None):
    """A ServerApp that runs the federate procedure with this config, writing the run directory ``out``."""
    from flwr.serverapp import ServerApp

    from privrec.federated.runner import run_federate

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        metrics = run_federate(cfg, out, progress, runner="flower",
                               make_dispatcher=lambda fed, model, strategy: FlowerDispatcher(grid, fed))
        if result is not None:
            result.update(metrics)

    return app


def run_flower_simulation(cfg: FederatedConfig, out: str | Path, progress: bool = False) -> dict:
    """The Flower simulation (Ray backend, one virtual SuperNode per client) of the federate procedure.

    Ray's temp folder (and FLWR_HOME, unless set) go to a fresh temp folder, removed afterwards.

    Raises:
        UserError: a setting the Flower app does not run; RunError: the simulation ended without metrics.
    """
    check_flower_config(cfg)
    from flwr.simulation import run_simulation

    tmp = tempfile.mkdtemp(prefix="privrec-flwr-")  # short: Ray's socket paths must stay under 108 chars
    saved = {k: os.environ.get(k) for k in ("FLWR_HOME", "FLWR_DISABLE_UPDATE_CHECK")}
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    if saved["FLWR_HOME"] is None:
        os.environ["FLWR_HOME"] = os.path.join(tmp, "flwr")
    result: dict = {}
    threads = cfg.model.threads or os.cpu_count() or 1
    try:
        run_simulation(
            server_app=make_server_app(cfg, out, progress, result),
            client_app=make_client_app(),
            num_supernodes=cfg.federated.clients,
            backend_config={"init_args": {"_temp_dir": os.path.join(tmp, "ray"), "num_cpus": threads,
                                          "include_dashboard": False, "log_to_driver": False},
                            "client_resources": {"num_cpus": threads, "num_gpus": 0.0}},
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    if not result:
        raise RunError(f"the Flower simulation ended without writing {out}/metrics.json (see the log above)")
    return result


# The apps `flwr run` loads (docs/federated.md) are instantiated in privrec.federated.flower_deploy, so
# importing this module does not need flwr. The ServerApp reads the config path, `;`-separated overrides,
# output folder and reply timeout from the run config ([tool.flwr.app.config] in flower/pyproject.toml).
def server_app_from_run_config():
    from flwr.serverapp import ServerApp

    from privrec.config import load_config
    from privrec.federated.runner import run_federate

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        rc = context.run_config
        overrides = [s for s in str(rc.get("overrides", "")).split(";") if s.strip()]
        cfg = load_config(str(rc["config"]), overrides, cls=FederatedConfig)
        check_flower_config(cfg)
        run_federate(cfg, str(rc.get("out", "runs/federate-flower")), progress=False, runner="flower",
                     make_dispatcher=lambda fed, model, strategy: FlowerDispatcher(
                         grid, fed, float(rc.get("timeout", 3600))))

    return app
