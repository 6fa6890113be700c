"""``privrec recommend MODEL --user U``: rank the user's unrated items by P(Yes), with any kind of model.

The user's latest ratings (minus any the model forgot) are the prompt's history; the candidates are every
item the user has not rated, most popular first. A one-adapter model scores them with its adapter, a
clients model with the adapter of the client that holds the user (METHODS §2), a shards model with its
primary aggregation (METHODS §4). A user whose data the model forgot is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privrec.commands.model_dir import open_model, scorer_of
from privrec.data import Sample
from privrec.errors import UserError
from privrec.model.recmodel import PrefixGroup


def run_recommend(run_path: str | Path, user: int, top: int = 10, max_candidates: int | None = None,
                  progress: bool = True, shared_prefix: bool = True) -> list[dict]:
    """Rank the user's unrated items by P(Yes) given the user's latest history.

    With one adapter per user's prompts (single, student, clients), every candidate's like-prompt shares the
    user's prefix: it runs once and the candidates' suffixes are scored against its key-value cache in
    chunks (``shared_prefix=False`` scores every full prompt instead). A shards model scores the full prompts
    under its aggregation.

    Raises:
        UserError: unknown user, a user the model forgot (or a clients model holds no client for), or a user
            with too short a history. RunError: not a model directory, an unfinished deletion request.
    """
    md = open_model(run_path)
    splits = md.splits()
    md.check_user(splits.dataset, user)
    cfg, ds = md.cfg, md.seen(splits.dataset)
    rows = ds.inter[ds.inter["user_id"] == user]
    if len(rows) < cfg.data.history_len:
        raise UserError(f"user {user} has {len(rows)} ratings; the prompt needs {cfg.data.history_len}")
    hist = tuple((int(i), float(r)) for i, r in zip(rows["item_id"].tail(cfg.data.history_len),
                                                     rows["rating"].tail(cfg.data.history_len)))
    seen = set(rows["item_id"].tolist())
    popularity = ds.inter["item_id"].value_counts()
    candidates = [int(i) for i in popularity.index if int(i) not in seen]
    candidates += sorted(i for i in ds.items if i not in seen and i not in set(candidates))
    if max_candidates:
        candidates = candidates[:max_candidates]
    t_last = int(rows["timestamp"].max())
    samples = [Sample(f"u{user}-i{i}", user, i, t_last, 0.0, 0, hist) for i in candidates]
    scorer = scorer_of(md, splits)
    if hasattr(scorer, "model_for"):
        model, rc = scorer.model_for(user), cfg.ranking
        [z] = model.score_groups([PrefixGroup.of(model.encode(samples))], "yes", shared=shared_prefix,
                                 prefix_batch=1, max_suffixes=rc.max_suffixes, batch_size=cfg.train.eval_batch_size,
                                 progress=progress)
        probs = 1.0 / (1.0 + np.exp(-z))
    else:
        probs = scorer.score(samples, progress)
    order = np.argsort(-probs, kind="stable")[:top]
    return [{"rank": r + 1, "item_id": candidates[i], "title": ds.items[candidates[i]].title,
             "year": ds.items[candidates[i]].year, "p_yes": float(probs[i])} for r, i in enumerate(order)]
