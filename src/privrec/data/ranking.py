"""Next-item ranking samples: InstructMK's candidate protocol (METHODS §1).

Per user (time order, ties in the file's order): the last interaction is the *test* target and the one
before it the *training* target; each target's prompt shows the ``history_len`` interactions right before it.
A ranking sample holds the true item and ``n_candidates - 1`` negatives drawn from the items the user never
rated anywhere in the dataset, in a seeded random order (so the true item has no fixed slot):

- candidates are drawn per user with ``default_rng([candidate_seed, user_id])``: the same seed gives the
  same candidates whichever users are drawn into a run, a different seed different ones;
- one draw per user gives ``2 * (n_candidates - 1)`` distinct never-rated items: the first half are the
  test negatives, the second half the training negatives, so no item is a negative of the same user in both;
- validation never touches test: ``n_valid`` users (drawn with ``data.sample_seed``) keep their *training*
  target's ranking as validation and contribute no training sample; training uses the other users'
  training targets (``n_train`` of them when set); test ranks every drawn test user's last item
  (``n_test`` users, drawn with ``data.sample_seed``).

For the P(Yes) scorer a ranking sample becomes like-samples (:meth:`RankingSample.like_samples`): one per
candidate, label 1 for the true item and 0 for a negative (for ranking the label means "the item the user
watched next", not "rated above 3").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from privrec.data.movielens import Dataset
from privrec.data.samples import Sample, View, sample_id


@dataclass(frozen=True)
class RankingSample:
    """One user's ranking: the true next item among ``candidates`` (presentation order)."""

    sample_id: str
    user_id: int
    target: int
    candidates: tuple[int, ...]
    history: tuple[tuple[int, float], ...]  # (item_id, rating), oldest first
    timestamp: int
    rating: float  # the user's rating of the target
    view: View = field(default_factory=View)

    def __post_init__(self) -> None:
        if self.candidates.count(self.target) != 1:
            raise ValueError(f"{self.sample_id}: the true item must be among the candidates exactly once")

    @property
    def true_index(self) -> int:
        return self.candidates.index(self.target)

    def negatives(self) -> tuple[int, ...]:
        return tuple(c for c in self.candidates if c != self.target)

    def like_sample(self, item_id: int) -> Sample:
        """The like-prompt sample of one candidate (label 1 for the true item, 0 otherwise)."""
        hit = item_id == self.target
        return Sample(sample_id(self.user_id, item_id), self.user_id, item_id, self.timestamp,
                      self.rating if hit else 0.0, int(hit), self.history, view=self.view)

    def like_samples(self, n_negatives: int | None = None) -> list[Sample]:
        """All candidates in presentation order, or the true item followed by the first ``n_negatives``."""
        if n_negatives is None:
            return [self.like_sample(c) for c in self.candidates]
        return [self.like_sample(self.target)] + [self.like_sample(c) for c in self.negatives()[:n_negatives]]


@dataclass
class RankingSplits:
    dataset: Dataset
    train: list[RankingSample]
    valid: list[RankingSample]
    test: list[RankingSample]
    popularity: dict[int, int]  # item -> interactions in the training period (every user's last one left out)

    def get(self, name: str) -> list[RankingSample]:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def user_sequences(ds: Dataset) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """user -> (items, ratings, timestamps) in the dataset's time order."""
    inter = ds.inter
    users = inter["user_id"].to_numpy()
    items, ratings, times = (inter[c].to_numpy() for c in ("item_id", "rating", "timestamp"))
    bounds = np.flatnonzero(np.diff(users)) + 1
    return {int(users[s]): (items[s:e], ratings[s:e], times[s:e])
            for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(users)])}


def draw_negatives(all_items: np.ndarray, rated: set[int], n: int, seed: int, user_id: int) -> list[int]:
    """``n`` distinct items the user never rated, seeded by (seed, user).

    Raises:
        ValueError: fewer than ``n`` unrated items exist.
    """
    pool = all_items[~np.isin(all_items, np.fromiter(rated, dtype=np.int64, count=len(rated)))]
    if len(pool) < n:
        raise ValueError(f"user {user_id} has {len(pool)} unrated items; {n} negatives needed")
    rng = np.random.default_rng([seed, user_id])
    return [int(i) for i in rng.choice(pool, size=n, replace=False)]


