"""The ``federate`` procedure and its in-process runner (METHODS §2, §3).

One procedure, readable top to bottom (:func:`run_federate`): cut the protocol's samples, partition the
users into clients, build the model (split or whole), then for every round ask each client for its update,
aggregate with the strategy, score the validation samples; finally score every client's test samples with
the adapter that client ends with, write ``metrics.json`` and one adapter per client.

Who runs a client's work is behind one small interface, a *dispatcher* (``fit`` and ``predict`` for a set
of clients): :class:`InProcessDispatcher` calls :class:`~privrec.federated.client.FederatedClient`
directly (the embedded default); the Flower ServerApp (:mod:`privrec.federated.flower_app`) sends the same
requests as Flower messages to ClientApps that call the same class. Everything else — partition, rounds,
aggregation, metrics, saving — is this module's, shared by both.
"""

from __future__ import annotations

import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from privrec import baselines, models, prepare, ranking
from privrec.config import ExecutorConfig
from privrec.data import Sample, Splits
from privrec.executor import Executor, open_executor
from privrec.federated import slicing
from privrec.federated.client import (
    POOLED,
    ClientMetrics,
    FederatedClient,
    FitResult,
    Predictions,
    client_pool,
    features_record,
    round_seed,
    split_metrics,
)
from privrec.federated.config import FederatedConfig
from privrec.federated.mixture import own_weight
from privrec.federated.partition import client_samples, partition_users
from privrec.federated.slicing import client_slices
from privrec.federated.split import SplitRecLM, encode_message, parameter_counts
from privrec.federated.strategies import Instructions, State, Strategy, Update, aggregate_parts, make_strategy
from privrec.metrics import auc, binary_metrics, ranking_metrics, ranks_by_group
from privrec.model.adapters import adapter_state, load_adapter_state, save_adapter
from privrec.model.recmodel import RecLM
from privrec.prepare import machine, setup_data
from privrec.rundir import ADAPTERS_DIR, CLIENT_PREFIX, SLICES_DIR, RunDir, run_lock


