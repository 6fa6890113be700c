"""The first stage of a two-stage recommender (METHODS §11): a cheap candidate generator that proposes C of a
user's unseen items for the LLM to re-rank.

Two sources, both counted over the interactions the model may still see (a forgotten interaction counts for
nothing): item **popularity** (interaction count, ties by item id) and the scores of a seeded biased
**matrix factorisation** (:mod:`privrec.model.mf`, the same MF that places users into clients, METHODS §2).
The candidates follow one source's ranking (``popularity``, the service's default, chosen on validation in
docs/serving.md; or ``mf``) or interleave the two (``mix``, MF first: the user's best unseen item by MF, the
most popular unseen item, the next by MF, ... skipping repeats), until C items are drawn. Every unseen item
can be drawn, so the candidate list of a user at C = all unseen items is the whole catalogue minus what they rated.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from privrec.model.mf import DEFAULT_DIM, DEFAULT_EPOCHS, MF, fit_mf

SOURCES = ("mix", "popularity", "mf")


class CandidateGenerator:
    """Popularity + MF candidates over one interaction table (columns user_id, item_id, rating)."""

    def __init__(self, inter: pd.DataFrame, items: Iterable[int], seed: int = 0, dim: int = DEFAULT_DIM,
                 epochs: int = DEFAULT_EPOCHS):
        counts = inter["item_id"].value_counts()
        every = sorted(int(i) for i in items)
        self.popularity: dict[int, int] = {i: int(counts.get(i, 0)) for i in every}
        self.by_popularity = sorted(every, key=lambda i: (-self.popularity[i], i))
        self.items = every
        self.mf: MF | None = None
        if len(inter):
            self.mf = fit_mf(inter["user_id"].to_numpy(), inter["item_id"].to_numpy(),
                             inter["rating"].to_numpy(dtype=np.float32), dim, epochs, seed)

    def mf_ranking(self, user: int) -> list[int]:
        """Every item, best predicted rating first (items the fit never saw last, by popularity)."""
        if self.mf is None:
            return list(self.by_popularity)
        s = self.mf.scores(user)
        known = sorted(s, key=lambda i: (-s[i], i))
        return known + [i for i in self.by_popularity if i not in s]

    def candidates(self, user: int, seen: set[int], n: int | None, source: str = "mix") -> list[int]:
        """Up to ``n`` items the user has not seen (all of them when ``n`` is None): ``mix`` interleaves MF and
        popularity (MF first); ``popularity`` or ``mf`` takes that ranking alone, so that the candidate
        order itself is popularity's (or MF's) and a blend of B = 1 serves exactly it."""
        if source not in SOURCES:
            raise ValueError(f"unknown candidate source {source!r} (one of {', '.join(SOURCES)})")
        unseen = len(self.items) - len(seen & set(self.items))
        n = unseen if n is None else min(n, unseen)
        out: list[int] = []
        taken = set(seen)
        rankings = {"mix": lambda: [self.mf_ranking(user), self.by_popularity],
                    "mf": lambda: [self.mf_ranking(user)], "popularity": lambda: [self.by_popularity]}
        sources = [iter(r) for r in rankings[source]()]
        while len(out) < n:
            for src in sources:
                for i in src:
                    if i not in taken:
                        taken.add(i)
                        out.append(i)
                        break
                if len(out) == n:
                    break
        return out