def _ranking(user: int, items, ratings, times, pos: int, negatives: list[int], history_len: int,
             rng: np.random.Generator, role: str) -> RankingSample:
    target = int(items[pos])
    hist = tuple((int(items[j]), float(ratings[j])) for j in range(pos - history_len, pos))
    cands = [target] + negatives
    order = rng.permutation(len(cands))
    return RankingSample(f"rank-{role}-u{user}-i{target}", user, target, tuple(cands[i] for i in order), hist,
                         int(times[pos]), float(ratings[pos]))


def _draw_users(users: list[int], n: int | None, seed) -> list[int]:
    if n is None or n >= len(users):
        return list(users)
    return sorted(int(u) for u in np.random.default_rng(seed).choice(users, size=n, replace=False))


def build_ranking_splits(ds: Dataset, data_cfg, n_candidates: int = 10, candidate_seed: int = 0, seed: int = 0,
                         ) -> RankingSplits:
    """The ranking protocol's train / valid / test samples (see the module docstring).

    ``data_cfg`` is a :class:`privrec.config.DataConfig`: ``history_len``, ``n_train`` / ``n_valid`` /
    ``n_test`` (counted in users) and ``sample_seed`` are read. Users with fewer than ``history_len + 2``
    ratings are left out.
    """
    h = data_cfg.history_len
    every = user_sequences(ds)
    popularity: dict[int, int] = {}
    for items, _, _ in every.values():
        for i in items[:-1]:  # the training period: every interaction but each user's last (test) one
            popularity[int(i)] = popularity.get(int(i), 0) + 1
    seqs = {u: s for u, s in every.items() if len(s[0]) >= h + 2}
    users = sorted(seqs)
    valid_users = set(_draw_users(users, data_cfg.n_valid, [data_cfg.sample_seed, 2])) if data_cfg.n_valid else set()
    test_users = set(_draw_users(users, data_cfg.n_test, [data_cfg.sample_seed, 3]))
    train_users = set(_draw_users([u for u in users if u not in valid_users], data_cfg.n_train, [seed, 1]))

    all_items = np.array(sorted(ds.items), dtype=np.int64)
    n_neg = n_candidates - 1
    train, valid, test = [], [], []
    wanted = train_users | valid_users | test_users
    for u in users:
        if u not in wanted:
            continue
        items, ratings, times = seqs[u]
        neg = draw_negatives(all_items, {int(i) for i in items}, 2 * n_neg, candidate_seed, u)
        rng = np.random.default_rng([candidate_seed, u, 1])  # candidate order
        last = len(items) - 1
        test_s = _ranking(u, items, ratings, times, last, neg[:n_neg], h, rng, "test")
        train_s = _ranking(u, items, ratings, times, last - 1, neg[n_neg:], h, rng, "train")
        if u in test_users:
            test.append(test_s)
        if u in valid_users:
            valid.append(train_s)
        elif u in train_users:
            train.append(train_s)
    return RankingSplits(ds, train, valid, test, popularity)


def like_splits(rs: RankingSplits, n_negatives: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, valid, test) like-samples: training users' true item + ``n_negatives`` negatives; every
    candidate of the validation and test rankings."""
    return ([s for r in rs.train for s in r.like_samples(n_negatives)],
            [s for r in rs.valid for s in r.like_samples()],
            [s for r in rs.test for s in r.like_samples()])


def training_interactions(rs: RankingSplits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, ratings) the CF references learn from: the training period of the popularity reference
    (every interaction but each user's last, the test target) minus the validation users' second-to-last
    interaction (their validation target), so that validation chooses honestly."""
    held = {(r.user_id, r.target) for r in rs.valid}
    users, items, ratings = [], [], []
    for u, (its, rs_, _) in user_sequences(rs.dataset).items():
        for i, r in zip(its[:-1].tolist(), rs_[:-1].tolist()):
            if (u, i) not in held:
                users.append(u)
                items.append(i)
                ratings.append(r)
    return np.array(users), np.array(items), np.array(ratings, dtype=np.float32)
