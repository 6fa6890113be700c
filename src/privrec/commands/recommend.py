"""``privrec recommend MODEL --user U``: rank the user's unrated items by P(Yes), with any kind of model.

The user's latest ratings (minus any the model forgot) are the prompt's history. The candidates are either
every item the user has not rated, most popular first (``--max-candidates N``: the N most popular of them),
or, in two stages (METHODS §11, ``--candidates C``), the C unseen items that popularity and matrix
factorisation over the remaining data propose (:mod:`privrec.candidates`), re-ranked by P(Yes). A one-adapter
model scores them with its adapter, a clients model with the adapter of the client that holds the user
(METHODS §2), a shards model with its primary aggregation (METHODS §4). A user whose data the model forgot
is refused.

:class:`privrec.recommender.Recommender` is the one recommend function: ``privrec recommend`` builds one for
one user, the service (:mod:`privrec.serve`) keeps one for every request and builds a new one after each
deletion.
"""

from __future__ import annotations

from pathlib import Path

from privrec.errors import UserError
from privrec.recommender import Recommender, check_source


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
