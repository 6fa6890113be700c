"""Samples and the evaluation protocols that cut them out of an interaction table (METHODS §0).

A sample is (user, the user's previous ``history_len`` interactions in time order, target item, label).
Its id ``u{user}-i{item}`` is stable across runs and protocols (a MovieLens user rates an item once), so
ledgers, lineages and caches can refer to it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from privrec.data.movielens import Dataset
from privrec.data.records import MOVIELENS

if TYPE_CHECKING:
    from privrec.data.ranking import RankingSplits


@dataclass(frozen=True)
class View:
    """How a sample's key-value fields are shown: their order and which are dropped (InstructMK, METHODS §1).

    ``order`` None means the template's own order."""

    order: tuple[str, ...] | None = None
    dropped: frozenset[str] = frozenset()


def without_recent(history: tuple, skip: int) -> tuple:
    """``history`` without its ``skip`` latest entries; whole when it is too short to leave any (what
    ``prompt.summary_skip_recent`` and the like-rate over the earlier items count)."""
    return history[:len(history) - skip] if 0 < skip < len(history) else history


@dataclass(frozen=True)
class Sample:
    sample_id: str
    user_id: int
    item_id: int
    timestamp: int
    rating: float
    label: int
    history: tuple[tuple[int, float], ...]  # (item_id, rating), oldest first
    source_id: str = ""  # the original sample of an augmented copy; == sample_id for originals
    view: View = field(default_factory=View)

    def __post_init__(self) -> None:
        if not self.source_id:
            object.__setattr__(self, "source_id", self.sample_id)

    def history_like_rate(self, threshold: float, skip_recent: int = 0) -> float:
        """Share of history items rated above ``threshold`` (the 'counter' reference of METHODS §0); with
        ``skip_recent``, of all but the latest ``skip_recent`` (a history too short for that counts whole)."""
        counted = without_recent(self.history, skip_recent)
        if not counted:
            return 0.5
        return float(np.mean([r > threshold for _, r in counted]))


def sample_id(user_id: int, item_id: int) -> str:
    return f"u{user_id}-i{item_id}"


@dataclass
class Splits:
    dataset: Dataset
    train: list[Sample]
    valid: list[Sample]
    test: list[Sample]
    # the protocol's whole training part, before ``n_train`` was drawn from it (samples never drawn are
    # never-seen data of the training period, e.g. for membership-inference measures)
    pool: list[Sample] = field(default_factory=list)
    # task ranking: the ranking samples the like-samples above were expanded from (privrec.data.ranking)
    ranking: RankingSplits | None = None

    def get(self, name: str) -> list[Sample]:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def windows(ds: Dataset, history_len: int, like_threshold: float, gap: int = 0) -> list[list[Sample]]:
    """Per user (in user order), every sample whose target has ``history_len + gap`` earlier interactions.

    The history is the ``history_len`` interactions that end ``gap`` interactions before the target in the
    user's time order (``gap=0``: immediately before it; ties in timestamp keep the file's row order), so no
    history item comes at or after its target.
    """
    out: list[list[Sample]] = []
    inter = ds.inter
    users = inter["user_id"].to_numpy()
    items = inter["item_id"].to_numpy()
    ratings = inter["rating"].to_numpy()
    times = inter["timestamp"].to_numpy()
    bounds = np.flatnonzero(np.diff(users)) + 1
    for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(users)]):
        seq = []
        for i in range(start + history_len + gap, end):
            hist = tuple((int(items[j]), float(ratings[j])) for j in range(i - gap - history_len, i - gap))
            seq.append(Sample(sample_id(int(users[i]), int(items[i])), int(users[i]), int(items[i]),
                              int(times[i]), float(ratings[i]), int(ratings[i] > like_threshold), hist))
        out.append(seq)
    return out


def _subsample(samples: list[Sample], n: int | None, seed: int | list[int]) -> list[Sample]:
    if n is None or n >= len(samples):
        return samples
    idx = np.sort(np.random.default_rng(seed).choice(len(samples), size=n, replace=False))
    return [samples[i] for i in idx]


def _subsample_users(samples: list[Sample], n: int | None, seed: int | list[int]) -> list[Sample]:
    """Every sample of whole users, drawn in a seeded order until at least ``n`` samples are taken (the last
    user is kept whole, so the count can pass ``n`` by less than one user's samples); order preserved."""
    if n is None or n >= len(samples):
        return samples
    users = sorted({s.user_id for s in samples})
    per_user = Counter(s.user_id for s in samples)
    chosen, count = set(), 0
    for i in np.random.default_rng(seed).permutation(len(users)):
        if count >= n:
            break
        chosen.add(users[i])
        count += per_user[users[i]]
    return [s for s in samples if s.user_id in chosen]


