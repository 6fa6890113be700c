"""``privrec recommend MODEL --user U``: rank the user's unrated items by P(Yes), with any kind of model.

The user's latest ratings (minus any the model forgot) are the prompt's history. The candidates are either
every item the user has not rated, most popular first (``--max-candidates N``: the N most popular of them),
or, in two stages (METHODS §11, ``--candidates C``), the C unseen items that popularity and matrix
factorisation over the remaining data propose (:mod:`privrec.candidates`), re-ranked by P(Yes). A one-adapter
model scores them with its adapter, a clients model with the adapter of the client that holds the user
(METHODS §2), a shards model with its primary aggregation (METHODS §4). A user whose data the model forgot
is refused.

:class:`Recommender` is the one recommend function: ``privrec recommend`` builds one for one user, the
service (:mod:`privrec.serve`) keeps one for every request and builds a new one after each deletion.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from privrec.candidates import SOURCES, CandidateGenerator
from privrec.commands.model_dir import open_model, scorer_of
from privrec.data import Sample
from privrec.errors import UserError
from privrec.model.recmodel import PrefixGroup


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
        return [{"rank": r + 1, "item_id": items[i], "title": self.ds.items[items[i]].title,
                 "year": self.ds.items[items[i]].year, "p_yes": float(probs[i])} for r, i in enumerate(order)]


def blended_order(scores: np.ndarray, blend: float) -> np.ndarray:
    """Indices, best first, by ``(1 - blend) * rank of score (0 = highest) + blend * index`` (ties: index)."""
    n = len(scores)
    by_score = np.empty(n)
    by_score[np.argsort(-scores, kind="stable")] = np.arange(n)
    key = (1.0 - blend) * by_score + blend * np.arange(n)
    return np.lexsort((np.arange(n), key))


def run_recommend(run_path: str | Path, user: int, top: int = 10, max_candidates: int | None = None,
                  progress: bool = True, shared_prefix: bool = True, candidates: int | None = None,
                  blend: float = 0.0, source: str = "popularity") -> list[dict]:
    """Rank the user's unrated items by P(Yes) given the user's latest history (see :class:`Recommender`).

    ``candidates``: two stages, C items from popularity + MF re-ranked by P(Yes) (METHODS §11).

    Raises:
        UserError: unknown user, a user the model forgot (or a clients model holds no client for), or a user
            with too short a history. RunError: not a model directory, an unfinished deletion request.
    """
    if max_candidates and candidates:
        raise UserError("give --max-candidates or --candidates, not both")
    check_source(source)
    rec = Recommender(run_path, progress=progress)
    return rec.recommend(user, top, two_stage=candidates, max_candidates=max_candidates, blend=blend,
                         shared_prefix=shared_prefix, source=source)


def check_source(source: str) -> None:
    """Raises: UserError for a candidate source that does not exist."""
    if source not in SOURCES:
        raise UserError(f"--candidate-source must be one of {', '.join(SOURCES)}, got {source!r}")
