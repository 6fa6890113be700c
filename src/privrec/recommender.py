"""Open a model directory of any kind for what uses a model (evaluate, recommend, unlearn, serve): its
manifest, its config, the data it may still see (minus everything it forgot), one scorer for its kind, and
:class:`Recommender`, the one recommend function (``privrec recommend`` builds one for one user; the service,
:mod:`privrec.serve`, keeps one for every request and builds a new one after each deletion).

A scorer answers P(Yes) for like-prompt samples, whatever the kind:

- ``single`` / ``student``: the one adapter (a student with the LoRA it was saved with);
- ``shards``: the K shard adapters under the model's primary aggregation (METHODS §4: APA(D) / APA(ND)
  weights from the untuned model's nearest validation samples, uniform, or SISA's mean);
- ``clients``: each sample scored with the adapter of the client that holds its user (METHODS §2); under
  strategy ``mixture``, with the APA mixture of every client's adapter weighted on that client's own
  validation samples (METHODS §10).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from privrec import models
from privrec.candidates import SOURCES, CandidateGenerator
from privrec.config import ExperimentConfig, LoraConfig, apply_overrides, parse_config
from privrec.data import Dataset, Sample, Splits, load_dataset
from privrec.errors import RunError, UserError
from privrec.federated.config import FederatedConfig
from privrec.model.adapters import install_adapter, load_adapter_state, read_adapter
from privrec.model.recmodel import PrefixGroup, RecLM
from privrec.prepare import (
    build_model,
    collab_features,
    item_stats,
    setup_data,
    user_interactions,
    without_interactions,
)
from privrec.rundir import LEDGER_FILE, RunDir
from privrec.unlearning.approx.task import UnlearnConfig
from privrec.unlearning.exact.ledger import Ledger, deletion_record, last_request_of, user_requests
from privrec.unlearning.exact.shards import ApaConfig

CONFIG_OF: dict[str, type[ExperimentConfig]] = {"single": ExperimentConfig, "shards": ApaConfig,
                                                "clients": FederatedConfig, "student": UnlearnConfig}


@dataclass
class ModelDir:
    """A model directory opened for use: what it is and what it may still see."""

    run: RunDir
    manifest: models.Manifest
    cfg: ExperimentConfig
    tombstones: set[tuple[int, int]] = field(default_factory=set)
    deleted_by: dict[int, str] = field(default_factory=dict)  # user -> the deletion request that removed them

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def splits(self) -> Splits:
        """The protocol's splits of the model's config, minus every sample showing a deleted interaction."""
        return setup_data(self.cfg, self.tombstones)

    def seen(self, ds: Dataset) -> Dataset:
        """The dataset without the interactions the model forgot."""
        return without_interactions(ds, self.tombstones)

    def check_user(self, ds: Dataset, user: int) -> None:
        """Raises: UserError for a user whose data the model forgot, or one it never had."""
        if user in self.deleted_by:
            raise UserError(f"user {user} was forgotten by deletion request {self.deleted_by[user]}: their data "
                            f"is gone from {self.run.path}, so it recommends nothing for them")
        if self.kind == "student" and user in self.manifest.forgotten_users:
            raise UserError(f"user {user} was unlearnt by {self.run.path} (privrec unlearn "
                            f"--method {self.manifest.method}): it recommends nothing for them")
        if not (ds.inter["user_id"] == user).any():
            raise UserError(f"user {user} not found in {ds.name}")

    def adapter_state(self, record: models.AdapterRecord) -> tuple[dict[str, torch.Tensor], dict]:
        return read_adapter(self.run / record.path)

    def require_adapters(self) -> None:
        if not self.manifest.adapters:
            raise RunError(f"{self.run.path} has no adapters left (every sample they held was deleted)")


def open_model(path: str | Path, overrides: list[str] | None = None, pending_ok: bool = False) -> ModelDir:
    """The model directory at ``path``, its config (``--set`` overrides applied) and its deletion record.

    ``pending_ok``: open it although deletion requests are unfinished, their interactions counted as deleted
    (the service, which refuses their users itself while its worker applies them, METHODS §11).

    Raises:
        RunError: not a model directory, a bad manifest, or a deletion request still unfinished (the adapters
            on disk may still hold the data it deletes) without ``pending_ok``.
        ConfigError: a bad override.
    """
    manifest = models.load(path)
    run = RunDir(path, create=False)
    cls = CONFIG_OF[manifest.kind]
    cfg = run.load_config(cls=cls)
    if overrides:
        cfg = parse_config(apply_overrides(cfg.model_dump(), overrides), cls)
    md = ModelDir(run, manifest, cfg)
    rows = accepted_deletions(run.path) if pending_ok else deletion_record(run.path)
    if manifest.kind == "student" and Path(manifest.original).is_dir():  # what its original forgot, it forgot
        rows += deletion_record(manifest.original)
    md.tombstones = {(r["user_id"], r["item_id"]) for r in rows}
    unlearnt = manifest.kind == "student" and cfg.shows_labels  # its prompts' features were counted without them
    ds = load_dataset(cfg.data.source, cfg.data.path) if rows or unlearnt else None
    if rows:  # a user every one of whose interactions is deleted is forgotten
        inter = ds.inter
        counts = inter.groupby("user_id").size()
        deleted = Counter(u for u, _ in md.tombstones)
        last = last_request_of(rows)
        md.deleted_by = {u: last[u] for u, n in deleted.items() if n >= int(counts.get(u, 0))}
        # a user a whole-user request deleted stays forgotten in a later copy of the source: rows of theirs that
        # reappear there (a newer export) are left out like the deleted ones (issue 31; privrec data status)
        whole = user_requests(run.path) & set(deleted)
        if manifest.kind == "student" and Path(manifest.original).is_dir():
            whole |= user_requests(manifest.original) & set(deleted)
        for u in whole:
            md.deleted_by.setdefault(u, last[u])
        back = inter[inter["user_id"].isin(whole)]
        md.tombstones |= set(zip(back["user_id"].tolist(), back["item_id"].tolist()))
    if unlearnt:  # after the deletion requests' own accounting: these users were unlearnt, not deleted
        md.tombstones |= user_interactions(ds, manifest.forgotten_users)
    return md


def accepted_deletions(path: str | Path) -> list[dict]:
    """The tombstone rows of every accepted deletion request, finished or not (none without a ledger)."""
    if not (Path(path) / LEDGER_FILE).is_file():
        return []
    ledger = Ledger(Path(path) / LEDGER_FILE, create=False)
    try:
        return ledger.tombstone_rows()
    finally:
        ledger.close()


# --- one scorer per kind -----------------------------------------------------------------------------------
class OneAdapter:
    """single / student: the model with its one adapter installed (``model`` scores prompts directly)."""

    def __init__(self, md: ModelDir, splits: Splits):
        md.require_adapters()
        record = md.manifest.adapters[0]
        state, meta = md.adapter_state(record)
        lora = LoraConfig(**meta["lora"]) if meta.get("lora") else None  # a student keeps its own LoRA
        self.model = build_model(md.cfg, splits.dataset, lora=lora, stats=item_stats(md.cfg, splits),
                                 collab=collab_features(md.cfg, splits))
        install_adapter(self.model, md.run / record.path, state, meta, md.cfg.model.name)
        self.batch_size = md.cfg.train.eval_batch_size

    def model_for(self, user: int) -> RecLM:
        return self.model

    def score(self, samples: list[Sample], progress: bool = True) -> np.ndarray:
        return self.model.score(self.model.encode(samples), self.batch_size, progress)


class _Clients:
    """clients: one shared model, every client's adapter, and which client holds which user."""

    def __init__(self, md: ModelDir, splits: Splits):
        from privrec.federated.runner import build_model as build_federated

        md.require_adapters()
        self.md, self.splits = md, splits
        self.model = build_federated(md.cfg, splits)
        self.states = {int(a.name.split("-")[1]): md.adapter_state(a)[0] for a in md.manifest.adapters}
        self.batch_size = md.cfg.train.eval_batch_size
        self._features: dict[int, tuple | None] = {}

    def features(self, c: int) -> tuple | None:
        """The counted features client ``c``'s prompts show (METHODS §12): counted over what remains of its own
        data (:func:`~privrec.federated.client.client_pool`; a centralised model's one client: everyone's), never
        over deleted or other clients' data; None when the prompts read none."""
        from privrec.federated.client import POOLED, client_features, client_pool

        if c not in self._features:
            m = self.md.manifest
            counted = client_pool(self.md.cfg, self.splits, m.clients, POOLED if m.strategy == "centralised" else c)
            self._features[c] = client_features(self.md.cfg, counted)
        return self._features[c]

    def encode(self, c: int, samples: list[Sample]) -> list:
        """``samples`` rendered as client ``c``'s prompts (under its features)."""
        with self.model.features_of(self.features(c)) if self.md.cfg.shows_labels else contextlib.nullcontext():
            return self.model.encode(samples)

    def client_of(self, user: int) -> int:
        c = self.md.manifest.clients.get(user)
        if c is None:
            raise UserError(f"user {user} belongs to no client of {self.md.run.path} (its clients hold "
                            f"{len(self.md.manifest.clients)} users)")
        return c

    def by_client(self, samples: list[Sample]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, s in enumerate(samples):
            out.setdefault(self.client_of(s.user_id), []).append(i)
        return dict(sorted(out.items()))


class ClientMixture(_Clients):
    """clients, strategy mixture (METHODS §10): a user's prompts are scored with the APA mixture of every
    remaining client's adapter, weighted on the validation samples of the user's client (minus deleted ones)."""

    def __init__(self, md: ModelDir, splits: Splits):
        super().__init__(md, splits)
        self._pools: dict[int, object] = {}

    def valid_of(self, c: int) -> list[Sample]:
        return [s for s in self.splits.valid if self.md.manifest.clients.get(s.user_id) == c]

    def pool(self, c: int, progress: bool):
        from privrec.federated.mixture import client_pool

        if c not in self._pools:
            self._pools[c] = client_pool(self.model, self.encode(c, self.valid_of(c)), list(self.states.values()),
                                         self.batch_size, progress)
        return self._pools[c]

    def score(self, samples: list[Sample], progress: bool = True) -> np.ndarray:
        from privrec.federated.mixture import mixture_scores
        from privrec.unlearning.exact.apa import self_in_pool

        out = np.zeros(len(samples))
        states = list(self.states.values())  # in client order (the manifest's adapters are sorted)
        for c, idx in self.by_client(samples).items():
            mine = [samples[i] for i in idx]
            out[idx] = mixture_scores(self.model, self.encode(c, mine), self.pool(c, progress), states,
                                      self.md.cfg.federated, self.batch_size, progress,
                                      exclude=self_in_pool([s.sample_id for s in mine],
                                                           [s.sample_id for s in self.valid_of(c)]))[0]
        return out


class ClientAdapters(_Clients):
    """clients: a sample is scored with the adapter of the client holding its user."""

    def model_for(self, user: int) -> RecLM:
        """The model holding the adapter of the user's client."""
        return self._client(self.client_of(user))

    def _client(self, c: int) -> RecLM:
        """The model with client ``c``'s adapter and, when prompts read counted features, its features."""
        load_adapter_state(self.model.model, self.states[c])
        if self.md.cfg.shows_labels:
            self.model.set_features(self.features(c))
        return self.model

    def score(self, samples: list[Sample], progress: bool = True) -> np.ndarray:
        out = np.zeros(len(samples))
        for c, idx in self.by_client(samples).items():
            m = self._client(c)
            out[idx] = m.score(m.encode([samples[i] for i in idx]), self.batch_size, progress)
        return out


class ShardAggregation:
    """shards: the K shard adapters under the model's primary aggregation (the neighbour pool of APA(D) /
    APA(ND) is the model's validation samples, minus deleted ones, as in shard-train)."""

    def __init__(self, md: ModelDir, splits: Splits):
        from privrec.unlearning.exact.shards import build_model as build_shard_model
        from privrec.unlearning.exact.shards import users_of

        md.require_adapters()
        self.md, self.cfg, self.splits = md, md.cfg, splits
        self.model, _ = build_shard_model(md.cfg, splits)
        read = [md.adapter_state(a) for a in md.manifest.adapters]
        self.states = [state for state, _ in read]
        self.shard_users = users_of([meta for _, meta in read], splits.train)  # shards.own_weight
        self.batch_size = md.cfg.train.eval_batch_size
        self._pool = None

    def use_states(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        """Score with ``states`` in place of the adapters at those positions (an approximate answer, METHODS §13);
        the validation pool's scores, which are the adapters', are computed again."""
        for k, state in states.items():
            self.states[k] = state
        self._pool = None

    def pool(self, progress: bool):
        """(features, per-adapter P(Yes)) of the validation pool, computed once."""
        from privrec.unlearning.exact.apa import score_each
        from privrec.unlearning.exact.shards import load_features

        if self._pool is None:
            va = self.model.encode(self.splits.valid)
            self._pool = (load_features(self.md.run, self.model, self.cfg, va, progress),
                          score_each(self.model, va, self.states, self.batch_size, progress))
        return self._pool

    def score(self, samples: list[Sample], progress: bool = True, aggregation: str | None = None,
              own_samples: bool = False) -> np.ndarray:
        """P(Yes) under ``aggregation`` (default: the primary). ``own_samples``: the samples are the model's
        own (its splits), so their untuned features may come from and go to the run's feature cache; other
        prompts (a user's candidates) are computed fresh, never cached under a sample id they do not own."""
        from privrec.unlearning.exact.apa import aggregate, apa_weights, self_in_pool
        from privrec.unlearning.exact.shards import load_features, own_of

        name = aggregation or self.md.manifest.primary
        items = self.model.encode(samples)
        omega = None
        if name in ("apa-d", "apa-nd"):
            f_pool, per_pool = self.pool(progress)
            if own_samples:
                f = load_features(self.md.run, self.model, self.cfg, items, progress)
            else:
                with self.model.adapter_disabled():
                    f = self.model.last_hidden(items, self.cfg.shards.features, self.batch_size, progress)
            s = self.cfg.shards
            omega = apa_weights(f, f_pool, per_pool, [x.label for x in self.splits.valid], s.neighbours, s.tau,
                                s.error, self_in_pool([x.sample_id for x in samples],
                                                      [x.sample_id for x in self.splits.valid]))
        return aggregate(self.model, name, items, self.states, omega=omega, batch_size=self.batch_size,
                         progress=progress, own=own_of(self.cfg, [x.user_id for x in samples], self.shard_users),
                         own_weight=self.cfg.shards.own_weight)


def scorer_of(md: ModelDir, splits: Splits):
    """The scorer of the model's kind."""
    if md.kind == "clients" and md.manifest.scoring == "mixture":
        return ClientMixture(md, splits)
    return {"single": OneAdapter, "student": OneAdapter, "shards": ShardAggregation,
            "clients": ClientAdapters}[md.kind](md, splits)


# --- recommending ----------------------------------------------------------------------------------------
class Recommender:
    """A model directory opened for recommending: its scorer, the data it may still see, and (built on first
    use) the candidate generator over that data.

    ``pending_ok``: open it although deletion requests are unfinished (the service; their interactions are
    left out of everything it sees). Scoring holds :attr:`lock` (one model, one scorer at a time).

    Raises:
        RunError: not a model directory, an unfinished deletion request (without ``pending_ok``).
    """

    def __init__(self, run_path: str | Path, pending_ok: bool = False, progress: bool = False):
        self.md = open_model(run_path, pending_ok=pending_ok)
        self.splits = self.md.splits()
        self.cfg = self.md.cfg
        self.ds = self.md.seen(self.splits.dataset)  # the interactions it may still see
        self.scorer = scorer_of(self.md, self.splits)
        self.progress = progress
        self.lock = threading.Lock()
        self._generator: CandidateGenerator | None = None
        self._by_user = {int(u): rows for u, rows in self.ds.inter.groupby("user_id", sort=False)}
        self.digest = ",".join(a.tensors_sha256 or "" for a in self.md.manifest.adapters)
        self.approximate: str | None = None  # the deletion request whose approximate adapters it scores with

    def __getstate__(self) -> dict:  # shipped to a Ray worker (the store fill): a lock does not travel
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    @property
    def generator(self) -> CandidateGenerator:
        if self._generator is None:
            self._generator = CandidateGenerator(self.ds.inter, self.ds.items, self.cfg.seed)
        return self._generator

    def users(self) -> list[int]:
        """Every user it can recommend for (enough remaining history, not forgotten)."""
        return sorted(u for u, rows in self._by_user.items()
                      if len(rows) >= self.cfg.data.history_len and u not in self.md.deleted_by)

    def check_item(self, item: int) -> None:
        """Raises: UserError for an item the data source does not have."""
        if item not in self.ds.items:
            raise UserError(f"item {item} not found in {self.ds.name}")

    def history(self, user: int) -> tuple[tuple[tuple[int, float], ...], set[int], int]:
        """(the prompt's history, every item the user rated, their last timestamp), from the remaining data.

        Raises:
            UserError: unknown or forgotten user, or too short a history.
        """
        self.md.check_user(self.splits.dataset, user)
        rows = self._by_user.get(user)
        n = self.cfg.data.history_len
        if rows is None or len(rows) < n:
            raise UserError(f"user {user} has {0 if rows is None else len(rows)} ratings; the prompt needs {n}")
        hist = tuple((int(i), float(r)) for i, r in zip(rows["item_id"].tail(n), rows["rating"].tail(n)))
        return hist, set(rows["item_id"].tolist()), int(rows["timestamp"].max())

    def candidates(self, user: int, seen: set[int], two_stage: int | None, max_candidates: int | None,
                   source: str = "popularity") -> list[int]:
        """Two stages: the generator's ``two_stage`` items from ``source`` (:data:`privrec.candidates.SOURCES`);
        else every unseen item, most popular first (the
        ``max_candidates`` most popular of them)."""
        if two_stage:
            return self.generator.candidates(user, seen, two_stage, source)
        popularity = self.ds.inter["item_id"].value_counts()
        ranked = [int(i) for i in popularity.index if int(i) not in seen]
        ranked += sorted(i for i in self.ds.items if i not in seen and i not in set(ranked))
        return ranked[:max_candidates] if max_candidates else ranked

    def p_yes(self, user: int, items: list[int], shared_prefix: bool = True) -> np.ndarray:
        """P(Yes) of the like-prompt of each item for ``user`` (their history from the remaining data).

        With one adapter per user's prompts (single, student, clients), every item's like-prompt shares the
        user's prefix: it runs once and the items' suffixes are scored against its key-value cache in chunks
        (``RecLM.score_groups``; ``shared_prefix=False`` scores every full prompt instead). A shards model
        scores the full prompts under its aggregation.

        Raises:
            UserError: unknown or forgotten user, too short a history, an unknown item.
        """
        hist, _, t_last = self.history(user)
        for i in items:
            self.check_item(i)
        return self.p_yes_given(user, items, hist, t_last, shared_prefix)

    def p_yes_given(self, user: int, items: list[int], hist: tuple[tuple[int, float], ...], t_last: int,
                    shared_prefix: bool = True) -> np.ndarray:
        """:meth:`p_yes` with the prompt's history given (e.g. the ranking protocol's, before a held-out item)."""
        samples = [Sample(f"u{user}-i{i}", user, i, t_last, 0.0, 0, hist) for i in items]
        if not samples:
            return np.zeros(0)
        with self.lock:
            if hasattr(self.scorer, "model_for"):
                model, rc = self.scorer.model_for(user), self.cfg.ranking
                [z] = model.score_groups([PrefixGroup.of(model.encode(samples))], "yes", shared=shared_prefix,
                                         prefix_batch=1, max_suffixes=rc.max_suffixes,
                                         batch_size=self.cfg.train.eval_batch_size, progress=self.progress)
                return 1.0 / (1.0 + np.exp(-z))
            return np.asarray(self.scorer.score(samples, self.progress))

    def recommend(self, user: int, top: int = 10, two_stage: int | None = None, max_candidates: int | None = None,
                  blend: float = 0.0, shared_prefix: bool = True, source: str = "popularity") -> list[dict]:
        """The user's ``top`` items: candidates (see :meth:`candidates`) ordered by P(Yes).

        ``blend`` (two stages only) in [0, 1] orders by ``(1 - blend) * rank by P(Yes) + blend * rank in the
        candidate list`` instead (0: the LLM's order; 1: the candidate generator's), ties by candidate order.

        Raises:
            UserError: see :meth:`p_yes`; ``top`` < 1.
        """
        if top < 1:
            raise UserError(f"top must be at least 1, got {top}")
        _, seen, _ = self.history(user)
        items = self.candidates(user, seen, two_stage, max_candidates, source)
        probs = self.p_yes(user, items, shared_prefix)
        order = blended_order(probs, blend if two_stage else 0.0)[:top]
        its, sch = self.ds.items, self.ds.schema
        return [{"rank": r + 1, "item_id": items[i], "title": its[items[i]].title,
                 "year": sch.suffix(its[items[i]]), "fields": sch.shown(its[items[i]]), "p_yes": float(probs[i])}
                for r, i in enumerate(order)]


def blended_order(scores: np.ndarray, blend: float) -> np.ndarray:
    """Indices, best first, by ``(1 - blend) * rank of score (0 = highest) + blend * index`` (ties: index)."""
    n = len(scores)
    by_score = np.empty(n)
    by_score[np.argsort(-scores, kind="stable")] = np.arange(n)
    key = (1.0 - blend) * by_score + blend * np.arange(n)
    return np.lexsort((np.arange(n), key))


def check_source(source: str) -> None:
    """Raises: UserError for a candidate source that does not exist."""
    if source not in SOURCES:
        raise UserError(f"--candidate-source must be one of {', '.join(SOURCES)}, got {source!r}")
