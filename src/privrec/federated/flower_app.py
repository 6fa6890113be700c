"""The Flower app (flwr 1.41, Message API): a ServerApp and a ClientApp around the same classes.

The ServerApp runs :func:`privrec.federated.runner.run_federate` with a :class:`FlowerDispatcher`: the rounds,
the strategy classes, the metrics and the adapters are the in-process runner's own code; only the transport
differs. Every node holds its own client's data, a folder of ``privrec federate-split-data``
(:mod:`privrec.federated.client_data`; a SuperNode's ``--node-config 'data="PATH"'``), and builds its samples
from it alone. A ``query`` asks each node which client it is (it answers from its folder). Each round the
ServerApp sends every client a ``train`` message (its LoRA state as an ``ArrayRecord``, the round's
instructions and the run's resolved config: no user id, no sample); the ClientApp runs
:meth:`~privrec.federated.client.FederatedClient.fit` and replies with its new state, loss and sample count.
``evaluate`` messages ask a client to score its own validation or test samples; it replies with its metrics
(:func:`~privrec.federated.client.split_metrics`), or with P(Yes), labels and user ids when
``federated.pooled_scores`` asks for the pooled overall AUC. Under strategy ``mixture`` the test evaluation
carries every client's adapter (METHODS §10) and the node weighs them on its own validation samples. A client
whose ClientApp raises sends an error reply; it is left out of that round's aggregation and the run goes on,
as in-process.

- Simulation: :func:`run_flower_simulation` (``flwr.simulation.run_simulation``; each virtual node reads its
  own split folder); ``privrec federate CONFIG --out DIR --runner flower [--client-data SPLIT]``.
- Across machines: ``privrec.flower_entry:server_app`` / ``:client_app`` are what
  ``flower/pyproject.toml`` names for ``flwr run``; see docs/federated.md (SuperLink, SuperNodes, what
  crosses the network) and ``flower/run_local.py`` (all of it on one machine's loopback).

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

from privrec.data import Splits
from privrec.errors import DataError, RunError, UserError
from privrec.federated.client import ClientMetrics, FederatedClient, FitResult, Predictions, split_metrics
from privrec.federated.client_data import (
    CLIENT_DIR,
    client_folders,
    ids_sha256,
    load_client_data,
    read_meta,
    sample_ids,
    samples_fingerprint,
    split_data,
)
from privrec.federated.config import FederatedConfig
from privrec.federated.mixture import own_weight
from privrec.federated.strategies import Instructions, State, Update

TRAIN, EVALUATE, QUERY, FORGET = "train", "evaluate", "query", "train.forget"
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is first imported; no usage pings


def check_flower_config(cfg: FederatedConfig) -> None:
    """Raises: UserError for settings the Flower app does not run."""
    if cfg.federated.strategy == "centralised":
        raise UserError("the centralised reference pools every client's data: run it with --runner in-process")
    if cfg.federated.split is not None:
        raise UserError("federated.split runs in-process only: the server's middle layers need a synchronous "
                        "channel inside every training step, which Flower's round messages do not provide")


# --- client side ----------------------------------------------------------------------------------------
_MODELS: dict[str, tuple] = {}  # per ClientApp process: config digest -> (cfg, model), built once per config
_CLIENTS: dict[tuple, FederatedClient] = {}  # (config digest, data folder, interactions dropped) -> its client


def node_folder(context, data_root: str | Path | None = None) -> Path:
    """The node's data folder: its ``--node-config 'data="PATH"'``, or in the simulation (``data_root``, one
    folder of ``privrec federate-split-data``) ``data_root/client-{partition-id}``.

    Raises:
        DataError: a SuperNode started without a data folder.
    """
    data = context.node_config.get("data")
    if data:
        return Path(str(data)).expanduser()
    if data_root is not None and "partition-id" in context.node_config:
        return Path(data_root) / CLIENT_DIR.format(int(context.node_config["partition-id"]))
    raise DataError("this SuperNode has no data folder: start it with --node-config 'data=\"/path/client-C\"' "
                    "(one folder of privrec federate-split-data)")


def _client_for(msg, folder: Path) -> tuple[FederatedClient, FederatedConfig]:
    """The client of this node's folder under the config the server sent, built once per process: its samples
    come from the folder alone (:func:`~privrec.federated.client_data.load_client_data`)."""
    conf = msg.content["config"]
    cfg_yaml = str(conf["yaml"])
    key = hashlib.sha256(cfg_yaml.encode()).hexdigest()
    data = None
    if key not in _MODELS:
        from privrec.config import parse_config
        from privrec.federated.runner import build_model

        cfg = parse_config(yaml.safe_load(cfg_yaml), FederatedConfig)
        data = load_client_data(folder, cfg)
        _MODELS.clear()
        _CLIENTS.clear()
        _MODELS[key] = (cfg, build_model(cfg, Splits(data.dataset, data.train, data.valid, data.test)))
    cfg, model = _MODELS[key]
    flat = [int(x) for x in conf.get("drop", [])]
    drop = frozenset(zip(flat[::2], flat[1::2]))  # a federated retrain without deleted data: this node's own
    if (key, folder, drop) not in _CLIENTS:
        from privrec.prepare import shows_tombstoned
        from privrec.prompts import PromptBuilder

        data = data or load_client_data(folder, cfg)
        if data.client != int(conf["client"]):
            raise DataError(f"{folder} holds client {data.client}'s data; the server sent client {conf['client']} "
                            "a request")
        # a process may serve several nodes (the simulation): each client's prompts read its own records
        model.builder = PromptBuilder(data.dataset, cfg.prompt, cfg.data.like_threshold, plain=cfg.shows_labels)
        parts = [[x for x in part if not shows_tombstoned(x, drop)] for part in (data.train, data.valid, data.test)]
        counted = None if data.pool is None else [x for x in data.pool if not shows_tombstoned(x, drop)]
        _CLIENTS[(key, folder, drop)] = FederatedClient(data.client, model, *parts, cfg, progress=False,
                                                        counted=counted)
    return _CLIENTS[(key, folder, drop)], cfg


def _state_from(record) -> State:
    import torch

    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in zip(record.keys(), record.to_numpy_ndarrays())}


def _client_train(msg, folder: Path):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    client, _ = _client_for(msg, folder)
    conf = msg.content["config"]
    ins = Instructions(rnd=int(conf["round"]), seed=int(conf["seed"]), mu=float(conf["mu"]),
                       lr_scale=float(conf["lr_scale"]))
    res = client.fit(_state_from(msg.content["adapter"]), ins)
    metrics = MetricRecord({"loss": res.update.loss, "n_train": res.update.n_train, "seconds": res.seconds,
                            "samples_seen": res.samples_seen})
    return Message(RecordDict({"adapter": ArrayRecord(res.update.state), "metrics": metrics}), reply_to=msg)


def _client_evaluate(msg, folder: Path):
    """P(Yes), labels and user ids of the node's samples with ``federated.pooled_scores``; else only the
    metrics the node computes from them (:func:`~privrec.federated.client.split_metrics`)."""
    from flwr.app import Message, MetricRecord, RecordDict

    client, cfg = _client_for(msg, folder)
    conf = msg.content["config"]
    split, extra = str(conf["split"]), {}
    if conf.get("mixture", False):  # strategy mixture: every client's adapter came, weighed on this node's samples
        states = unpack_states(_state_from(msg.content["adapter"]))
        p, omega = client.predict_mixture(states, split)
        extra = {"mixture_own_weight": own_weight(omega, sorted(states), client.cid)}
    else:
        p = client.predict(_state_from(msg.content["adapter"]), split)
    if not cfg.federated.pooled_scores:
        return Message(RecordDict({"metrics": MetricRecord(dict(split_metrics(p, cfg.task == "ranking"), **extra))}),
                       reply_to=msg)
    rec = MetricRecord({"probs": [float(x) for x in p.probs], "labels": [int(x) for x in p.labels],
                        "users": [int(x) for x in p.users], **extra})
    return Message(RecordDict({"predictions": rec}), reply_to=msg)


def _client_forget(msg, folder: Path):
    """A deletion request routed to the one node holding the users (METHODS §10, strategy local / mixture):
    the node drops every sample of its own that shows one of their interactions, trains its client's adapter
    alone with the run's rounds and seeds from the state the server sent (the initial adapter, or for a sliced
    client the checkpoint before round ``first``: its slice map is cut from the node's own samples as in
    training, without the dropped ones), and replies with it and the checkpoints of the rounds it replayed. The
    request names only this node's users and reaches no other node."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from privrec.prepare import shows_tombstoned

    client, cfg = _client_for(msg, folder)
    conf = msg.content["config"]
    users, first = {int(u) for u in conf["users"]}, int(conf.get("first", 0))
    inter = load_client_data(folder, cfg).dataset.inter
    gone = {(int(u), int(i)) for u, i in zip(inter["user_id"], inter["item_id"]) if int(u) in users}
    keep = [s for s in client.samples["train"] if not shows_tombstoned(s, gone)]
    ids = {s.sample_id for s in keep}
    slices = None if client.slices is None else [[i for i in sl if i in ids] for sl in client.slices]
    counted = [s for s in client.counted if not shows_tombstoned(s, gone)]
    alone = FederatedClient(client.cid, client.model, keep, [], [], cfg, slices=slices, counted=counted)
    ckpts: dict[int, State] = {}
    state, seconds = alone.train_alone(_state_from(msg.content["adapter"]), first, ckpts.__setitem__)
    metrics = MetricRecord({"n_train": len(keep), "seconds": seconds})
    return Message(RecordDict({"adapter": ArrayRecord(state), "checkpoints": ArrayRecord(pack_states(ckpts)),
                               "metrics": metrics}), reply_to=msg)