def tallrec_split(ds: Dataset, history_len: int = 10, like_threshold: float = 3.0, last_n: int = 10_000,
                  split: tuple[float, float, float] = (0.8, 0.1, 0.1), gap: int = 0) -> tuple[list, list, list]:
    """TALLRec protocol: all windows ordered by target time (ties: user, then position), keep the last
    ``last_n``, cut train/valid/test in that time order."""
    flat = [s for seq in windows(ds, history_len, like_threshold, gap) for s in seq]
    order = sorted(range(len(flat)), key=lambda i: (flat[i].timestamp, flat[i].user_id, i))
    kept = [flat[i] for i in order[-last_n:]]
    n_train = int(round(split[0] * len(kept)))
    n_valid = int(round(split[1] * len(kept)))
    return kept[:n_train], kept[n_train:n_train + n_valid], kept[n_train + n_valid:]


def all_users_split(ds: Dataset, history_len: int = 10, like_threshold: float = 3.0, n_eval: int = 3,
                    gap: int = 0) -> tuple[list, list, list]:
    """All-users protocol: per user, the last ``n_eval`` ratings are test, the ``n_eval`` before them
    validation, every earlier one with a full history training (METHODS §0: 84,912 / 2,829 / 2,829)."""
    train, valid, test = [], [], []
    for seq in windows(ds, history_len, like_threshold, gap):
        if len(seq) < 2 * n_eval:
            continue  # a user with fewer than history_len + gap + 6 ratings has no full-history eval sample
        train += seq[:-2 * n_eval]
        valid += seq[-2 * n_eval:-n_eval]
        test += seq[-n_eval:]
    return train, valid, test


def build_splits(ds: Dataset, cfg, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> Splits:
    """Cut the configured protocol's splits and draw the configured subsets.

    ``cfg`` is a :class:`privrec.config.DataConfig`. Training subsets are drawn with the experiment
    ``seed``; valid/test subsets with ``cfg.sample_seed`` so every run of a protocol sees the same ones,
    as single samples or, with ``cfg.eval_draw == "users"``, as whole users (every sample of each drawn
    user, so that within-user metrics such as UAUC have users with several samples to rank).
    ``exclude`` removes samples by id before anything is drawn (deleted / tombstoned data).
    """
    if cfg.protocol == "tallrec":
        tr, va, te = tallrec_split(ds, cfg.history_len, cfg.like_threshold, cfg.last_n, tuple(cfg.split),
                                   cfg.history_gap)
    else:
        tr, va, te = all_users_split(ds, cfg.history_len, cfg.like_threshold, gap=cfg.history_gap)
    if exclude:
        tr, va, te = ([s for s in part if s.sample_id not in exclude] for part in (tr, va, te))
    draw_eval = _subsample_users if cfg.eval_draw == "users" else _subsample
    return Splits(
        ds,
        _subsample(tr, cfg.n_train, [seed, 1]),
        draw_eval(va, cfg.n_valid, [cfg.sample_seed, 2]),
        draw_eval(te, cfg.n_test, [cfg.sample_seed, 3]),
        pool=tr,
    )


KV_FIELDS = MOVIELENS.kv_keys()  # ("gender", "age", "occupation", "history", "title", "genres", "year")


def augment(samples: list[Sample], shuffle: bool, mask: int, copies: int, seed: int,
            keys: tuple[str, ...] = KV_FIELDS) -> list[Sample]:
    """InstructMK augmentation (METHODS §1): each original followed by ``copies`` augmented copies.

    A copy keeps the original's label, target and history; only its view changes: the key-value pairs
    ``keys`` (the dataset's :meth:`~privrec.data.records.RecordSchema.kv_keys`) in a random order
    (``shuffle``) and/or ``mask`` of them removed at random (the history is never removed).
    """
    if copies == 0:
        return list(samples)
    maskable = tuple(f for f in keys if f != "history")
    if mask > len(maskable):
        raise ValueError(f"augment.mask={mask} exceeds the {len(maskable)} maskable pairs")
    rng = np.random.default_rng([seed, 7])
    out: list[Sample] = []
    for s in samples:
        out.append(s)
        for k in range(copies):
            order = tuple(str(f) for f in rng.permutation(keys)) if shuffle else None
            dropped = frozenset(str(f) for f in rng.choice(maskable, size=mask, replace=False))
            out.append(replace(s, sample_id=f"{s.sample_id}#aug{k}", source_id=s.sample_id,
                               view=View(order, dropped)))
    return out
