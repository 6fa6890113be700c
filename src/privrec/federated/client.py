"""One client's update: its own samples through the shared training loop (DESIGN.md: one trainer).

A client holds only its users' samples (METHODS §2). A round loads the state the strategy gave it into
the model's one LoRA adapter, runs ``train.epochs`` local epochs of :func:`privrec.train.train` on the
round's samples (all of them; with ``federated.slices``, the slices that round sees: :mod:`.slicing`) (with
FedProx's proximal term as the loop's ``regularizer`` and FedABC's balanced batches as its ``batch_plan``),
and reports the new state, the last epoch's mean training loss and its sample count. Scoring uses the one
scorer. Both the in-process runner and the Flower ClientApp call exactly these methods.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from privrec.data import Sample
from privrec.federated.fedabc import fedabc_plan
from privrec.federated.slicing import checkpoint_after, client_slices, first_round, slices_seen, stage_pool
from privrec.federated.strategies import Instructions, State, Update
from privrec.metrics import binary_metrics, ranking_metrics, ranks_by_group
from privrec.model.adapters import adapter_state, load_adapter_state
from privrec.model.recmodel import RecLM
from privrec.prepare import counted_features, features_block, labelled_pool
from privrec.train import bce_loss, train
from privrec.unlearning.exact.slices import cumulative


@dataclass
class FitResult:
    update: Update
    seconds: float
    samples_seen: int
    split_bytes: int  # bytes that crossed the split channel during training (0 without a split)


@dataclass
class Predictions:
    probs: np.ndarray  # (n,) P(Yes)
    labels: np.ndarray  # (n,) 0/1
    users: np.ndarray  # (n,) user ids


@dataclass
class ClientMetrics:
    """A client's metrics of one split, computed on the client from its own scores (:func:`split_metrics`): what
    a Flower evaluation reply carries unless ``federated.pooled_scores`` asks for the scores themselves."""

    values: dict[str, float]


def split_metrics(p: Predictions, ranked: bool = False) -> dict[str, float]:
    """AUC, LogLoss, accuracy, positive rate and ``n``; UAUC with ``uauc_users`` (the users with both labels
    it averages over); with ``ranked``, HR@K / NDCG@K of the users' rankings, ``n_ranked`` (the rankings they
    average over) and ``n_test_users``. The counts let the server combine clients' means exactly
    (:func:`privrec.federated.runner.overall_from_clients`)."""
    if not len(p.labels):
        out = {"auc": float("nan"), "n": 0}
    else:
        out = binary_metrics(p.labels, p.probs, p.users)
        _, inv = np.unique(p.users, return_inverse=True)
        pos, count = np.bincount(inv, weights=p.labels), np.bincount(inv)
        out["uauc_users"] = int(((pos > 0) & (pos < count)).sum())
    if ranked:
        ranks = ranks_by_group(p.users, p.labels, p.probs)
        out.update(ranking_metrics(ranks), n_ranked=len(ranks), n_test_users=len(set(p.users.tolist())))
    return out


def round_seed(seed: int, rnd: int) -> int:
    """Every client of round t trains with the same seed (identical clients stay identical)."""
    return seed * 1000 + rnd


def proximal_term(model: RecLM, mu: float):
    """FedProx: mu/2 * ||theta - theta_global||^2 over the trainable (LoRA) weights, theta_global = now."""
    params = model.trainable_parameters()
    anchors = [p.detach().clone() for p in params]

    def regularizer() -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))

    return regularizer


def _channel_bytes(model: RecLM) -> int:
    ch = getattr(model, "channel", None)
    return ch.total_bytes if ch is not None else 0


POOLED = -1  # the centralised reference's one "client": the union of every client's data


def client_pool(cfg, splits, assignment: dict[int, int], client: int) -> list[Sample]:
    """What client ``client``'s counted features are counted over (METHODS §12): its own users' share of the
    protocol's labelled pool (:func:`~privrec.prepare.labelled_pool`: their training windows, not only the
    drawn ones; POOLED: the whole pool). A user on no client is counted by none."""
    pool = labelled_pool(cfg, splits)
    return pool if client == POOLED else [s for s in pool if assignment.get(s.user_id) == client]


def client_features(cfg, counted: list[Sample]) -> tuple | None:
    """The counted features (METHODS §12) a client's prompts show: counted over its own data alone
    (:func:`client_pool`), so no label crosses clients (None when the prompts read none)."""
    return counted_features(cfg, counted) if cfg.shows_labels else None


def features_record(cfg, by_client: dict[int, list[Sample]]) -> dict | None:
    """The ``features`` record of a client adapter whose prompts read counted features (None when they read
    none): for each client whose prompts it trained on (``by_client``: its :func:`client_pool`; POOLED the
    centralised reference's one client), what its features were counted over (count, lineage hash: part of the
    adapter's lineage) and their digest; ``privrec forget --verify`` recomputes them."""
    if not cfg.shows_labels:
        return None
    blocks = {str(c): features_block(cfg, samples, "the client's own data",
                                     client_features(cfg, samples)) for c, samples in sorted(by_client.items())}
    uses = next(iter(blocks.values()))["uses"] if blocks else []
    return {"uses": uses, "counted_over": "each client's own data (its users' share of the training pool)",
            "clients": {c: {k: b[k] for k in ("n_samples", "lineage_sha256", "digest")} for c, b in blocks.items()}}


class FederatedClient:
    """A client: an id, its samples (tokenised once) and the shared model it borrows for its turn.

    ``slices``: its slice map under ``federated.slices`` (default: cut from ``train_samples``; a deletion's
    replay passes the model's map without the deleted samples). Prompts that read counted features show the
    client's own, counted over ``counted`` (its :func:`client_pool`; default its training samples), in training
    and in scoring; a sliced client's rounds before its last stage show those counted over the users of the
    slices they see (:meth:`stage_counted`)."""

    def __init__(self, cid: int, model: RecLM, train_samples: list[Sample], valid: list[Sample],
                 test: list[Sample], cfg, progress: bool = False, slices: list[list[str]] | None = None,
                 counted: list[Sample] | None = None):
        self.cid, self.model, self.cfg, self.progress = cid, model, cfg, progress
        self.samples = {"train": train_samples, "valid": valid, "test": test}
        self.counted = train_samples if counted is None else counted
        self.features = client_features(cfg, self.counted)
        with model.features_of(self.features) if cfg.shows_labels else contextlib.nullcontext():
            self.items = {k: model.encode(v) for k, v in self.samples.items()}
        self._features: dict[str, np.ndarray] = {}  # split -> untuned features (the mixture's, computed once)
        fed = getattr(cfg, "federated", None)
        self.slices = slices if slices is not None else client_slices(train_samples, fed.slices if fed else 1)
        self._stage_items: dict[int, list] = {}  # stage -> its training prompts under its own counted features

    def stage_counted(self, s: int) -> list[Sample]:
        """What stage ``s``'s counted features are counted over (:func:`.slicing.stage_pool`)."""
        return stage_pool(self.counted, self.samples["train"], self.slices, s)

    @property
    def n_train(self) -> int:
        return len(self.items["train"])

    def round_items(self, rnd: int) -> list:
        """The encoded training samples round ``rnd`` trains on (all, or its slices)."""
        if self.slices is None:
            return self.items["train"]
        r = len(self.slices)
        s = slices_seen(rnd, r, self.cfg.federated.rounds)
        keep = set(cumulative(self.slices, s))
        if not self.cfg.shows_labels or s == r:
            return [e for e, x in zip(self.items["train"], self.samples["train"]) if x.sample_id in keep]
        if s not in self._stage_items:  # METHODS §12: counted over the users of the slices this round sees
            with self.model.features_of(client_features(self.cfg, self.stage_counted(s))):
                self._stage_items[s] = self.model.encode([x for x in self.samples["train"] if x.sample_id in keep])
        return self._stage_items[s]

    def training_items(self) -> list[list]:
        """Every list of prompts the client's rounds train on: its training prompts and, for a sliced client whose
        prompts read counted features, each earlier stage's (rendered under that stage's features)."""
        if self.slices is None or not self.cfg.shows_labels:
            return [self.items["train"]]
        r, rounds = len(self.slices), self.cfg.federated.rounds
        return [self.round_items(first_round(s, r, rounds)) for s in range(1, r)] + [self.items["train"]]

    def fit(self, state: State, ins: Instructions) -> FitResult:
        """Local epochs from ``state`` on the round's samples; returns the new state and the last epoch's mean
        loss (a round with no sample, a slice emptied by deletions, leaves the state as it was)."""
        m, f = self.model, self.cfg.federated
        items = self.round_items(ins.rnd)
        if not items:
            return FitResult(Update(state, float("nan"), 0), 0.0, 0, 0)
        load_adapter_state(m.model, state)
        regularizer = proximal_term(m, ins.mu) if ins.mu > 0 else None
        plan = None
        if f.loss == "fedabc":
            plan = fedabc_plan(lambda items: m.score_logits(items, self.cfg.train.eval_batch_size, progress=False),
                               self.cfg.train.batch_size, f.fedabc_ratio, f.fedabc_hard)
        tcfg = self.cfg.train.model_copy(update={"checkpoint": False})
        before = _channel_bytes(m)
        t0 = time.perf_counter()
        res = train(m, items, tcfg, ins.seed, valid=None, loss_fn=bce_loss, regularizer=regularizer,
                    batch_plan=plan, lr_scale=ins.lr_scale, progress=self.progress)
        seconds = time.perf_counter() - t0
        loss = res.history[-1]["train_loss"] if res.history else float("nan")
        return FitResult(Update(adapter_state(m.model), float(loss), len(items)), seconds, res.samples_seen,
                         _channel_bytes(m) - before)

    def train_alone(self, init: State, first: int = 0,
                    on_checkpoint: Callable[[int, State], None] | None = None) -> tuple[State, float]:
        """Rounds ``first``.. of the run on this client's own samples, from ``init`` (the state before round
        ``first``), with the run's round seeds and no aggregation (what a ``local`` / ``mixture`` client does):
        (the final state, training seconds). A sliced client calls ``on_checkpoint(s, state)`` after each round
        whose state is its checkpoint ``stage-s`` (:func:`.slicing.checkpoint_after`). A deletion retrains a
        client this way (METHODS §10; from the checkpoint before the first round that saw the deleted slice),
        here or on the Flower node holding it."""
        state, seconds = init, 0.0
        rounds = self.cfg.federated.rounds
        for rnd in range(first, rounds):
            res = self.fit(state, Instructions(rnd=rnd, seed=round_seed(self.cfg.seed, rnd)))
            state, seconds = res.update.state, seconds + res.seconds
            s = checkpoint_after(rnd, len(self.slices), rounds) if self.slices else None
            if s is not None and on_checkpoint is not None:
                on_checkpoint(s, state)
        return state, seconds

    def predict_mixture(self, states: dict[int, State], split: str) -> tuple[Predictions, np.ndarray]:
        """P(Yes) of this client's ``split`` samples under the APA mixture of every client's adapter in ``states``,
        weighted on this client's own validation samples (METHODS §10); with the (n, K) weights, K in sorted
        client order. The untuned features are computed once per client."""
        from privrec.federated.mixture import client_pool, mixture_scores, untuned_features
        from privrec.unlearning.exact.apa import self_in_pool

        items, bs = self.items[split], self.cfg.train.eval_batch_size
        labels = np.array([e.label for e in items], dtype=np.float64)
        users = np.array([s.user_id for s in self.samples[split]], dtype=np.int64)
        order = [states[c] for c in sorted(states)]
        feats = self._features
        for name in ("valid", split):
            if name not in feats:
                feats[name] = untuned_features(self.model, self.items[name], bs, self.progress)
        pool = client_pool(self.model, self.items["valid"], order, bs, self.progress, feats["valid"])
        mine = self_in_pool([x.sample_id for x in self.samples[split]], [x.sample_id for x in self.samples["valid"]])
        probs, omega = mixture_scores(self.model, items, pool, order, self.cfg.federated, bs, self.progress,
                                      feats[split], mine)  # scoring valid: a sample is not its own neighbour
        return Predictions(probs, labels, users), omega

    def predict(self, state: State, split: str) -> Predictions:
        """P(Yes) of this client's ``split`` samples under ``state`` (empty when it has none)."""
        items = self.items[split]
        labels = np.array([e.label for e in items], dtype=np.float64)
        users = np.array([s.user_id for s in self.samples[split]], dtype=np.int64)
        if not items:
            return Predictions(np.zeros(0), labels, users)
        load_adapter_state(self.model.model, state)
        probs = self.model.score(items, self.cfg.train.eval_batch_size, progress=self.progress)
        return Predictions(probs, labels, users)