class FlowerForget:
    """``remote`` of ``privrec forget`` on a model deployed on Flower (METHODS §10). The nodes are found as a
    federate run finds them (their own ``query`` answers, checked against the data as they hold it); then

    - called as ``(client, users, start_state, first_round)`` (``retrain-client``: local / mixture), a deletion
      goes only to the node holding the client, which replays its rounds alone; returns ``(state, n_train,
      seconds, {stage: checkpoint state})``;
    - :meth:`federation` (``retrain-federation``: pplr / fedavg / fedprox) trains the whole federation again
      on the nodes, every round, every client; the deleted interactions travel only to the nodes that held
      them (``drop`` in their messages), every other node is sent what a federate run sends it.
    """

    def __init__(self, grid, cfg: FederatedConfig, assignment: dict[int, int], timeout: float = 3600.0,
                 record: list | None = None):
        from privrec.federated.runner import Federation
        from privrec.prepare import setup_data

        self.grid, self.cfg, self.timeout, self.record = grid, cfg, timeout, record
        self.dispatcher = FlowerDispatcher(grid, Federation(cfg, setup_data(cfg), assignment), timeout, record)

    def __call__(self, client: int, users: list[int], start: State, first: int = 0):
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        d = self.dispatcher
        conf = ConfigRecord({"yaml": d.cfg_yaml, "client": client, "users": [int(u) for u in users],
                             "first": int(first)})
        msg = Message(RecordDict({"adapter": ArrayRecord(start), "config": conf}),
                      dst_node_id=d.node_of[client], message_type=FORGET, group_id=f"forget-{client}")
        [r] = d._send([msg]) or [None]
        if r is None or r.has_error():
            raise RunError(f"the Flower node of client {client} did not retrain: "
                           f"{r.error.reason if r is not None else 'no reply'}")
        m = r.content["metrics"]
        ckpts = unpack_states(_state_from(r.content["checkpoints"])) if "checkpoints" in r.content else {}
        return _state_from(r.content["adapter"]), int(m["n_train"]), float(m["seconds"]), ckpts

    def federation(self, out: str | Path, tombstones: frozenset, assignment: dict[int, int],
                   progress: bool = False) -> dict:
        """``run_federate`` without ``tombstones`` on the nodes, into ``out``; returns its metrics."""
        from privrec.federated.runner import run_federate

        drop: dict[int, set[tuple[int, int]]] = {}
        for u, i in tombstones:
            if u in assignment:
                drop.setdefault(assignment[u], set()).add((int(u), int(i)))
        node_of = self.dispatcher.node_of
        return run_federate(self.cfg, out, progress, runner="flower", tombstones=tombstones, assignment=assignment,
                            make_dispatcher=lambda fed, model, strategy: FlowerDispatcher(
                                self.grid, fed, self.timeout, self.record, drop=drop, node_of=node_of))