# --- the plan: samples and clients ----------------------------------------------------------------------
@dataclass
class Federation:
    """The protocol's samples and the users -> clients assignment."""

    cfg: FederatedConfig
    splits: Splits
    assignment: dict[int, int]
    left: frozenset[int] = frozenset()  # clients that left the federation (a federated retrain without them)

    @property
    def clients(self) -> list[int]:
        return [c for c in range(self.cfg.federated.clients) if c not in self.left]

    def samples(self, cid: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
        """(train, valid, test) of client ``cid`` (POOLED: everyone's)."""
        sp = self.splits
        if cid == POOLED:
            return sp.train, sp.valid, sp.test
        return tuple(client_samples(part, self.assignment, cid) for part in (sp.train, sp.valid, sp.test))

    def counted(self, cid: int) -> list[Sample]:
        """What client ``cid``'s counted features are counted over (:func:`~.client.client_pool`)."""
        return client_pool(self.cfg, self.splits, self.assignment, cid)

    def train_clients(self, strategy: Strategy) -> list[int]:
        return [POOLED] if strategy.pooled else self.clients


def plan_federation(cfg: FederatedConfig, splits: Splits | None = None,
                    assignment: dict[int, int] | None = None) -> Federation:
    """Cut the protocol's samples and assign users to clients (``assignment``: a model's own, kept as it was:
    a federated retrain without deleted data keeps every remaining user on their client, and a client left
    with no training sample has left the federation).

    Raises:
        UserError: bad data, or a partition that leaves a client without training samples.
    """
    splits = splits or setup_data(cfg)
    if assignment is None:
        assignment = partition_users(splits.dataset, splits.train, splits.valid + splits.test, cfg.federated,
                                     cfg.seed)
        return Federation(cfg, splits, assignment)
    have = {assignment[s.user_id] for s in splits.train}
    return Federation(cfg, splits, assignment, frozenset(c for c in range(cfg.federated.clients) if c not in have))


def build_model(cfg: FederatedConfig, splits: Splits, record: bool = False) -> RecLM:
    """The model every client borrows in turn: a :class:`SplitRecLM` under ``federated.split``."""
    split, plain = cfg.federated.split, cfg.shows_labels  # counted features: each client's own (FederatedClient)
    if split is None:
        return prepare.build_model(cfg, splits.dataset, plain=plain)
    return prepare.build_model(cfg, splits.dataset, cls=SplitRecLM, plain=plain,
                       before_lora=lambda m: m.configure_split(split.client_first, split.client_last, record=record))


def client_tensor_predicate(model: RecLM) -> Callable[[str], bool] | None:
    return model.is_client_tensor if isinstance(model, SplitRecLM) else None


# --- dispatchers ----------------------------------------------------------------------------------------
class Dispatcher(Protocol):
    def fit(self, rnd: int, tasks: dict[int, tuple[State, Instructions]]) -> dict[int, FitResult | str]:
        """Each client's FitResult, or a one-line error for a client that failed."""

    def predict(self, split: str, states: dict[int, State]) -> dict[int, Predictions]: ...

    def predict_mixture(self, split: str, states: dict[int, State]) -> dict[int, tuple[Predictions | ClientMetrics,
                                                                                      float]]:
        """Every client's ``split`` under the mixture of all ``states`` (strategy ``mixture``), with the mean
        weight its prompts gave its own adapter."""


class InProcessDispatcher:
    """Runs every client in this process, one after another, on one shared model."""

    def __init__(self, clients: dict[int, FederatedClient], progress: bool = False):
        self.clients = clients
        self.progress = progress

    def fit(self, rnd, tasks):
        out: dict[int, FitResult | str] = {}
        for cid in sorted(tasks):
            try:
                out[cid] = self.clients[cid].fit(*tasks[cid])
            except Exception as e:  # noqa: BLE001 - a failed client is left out of the round; the run goes on
                out[cid] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
                server = getattr(self.clients[cid].model, "server", None)
                if server is not None:
                    server.reset()
        return out

    def predict(self, split, states):
        return {cid: self.clients[cid].predict(states[cid], split) for cid in sorted(states)}

    def predict_mixture(self, split, states):
        out = {}
        for cid in sorted(states):
            p, omega = self.clients[cid].predict_mixture(states, split)
            out[cid] = (p, own_weight(omega, sorted(states), cid))
        return out


def fit_task(clients: dict[int, FederatedClient], job: tuple) -> FitResult | str:
    """One client's local epochs of a round as a unit of an executor (a Ray task with ``executor: ray``): the
    client's FitResult, or the one-line error of a client that failed (as :class:`InProcessDispatcher` gives)."""
    cid, state, ins = job
    try:
        return clients[cid].fit(state, ins)
    except Exception as e:  # noqa: BLE001 - a failed client is left out of the round; the run goes on
        return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


class ExecutorDispatcher(InProcessDispatcher):
    """The in-process clients, their rounds' local training run by an executor (one Ray task per client with
    ``executor: ray``; the clients and their model reach each worker once); scoring stays in this process."""

    def __init__(self, clients: dict[int, FederatedClient], executor: Executor, progress: bool = False):
        super().__init__(clients, progress)
        self.executor = executor
        # the frozen-layer cache in memory before the clients are shipped, client by client as the first local
        # round fills it: no worker reads or writes the asset home's cache (a cluster node may have none)
        for cid in sorted(clients):
            c = clients[cid]
            for items in c.training_items():
                c.model.prepare(items, c.cfg.train.eval_batch_size, progress)

    def fit(self, rnd, tasks):
        cids = sorted(tasks)
        results = self.executor.map(fit_task, self.clients, [(c, *tasks[c]) for c in cids],
                                    labels=[f"round {rnd} client {c}" for c in cids],
                                    log=lambda msg: print(msg, file=sys.stderr, flush=True))
        return dict(zip(cids, results))


# --- rounds ---------------------------------------------------------------------------------------------
def state_bytes(state: State) -> int:
    """Size of a state on the wire (the safetensors encoding the split channel also uses)."""
    return len(encode_message(state)) if state else 0


def pooled_auc(preds: dict[int, Predictions | ClientMetrics]) -> float:
    """AUC over every client's samples pooled; from per-client metrics only (no scores sent), the
    sample-weighted mean of the client AUCs (:func:`overall_from_clients`)."""
    if any(isinstance(p, ClientMetrics) for p in preds.values()):
        return overall_from_clients([p.values for p in preds.values()])["auc"]
    labels = np.concatenate([p.labels for p in preds.values()]) if preds else np.zeros(0)
    probs = np.concatenate([p.probs for p in preds.values()]) if preds else np.zeros(0)
    return auc(labels, probs) if len(labels) else float("nan")


def _weighted_mean(rows: list[dict], key: str, weight: str) -> float:
    pairs = [(r[key], r[weight]) for r in rows if key in r and r.get(weight) and not np.isnan(r[key])]
    w = sum(n for _, n in pairs)
    return float(sum(v * n for v, n in pairs) / w) if w else float("nan")


def overall_from_clients(rows: list[dict], ranked: bool = False) -> dict:
    """``overall`` from the clients' own metrics (:func:`~privrec.federated.client.split_metrics`) when no
    per-sample score was sent: LogLoss, accuracy and the positive rate weighted by each client's ``n``, UAUC by
    its ``uauc_users`` and HR@K / NDCG@K by its ``n_ranked`` equal the pooled values (each is a mean over samples,
    users or rankings that live on one client); AUC is the sample-weighted mean of the client AUCs (clients
    with both labels), which is not the pooled AUC."""
    out = {"n": int(sum(r.get("n", 0) for r in rows))}
    for key in ("auc", "logloss", "accuracy", "positive_rate"):
        out[key] = _weighted_mean(rows, key, "n")
    out["uauc"] = _weighted_mean(rows, "uauc", "uauc_users")
    if ranked:
        out.update({k: _weighted_mean(rows, k, "n_ranked") for k in rows[0] if k.startswith(("hr@", "ndcg@"))})
    return out


def eval_states(fed: Federation, strategy: Strategy, states: dict[int, State]) -> dict[int, State]:
    """The adapter each client scores with: its own, or the pooled one for the centralised reference."""
    return {c: states[POOLED] for c in fed.clients} if strategy.pooled else dict(states)


def run_rounds(fed: Federation, strategy: Strategy, dispatcher: Dispatcher, init: State,
               is_client_tensor: Callable[[str], bool] | None = None,
               log: Callable[[str], None] = lambda m: None,
               on_round: Callable[[int, dict[int, State]], None] | None = None,
               ) -> tuple[dict[int, State], list[dict], list[dict]]:
    """All rounds: instructions -> client updates -> aggregation -> validation (-> ``on_round(rnd, states)``).
    Returns (the states the clients end with, one record per round, one record per failure); with
    ``federated.keep: best-valid`` they end with the states of the round whose overall validation AUC was highest
    (the earliest of ties; a round with no AUC is never chosen over one with it), and that round's record says
    ``kept: true``."""
    f = fed.cfg.federated
    cids = fed.train_clients(strategy)
    states: dict[int, State] = {c: init for c in cids}
    last_losses: dict[int, float] = {}
    rounds, failures = [], []
    exchanges = strategy.mixes
    best: tuple[float, int, dict[int, State]] | None = None  # keep: best-valid

    def wire(state: State) -> State:  # what travels for aggregation (the client part under a split)
        return {k: v for k, v in state.items() if is_client_tensor is None or is_client_tensor(k)}

    for rnd in range(f.rounds):
        tasks = {c: (states[c], strategy.instructions(rnd, c, round_seed(fed.cfg.seed, rnd), last_losses))
                 for c in cids}
        t0 = time.perf_counter()
        results = dispatcher.fit(rnd, tasks)
        seconds = time.perf_counter() - t0
        ok = {c: r for c, r in results.items() if isinstance(r, FitResult)}
        for c, r in sorted(results.items()):
            if not isinstance(r, FitResult):
                failures.append({"round": rnd + 1, "client": c, "error": r})
                log(f"round {rnd + 1}: client {c} failed and is left out of the aggregation: {r}")
        updates: dict[int, Update] = {c: r.update for c, r in ok.items()}
        states = aggregate_parts(strategy, rnd, states, updates, is_client_tensor)
        last_losses.update({c: u.loss for c, u in updates.items()})

        n = sum(u.n_train for u in updates.values())
        mean_loss = sum(u.loss * u.n_train for u in updates.values() if u.n_train) / n if n else float("nan")
        adapters = 0
        if exchanges:
            adapters = sum(state_bytes(wire(tasks[c][0])) for c in cids) + \
                sum(state_bytes(wire(u.state)) for u in updates.values())
        activations = sum(r.split_bytes for r in ok.values())
        seen = sum(r.samples_seen for r in ok.values())
        record = {"round": rnd + 1, "mean_train_loss": mean_loss,
                  "client_loss": {str(c): u.loss for c, u in sorted(updates.items())},
                  "failed": sorted(c for c in results if c not in ok), "seconds": seconds,
                  "client_seconds": {str(c): r.seconds for c, r in sorted(ok.items())},
                  "samples_seen": seen,
                  "bytes": {"adapters": adapters, "activations": activations, "total": adapters + activations}}
        if f.valid_every_round:
            record["valid_auc"] = pooled_auc(dispatcher.predict("valid", eval_states(fed, strategy, states)))
        rounds.append(record)
        if f.keep == "best-valid" and not np.isnan(record.get("valid_auc", np.nan)) \
                and (best is None or record["valid_auc"] > best[0]):
            best = (record["valid_auc"], rnd, {c: {k: v.clone() for k, v in s.items()} for c, s in states.items()})
        if on_round is not None:
            on_round(rnd, states)
        log(f"round {rnd + 1}/{f.rounds}: mean train loss {mean_loss:.4f}"
            + (f", valid AUC {record['valid_auc']:.4f}" if "valid_auc" in record else "")
            + f", {seconds:.1f}s" + (f", failed {record['failed']}" if record["failed"] else ""))
    if best is not None:
        _, rnd, states = best
        rounds[rnd]["kept"] = True
        log(f"kept round {rnd + 1}/{f.rounds}: the highest validation AUC ({best[0]:.4f})")
    return states, rounds, failures


# --- metrics --------------------------------------------------------------------------------------------
def summarise(fed: Federation, preds: dict[int, Predictions | ClientMetrics]) -> dict:
    """``overall`` (pooled over every client's test samples), ``clients`` and ``balance`` (METHODS §2).

    When the clients sent their metrics only (:class:`~privrec.federated.client.ClientMetrics`), ``overall``
    is :func:`overall_from_clients` and ``overall_kind`` says ``client-weighted`` (else ``pooled``).

    With ``task: ranking`` a client's test samples are its users' candidates (one like-prompt each, label 1
    for the true item), so ``overall`` and every client row also carry ``hr@K`` / ``ndcg@K``: each user's
    rank of the true item by P(Yes) among its candidates, and ``ranking_balance`` spreads ``ndcg@10``."""
    cids = sorted(preds)
    ranked = fed.cfg.task == "ranking"
    scores = {c: p.values if isinstance(p, ClientMetrics) else split_metrics(p, ranked) for c, p in preds.items()}
    pooled = not any(isinstance(p, ClientMetrics) for p in preds.values())
    if pooled:
        labels = np.concatenate([preds[c].labels for c in cids])
        probs = np.concatenate([preds[c].probs for c in cids])
        users = np.concatenate([preds[c].users for c in cids])
        overall = binary_metrics(labels, probs, users)
        if ranked:
            overall.update(ranking_metrics(ranks_by_group(users, labels, probs)))
    else:
        overall = overall_from_clients([scores[c] for c in cids], ranked)
    clients = []
    for c in cids:
        tr, va, te = fed.samples(c)
        row = {"client": c, "n_users": len({s.user_id for s in tr + va + te}), "n_train": len(tr),
               "n_valid": len(va), "n_test": len(te),
               "train_positive_rate": float(np.mean([s.label for s in tr])) if tr else None}
        row.update({k: v for k, v in scores[c].items() if k not in ("n", "uauc", "uauc_users", "n_ranked")})
        clients.append(row)
    aucs = np.array([r["auc"] for r in clients if not np.isnan(r["auc"])])  # clients with both labels
    balance = {"std": float(aucs.std()) if len(aucs) else float("nan"),
               "min": float(aucs.min()) if len(aucs) else float("nan"),
               "max": float(aucs.max()) if len(aucs) else float("nan"),
               "gap": float(aucs.max() - aucs.min()) if len(aucs) else float("nan"),
               "clients_with_auc": len(aucs)}
    out = {"overall": overall, "overall_kind": "pooled" if pooled else "client-weighted",
           "clients": clients, "balance": balance}
    if ranked:
        v = np.array([r["ndcg@10"] for r in clients if not np.isnan(r["ndcg@10"])])
        out["ranking_balance"] = {"metric": "ndcg@10", "std": float(v.std()) if len(v) else float("nan"),
                                  "min": float(v.min()) if len(v) else float("nan"),
                                  "gap": float(v.max() - v.min()) if len(v) else float("nan")}
    return out


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def client_meta(fed: Federation, model: RecLM, strategy: Strategy, c: int, trained_on: list[int]) -> dict:
    cfg = fed.cfg
    samples = [s for cc in trained_on for s in fed.samples(cc)[0]]
    extra = {}
    if cfg.shows_labels:
        extra["features"] = features_record(cfg, {cc: fed.counted(cc) for cc in trained_on})
    return prepare.adapter_meta(cfg, model, samples, client=c, strategy=strategy.name, rounds=cfg.federated.rounds,
                                trained_on_clients=trained_on, **extra)


def client_slice_maps(fed: Federation) -> dict[int, list[list[str]]]:
    """Every client's slice map under ``federated.slices`` (empty unsliced): what its adapter and checkpoints
    record; each client cuts the same map from its own samples (:class:`FederatedClient`)."""
    r = fed.cfg.federated.slices
    return {c: client_slices(fed.samples(c)[0], r) for c in fed.clients} if r > 1 else {}


def save_adapters(model: RecLM, run: RunDir, fed: Federation, strategy: Strategy, states: dict[int, State],
                  contributors: set[int], maps: dict[int, list[list[str]]]) -> None:
    """One peft adapter folder per client under ``adapters/client-{c}`` with its lineage (a sliced client's
    also with its slice map ``maps[c]`` and checkpoint records: :mod:`.slicing`)."""
    for c, state in sorted(eval_states(fed, strategy, states).items()):
        load_adapter_state(model.model, state)
        trained_on = sorted(contributors) if strategy.mixes or strategy.pooled else [c]
        meta = client_meta(fed, model, strategy, c, trained_on)
        if c in maps:
            meta.update(slicing.sliced_fields(fed.cfg, c, maps[c], run.path))
        save_adapter(model.model, run / ADAPTERS_DIR / f"{CLIENT_PREFIX}{c}", meta)


def checkpoint_saver(model: RecLM, run: RunDir, fed: Federation, strategy: Strategy,
                     maps: dict[int, list[list[str]]]):
    """``on_round`` of a sliced run: after the last round before a new slice enters, every client's state is
    saved as its checkpoint of that stage (lineage: its slices 1..s of ``maps``; its features record: what that
    stage's prompts were counted over)."""
    f = fed.cfg.federated

    def save(rnd: int, states: dict[int, State]) -> None:
        s = slicing.checkpoint_after(rnd, f.slices, f.rounds)
        if s is None:
            return
        for c in sorted(states):
            load_adapter_state(model.model, states[c])
            own = fed.samples(c)[0]
            counted = slicing.stage_pool(fed.counted(c), own, maps[c], s)
            slicing.save_client_checkpoint(model, run.path, c, s, slicing.in_slices(own, maps[c], s),
                                           client_meta(fed, model, strategy, c, [c]),
                                           slicing.checkpoint_features(fed.cfg, c, counted, s))

    return save


# --- the procedure --------------------------------------------------------------------------------------
def make_in_process(fed: Federation, model: RecLM, strategy: Strategy, progress: bool,
                    executor: Executor | None = None) -> InProcessDispatcher:
    """The clients in this process; with an ``executor`` other than local their local training runs there."""
    clients = {c: FederatedClient(c, model, *fed.samples(c), fed.cfg, progress=progress, counted=fed.counted(c))
               for c in sorted(set(fed.clients) | set(fed.train_clients(strategy)))}
    if executor is not None and executor.kind != "local":
        return ExecutorDispatcher(clients, executor, progress)
    return InProcessDispatcher(clients, progress)


def run_federate(cfg: FederatedConfig, out: str | Path, progress: bool = True,
                 make_dispatcher: Callable[[Federation, RecLM, Strategy], Dispatcher] | None = None,
                 runner: str = "in-process", tombstones: frozenset | set = frozenset(),
                 assignment: dict[int, int] | None = None, executor: ExecutorConfig | None = None) -> dict:
    """Federated LoRA tuning (METHODS §2, §3, §10); returns metrics.json's content.

    ``executor`` (default: the config's ``executor`` section): in-process, each round's clients train one after
    another here (``local``) or as Ray tasks (``ray``), with the same adapters either way. A layer split keeps
    its clients here (they share the server's state).

    ``tombstones`` and ``assignment``: a model's deleted interactions and its users -> clients, for a federated
    retrain without the data (``privrec forget --retrain-federation``): the same draw minus the deleted samples,
    every user on the client they were on.

    Raises:
        UserError: bad data, model or config; a partition that leaves a client without training samples.
    """
    # 1. samples and clients, then the model: all before the run directory is touched
    fed = plan_federation(cfg, setup_data(cfg, tombstones) if tombstones else None, assignment)
    strategy = make_strategy(cfg.federated)
    model = build_model(cfg, fed.splits)
    ex_cfg = executor or cfg.executor
    if make_dispatcher is not None or cfg.federated.split:
        ex_cfg = ExecutorConfig()
    with run_lock(out):
        run = RunDir(out)
        with open_executor(ex_cfg, run.path, run.log) as ex:
            dispatch = make_dispatcher or (lambda fe, m, s: make_in_process(fe, m, s, progress, ex))
            return _federate(cfg, run, fed, strategy, model, progress, dispatch, runner)


def _federate(cfg: FederatedConfig, run: RunDir, fed: Federation, strategy: Strategy, model: RecLM, progress: bool,
              make_dispatcher, runner: str) -> dict:
    """Steps 2-5 of :func:`run_federate`, the run directory locked."""
    is_client_tensor = client_tensor_predicate(model)
    counts = parameter_counts(model.model, model.is_client_layer if is_client_tensor else lambda _: True)
    run.write_config(cfg)
    f = cfg.federated
    run.log(f"privrec federate -> {run.path} ({runner}; strategy {f.strategy}, {f.clients} {f.partition} "
            f"clients, {f.rounds} rounds x {cfg.train.epochs} local epochs, loss {f.loss}, model {cfg.model.name}"
            + (f", split {f.split.client_first}+{f.split.client_last}" if f.split else "") + ")")
    for c in fed.clients:
        tr, va, te = fed.samples(c)
        run.log(f"client {c}: {len({s.user_id for s in tr + va + te})} users, {len(tr)} train / {len(va)} valid "
                f"/ {len(te)} test samples, train like-rate {np.mean([s.label for s in tr]):.3f}")

    # 2. the clients' runtime (tokenises every client's samples once in-process)
    dispatcher = (make_dispatcher or (lambda fe, m, s: make_in_process(fe, m, s, progress)))(fed, model, strategy)

    # 3. rounds: every client starts from the same initial adapter
    t0 = time.perf_counter()
    shutil.rmtree(run / SLICES_DIR, ignore_errors=True)  # a run trained again keeps no older checkpoint
    maps = client_slice_maps(fed)
    saver = checkpoint_saver(model, run, fed, strategy, maps) if maps else None
    states, rounds, failures = run_rounds(fed, strategy, dispatcher, adapter_state(model.model), is_client_tensor,
                                          run.log, saver)
    train_seconds = time.perf_counter() - t0

    # 4. every client's test samples scored with the adapter it ends with
    final = eval_states(fed, strategy, states)
    own = {}
    if strategy.name == "mixture":  # every client's test samples under the mixture of all adapters (METHODS §10)
        mixed = dispatcher.predict_mixture("test", final)
        preds, own = {c: p for c, (p, _) in mixed.items()}, {c: w for c, (_, w) in mixed.items()}
    else:
        preds = dispatcher.predict("test", final)
    metrics = summarise(fed, preds)
    for row in metrics["clients"]:
        if row["client"] in own:
            row["mixture_own_weight"] = own[row["client"]]  # mean weight its test prompts give its own adapter
    contributors = {c for c in fed.train_clients(strategy)
                    if any(c not in r["failed"] for r in rounds)}
    save_adapters(model, run, fed, strategy, states, contributors, maps)
    models.write(run.path, models.build(
        cfg, run.path, "clients", strategy=f.strategy, loss=f.loss, clients=fed.assignment,
        forget=models.clients_forgetting(f.strategy),
        scoring="mixture" if f.strategy == "mixture" else "client-of-user",
        split=f.split.model_dump() if f.split else None, strategy_allows=models.strategy_allows(f.strategy)))

    # 5. costs and references
    seen = sum(r["samples_seen"] for r in rounds)
    activation_bytes = sum(r["bytes"]["activations"] for r in rounds)
    sp = fed.splits
    metrics.update({k: v for k, v in metrics["overall"].items() if k.startswith(("hr@", "ndcg@"))})
    metrics.update({
        "auc": metrics["overall"]["auc"], "logloss": metrics["overall"]["logloss"],
        "accuracy": metrics["overall"]["accuracy"], "n_test": len(fed.splits.test),
        "method": f"federated {f.strategy}" + (" + fedabc" if f.loss == "fedabc" else ""),
        "strategy": f.strategy, "loss": f.loss, "partition": f.partition, "n_clients": f.clients,
        "runner": runner, "rounds": rounds, "failures": failures,
        "kept_round": next((r["round"] for r in rounds if r.get("kept")), len(rounds)),
        "bytes_per_round": [r["bytes"] for r in rounds],
        "bytes_per_training_sample": activation_bytes / seen if (f.split and seen) else None,
        "client_parameters": counts["client"], "server_parameters": counts["server"],
        "total_parameters": counts["total"], "client_parameter_share": counts["client"] / counts["total"],
        "train_seconds": train_seconds, "seconds_per_round": train_seconds / max(1, len(rounds)),
        "samples_seen": seen, "peak_rss_mb": peak_rss_mb(),
        "n_train": len(sp.train), "n_valid": len(sp.valid),
        "references": (ranking.references(sp.ranking.test, sp.ranking.popularity, cfg.ranking.n_candidates)
                       if cfg.task == "ranking" else
                       baselines.references(sp.dataset, sp.train, sp.test, cfg.data.like_threshold, cfg.seed)),
        "task": cfg.task,
        "model": cfg.model.name, "protocol": cfg.data.protocol, "machine": machine(),
    })
    run.write_metrics(metrics)
    o, b = metrics["overall"], metrics["balance"]
    run.log(f"test AUC {o['auc']:.4f} over {o['n']} samples; per-client AUC std {b['std']:.4f}, min {b['min']:.4f}, "
            f"gap {b['gap']:.4f}; {len(failures)} client failure(s)")
    return metrics


def render_summary(m: dict) -> str:
    """A few lines for the terminal: overall, balance, per-client AUC, costs."""
    o, b = m["overall"], m["balance"]
    lines = [(f"{m['strategy']}{' + fedabc' if m['loss'] == 'fedabc' else ''} ({m['runner']}): test AUC "
             f"{o['auc']:.4f}, logloss {o['logloss']:.4f}, accuracy {o['accuracy']:.4f} (n={o['n']})"),
             f"per-client AUC: std {b['std']:.4f}, min {b['min']:.4f}, gap {b['gap']:.4f}"]
    if "hr@1" in o:
        lines.append(f"ranking: HR@1 {o['hr@1']:.4f}, HR@5 {o['hr@5']:.4f}, NDCG@5 {o['ndcg@5']:.4f}; per-client "
                     f"NDCG@10 std {m['ranking_balance']['std']:.4f}, gap {m['ranking_balance']['gap']:.4f}")
    lines += [f"  client {c['client']}: n_train {c['n_train']}, n_test {c['n_test']}, AUC "
              + ("-" if c["auc"] is None or c["auc"] != c["auc"] else f"{c['auc']:.4f}")
              + (f", HR@1 {c['hr@1']:.4f}" if "hr@1" in c and c["hr@1"] == c["hr@1"] else "") for c in m["clients"]]
    lines.append(f"client parameters {m['client_parameters']:,} of {m['total_parameters']:,} "
                 f"({100 * m['client_parameter_share']:.1f}%); {m['seconds_per_round']:.1f}s per round"
                 + (f"; {m['bytes_per_training_sample']:,.0f} split bytes per training sample"
                    if m.get("bytes_per_training_sample") else ""))
    if m["failures"]:
        lines.append(f"{len(m['failures'])} client failure(s): " + "; ".join(
            f"round {x['round']} client {x['client']}" for x in m["failures"]))
    return "\n".join(lines)
