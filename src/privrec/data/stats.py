"""Counters over labelled training samples: the item-mean reference (METHODS §0) and ``prompt.item_stats``
(and, keyed by user instead of item, the user's own like-rate: benchmarks/within_user.py).

One estimate serves both, so the prompt shows the LLM exactly what the ``item-mean`` reference knows:

    rate(i) = (likes_i + k * g) / (n_i + k),   k = 5,   g = the counted samples' like-rate

(the item's like-rate shrunk to the global one with k pseudo-counts; an item never counted reads g). A
sample that is itself one of the counted samples is read leave-one-out: its own label is taken out of its
item's counts (g keeps it), so a training prompt never shows its own label, as it will not for a test one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from privrec.data.samples import Sample

SHRINK_K = 5.0


@dataclass(frozen=True)
class ItemStats:
    """Per-item like counts of a set of labelled samples (built by :meth:`of`; read with :meth:`read`); with
    ``key="user_id"`` the same counts and estimate per user."""

    global_rate: float
    likes: dict[int, float]  # item (or user) id -> sum of labels
    counts: dict[int, int]  # item (or user) id -> number of counted samples
    members: frozenset[str]  # ids of the counted samples (read leave-one-out)
    k: float = SHRINK_K
    key: Literal["item_id", "user_id"] = "item_id"

    @classmethod
    def of(cls, samples: Iterable[Sample], k: float = SHRINK_K,
           key: Literal["item_id", "user_id"] = "item_id") -> ItemStats:
        """Count ``samples`` (original samples: an augmented copy would count again)."""
        samples = list(samples)
        likes: dict[int, float] = {}
        counts: dict[int, int] = {}
        for s in samples:
            i = getattr(s, key)
            likes[i] = likes.get(i, 0.0) + s.label
            counts[i] = counts.get(i, 0) + 1
        g = sum(s.label for s in samples) / len(samples) if samples else 0.5
        return cls(float(g), likes, counts, frozenset(s.source_id for s in samples), float(k), key)

    def read(self, s: Sample) -> tuple[float, int]:
        """(shrunk like-rate of ``s``'s target item (or user), how many samples of it were counted), leaving
        ``s``'s own label out when ``s`` is one of the counted samples."""
        i = getattr(s, self.key)
        likes, n = self.likes.get(i, 0.0), self.counts.get(i, 0)
        if s.source_id in self.members:
            likes, n = likes - s.label, n - 1
        return (likes + self.k * self.global_rate) / (n + self.k), n

    def __len__(self) -> int:
        return sum(self.counts.values())