def flower_retrain(grid, cfg: FederatedConfig, assignment: dict[int, int], timeout: float = 3600.0,
                   record: list | None = None) -> FlowerForget:
    """The ``remote`` of ``privrec forget`` for a model deployed on Flower (:class:`FlowerForget`)."""
    return FlowerForget(grid, cfg, assignment, timeout, record)


def pack_states(states: dict[int, State]) -> State:
    """Several clients' adapters as one tensor dict (``c{client}/{tensor}``), for one message."""
    return {f"c{c}/{k}": v for c, st in states.items() for k, v in st.items()}


def unpack_states(packed: State) -> dict[int, State]:
    out: dict[int, State] = {}
    for key, v in packed.items():
        c, _, name = key.partition("/")
        out.setdefault(int(c[1:]), {})[name] = v
    return out


def _client_query(msg, folder: Path):
    """Which client this node is, read from its folder: the client id, the fingerprint of the config it was
    split with and the hash of its sample ids (the server checks both against its own plan)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    meta = read_meta(folder)
    node = ConfigRecord({"client": int(meta["client"]), "fingerprint": str(meta["fingerprint"]),
                         "samples_sha256": ids_sha256(meta["samples"])})
    return Message(RecordDict({"node": node}), reply_to=msg)


def make_client_app(data_root: str | Path | None = None):
    """A ClientApp with the three handlers; every piece of its work is :class:`FederatedClient`'s. Each node
    reads its own folder (:func:`node_folder`; ``data_root``: the simulation's split folders)."""
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return _client_train(msg, node_folder(context, data_root))

    @app.evaluate()
    def evaluate(msg, context):
        return _client_evaluate(msg, node_folder(context, data_root))

    @app.query()
    def query(msg, context):
        return _client_query(msg, node_folder(context, data_root))

    @app.train("forget")
    def forget(msg, context):
        return _client_forget(msg, node_folder(context, data_root))

    return app


# --- server side ----------------------------------------------------------------------------------------
class FlowerDispatcher:
    """The runner's dispatcher over a Flower ``Grid``: one message per client per request.

    What it sends a node: the LoRA state to start from or score with (``ArrayRecord``) and a ``ConfigRecord``
    with the run's resolved config, the client index and the round's instructions (or the split to score);
    never a user id or a sample. ``record``: a list that receives every message sent (the tests check it).

    A federated retrain without deleted data (``drop``: client -> its deleted (user, item) interactions) adds
    ``drop`` to the messages of the clients that held them, and to no other; ``node_of``: the nodes an earlier
    discovery found (against the data as the nodes hold it, before the deletion).
    """

    def __init__(self, grid, fed, timeout: float = 600.0, record: list | None = None,
                 drop: dict[int, set[tuple[int, int]]] | None = None, node_of: dict[int, int] | None = None):
        self.grid, self.fed, self.timeout, self.record = grid, fed, timeout, record
        self.cfg_yaml = fed.cfg.to_yaml()
        self.drop = {c: [x for pair in sorted(v) for x in pair] for c, v in (drop or {}).items() if v}
        self.node_of = dict(node_of) if node_of is not None else self._discover(len(fed.clients))
        self.client_of = {n: c for c, n in self.node_of.items()}

    def _send(self, messages) -> list:
        if self.record is not None:
            self.record.extend(messages)
        return list(self.grid.send_and_receive(messages, timeout=self.timeout))

    def _discover(self, n: int) -> dict[int, int]:
        """client id -> node id, from what each node reads in its own folder (``query``): its client id, the
        fingerprint of the config its folder was split with and the hash of its sample ids, checked against
        this run's partition.

        Raises:
            RunError: fewer nodes than clients connected within the timeout; a node that cannot read its folder,
                holds a folder of another config or other samples, or holds the same client as another node.
        """
        from flwr.app import Message, RecordDict

        deadline = time.monotonic() + self.timeout
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < n and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = list(self.grid.get_node_ids())
        if len(nodes) < n:
            raise RunError(f"only {len(nodes)} Flower nodes connected; federated.clients={n}")
        fingerprint = samples_fingerprint(self.fed.cfg)
        expected = {c: ids_sha256(sample_ids(self.fed, c)) for c in range(n)}
        out: dict[int, int] = {}
        for r in self._send([Message(RecordDict(), dst_node_id=nd, message_type=QUERY) for nd in nodes]):
            nd = r.metadata.src_node_id
            if r.has_error():
                raise RunError(f"Flower node {nd}: {' '.join(str(r.error.reason).split())}"[:500])
            rec = r.content["node"]
            c = int(rec["client"])
            if str(rec["fingerprint"]) != fingerprint:
                raise RunError(f"Flower node {nd}'s data folder was split for another config (its data, seed, task, "
                               "ranking or partition settings differ): split the data with this config")
            if c not in expected or str(rec["samples_sha256"]) != expected[c]:
                raise RunError(f"Flower node {nd} holds other samples than client {c} of this run's partition")
            if c in out:
                raise RunError(f"Flower nodes {out[c]} and {nd} both hold client {c}'s data")
            out[c] = nd
        missing = [c for c in range(n) if c not in out]
        if missing:
            raise RunError(f"no Flower node holds the data of client(s) {missing}")
        return out

    def _message(self, cid: int, kind: str, state: State, extra: dict, group: str):
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        drop = {"drop": self.drop[cid]} if cid in self.drop else {}
        conf = ConfigRecord({"yaml": self.cfg_yaml, "client": cid, **drop, **extra})
        return Message(RecordDict({"adapter": ArrayRecord(state), "config": conf}), dst_node_id=self.node_of[cid],
                       message_type=kind, group_id=group)

    def _exchange(self, messages) -> dict[int, object]:
        return {self.client_of[r.metadata.src_node_id]: r for r in self._send(messages)}

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
        return {c: self._predictions(replies.get(c), c, split)[0] for c in sorted(states)}

    def predict_mixture(self, split: str, states: dict[int, State]):
        """Strategy mixture: every node receives every client's adapter and weighs them on its own samples."""
        packed = pack_states(states)
        replies = self._exchange([self._message(c, EVALUATE, packed, {"split": split, "mixture": True},
                                                f"eval-mixture-{split}") for c in sorted(states)])
        out = {}
        for c in sorted(states):
            p, rec = self._predictions(replies.get(c), c, split)
            out[c] = (p, float(rec["mixture_own_weight"]))
        return out

    def _predictions(self, r, c: int, split: str):
        if r is None or r.has_error():
            raise RunError(f"client {c} could not score its {split} samples: "
                           f"{r.error.reason if r is not None else 'no reply'}")
        if not self.fed.cfg.federated.pooled_scores:
            m = r.content["metrics"]
            return ClientMetrics({k: v for k, v in dict(m).items() if k != "mixture_own_weight"}), m
        p = r.content["predictions"]
        return Predictions(np.asarray(p["probs"], dtype=np.float64), np.asarray(p["labels"], dtype=np.float64),
                           np.asarray(p["users"], dtype=np.int64)), p


def make_server_app(cfg: FederatedConfig, out: str | Path, progress: bool = False, result: dict | None = None,
                    record: list | None = None):
    """A ServerApp that runs the federate procedure with this config, writing the run directory ``out``
    (``record``: every message it sends is appended there)."""
    from flwr.serverapp import ServerApp

    from privrec.federated.runner import run_federate

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        metrics = run_federate(cfg, out, progress, runner="flower",
                               make_dispatcher=lambda fed, model, strategy: FlowerDispatcher(grid, fed, record=record))
        if result is not None:
            result.update(metrics)

    return app


def run_flower_simulation(cfg: FederatedConfig, out: str | Path, progress: bool = False,
                          client_data: str | Path | None = None, record: list | None = None) -> dict:
    """The Flower simulation (Ray backend, one virtual SuperNode per client) of the federate procedure.

    Every virtual node reads its own client folder, as a deployed SuperNode does: ``client_data`` (the output of
    ``privrec federate-split-data`` with this config), or, when None, folders split into the temp folder.
    Ray's temp folder (and FLWR_HOME, unless set) go to a fresh temp folder, removed afterwards. ``record``:
    every message the ServerApp sends is appended there.

    Raises:
        UserError: a setting the Flower app does not run, ``client_data`` missing or split for another config;
            RunError: the simulation ended without metrics.
    """
    check_flower_config(cfg)
    if client_data is not None:
        client_folders(client_data, cfg)
    from flwr.simulation import run_simulation

    tmp = tempfile.mkdtemp(prefix="privrec-flwr-")  # short: Ray's socket paths must stay under 108 chars
    saved = {k: os.environ.get(k) for k in ("FLWR_HOME", "FLWR_DISABLE_UPDATE_CHECK")}
    os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    if saved["FLWR_HOME"] is None:
        os.environ["FLWR_HOME"] = os.path.join(tmp, "flwr")
    result: dict = {}
    threads = cfg.model.threads or os.cpu_count() or 1
    try:
        if client_data is None:
            client_data = Path(tmp) / "clients"
            split_data(cfg, client_data)
        run_simulation(
            server_app=make_server_app(cfg, out, progress, result, record),
            client_app=make_client_app(client_data),
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
