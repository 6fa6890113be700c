"""Collaborative signal for the LLM: a CF model's view of (user, item), cross-fitted (METHODS §12).

A biased MF (:func:`privrec.model.mf.fit_mf`) is fit on the ratings of the labelled samples a run may count
(:func:`privrec.prepare.labelled_pool`: training labels only). Every prompt can then read, for its (user,
target item):

- :meth:`CollabFeatures.vector`: the CoLLM input (Zhang et al., arXiv 2310.19488): ``[p_u, q_i, p_u * q_i,
  pred - mu, b_u, b_i, known_u, known_i]`` -- the user and item vectors, their element-wise product (whose sum
  is the MF's interaction term), the predicted rating's offset from the global mean, both biases and whether
  the fit knew the user and the item. The projector of :mod:`privrec.model.collab` maps it into the backbone's
  hidden size;
- :meth:`CollabFeatures.predict`: the MF's predicted rating (the ``prompt.cf_score`` line, BinLLM-style text,
  and the ``mf`` reference).

**Cross-fitting.** A training prompt's collaborative input must not be fit on that prompt's own label, or the
LLM learns to trust a signal that is weaker at test time (the same reason the item like-rate line leaves a
sample's own label out, :mod:`privrec.data.stats`). The counted samples are cut into ``folds`` seeded folds; a
counted sample reads the MF fit on the other folds, every other sample (validation, test, a service's
candidates) the MF fit on all of them. MF factors are only defined up to a rotation, and one projector must
read one coordinate system, so every fold's factors are rotated onto the full fit's by orthogonal Procrustes
over the items (every fit indexes the same users and items from the same seeded start). The rotation keeps
every dot product: a counted sample's predicted rating, biases and interaction term are exactly its fold's,
untouched by its own label; only the d x d rotation, estimated from every item's vector, carries a trace of it
(tests/test_collab.py measures it against the move without cross-fitting).

**Cold start.** A user (item) the fit never saw reads a zero vector and zero bias with its ``known`` flag 0;
its prediction is the global mean plus the known side's bias.

Every fit is seeded and single-threaded (:func:`fit_mf`), so the same samples give the same features on any
machine: a model's features can be recomputed from the data that remains (METHODS §12, features are data).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from privrec.data import Sample
from privrec.model.mf import MF, fit_bpr, fit_mf

N_SCALARS = 5  # pred - mu, b_u, b_i, known_u, known_i


def input_size(dim: int) -> int:
    """Length of :meth:`CollabFeatures.vector` for an MF of ``dim`` factors."""
    return 3 * dim + N_SCALARS


def _fit(samples: list[Sample], dim: int, epochs: int, weight_decay: float, seed: int,
         universe: tuple[np.ndarray, np.ndarray]) -> _Rows:
    users = np.array([s.user_id for s in samples])
    items = np.array([s.item_id for s in samples])
    ratings = np.array([s.rating for s in samples], dtype=np.float32)
    mf = fit_mf(users, items, ratings, dim, epochs, seed, weight_decay, universe)
    return _Rows.of(mf, set(users.tolist()), set(items.tolist()))


def _rotated(rows: _Rows, onto: _Rows) -> _Rows:
    """``rows``' factors rotated by the orthogonal R minimising ||Q R - Q_onto|| over the items both fits know
    (every dot product, hence every prediction, unchanged)."""
    mf, ref = rows.mf, onto.mf
    known = np.array(sorted(set(rows.items) & set(onto.items)))
    if len(known) == 0:
        return rows
    a, b = np.searchsorted(mf.item_ids, known), np.searchsorted(ref.item_ids, known)
    u, _, vt = np.linalg.svd(mf.Q[a].T @ ref.Q[b])  # (d, d)
    r = u @ vt
    return _Rows(MF(mf.user_ids, mf.item_ids, mf.P @ r, mf.Q @ r, mf.bu, mf.bi, mf.mu), rows.users, rows.items)


@dataclass
class _Rows:
    """Row lookups of one MF fit (dicts: the fits are small and read per prompt)."""

    mf: MF
    users: dict[int, int]
    items: dict[int, int]

    @classmethod
    def of(cls, mf: MF, users: set[int], items: set[int]) -> _Rows:
        """Lookups of the ``users`` and ``items`` the fit had data for (the others read as unknown)."""
        return cls(mf, {int(u): k for k, u in enumerate(mf.user_ids) if int(u) in users},
                   {int(i): k for k, i in enumerate(mf.item_ids) if int(i) in items})

    def vector(self, user: int, item: int) -> np.ndarray:
        mf, d = self.mf, self.mf.P.shape[1]
        ku, ki = self.users.get(user), self.items.get(item)
        p = mf.P[ku] if ku is not None else np.zeros(d)
        q = mf.Q[ki] if ki is not None else np.zeros(d)
        bu = mf.bu[ku] if ku is not None else 0.0
        bi = mf.bi[ki] if ki is not None else 0.0
        pred = bu + bi + float(p @ q)
        return np.concatenate([p, q, p * q, [pred, bu, bi, float(ku is not None), float(ki is not None)]])

    def predict(self, user: int, item: int) -> float:
        return self.mf.mu + float(self.vector(user, item)[3 * self.mf.P.shape[1]])


class CollabFeatures:
    """The CF view of every (user, item) a prompt shows, cross-fitted for the counted samples.

    Build with :meth:`fit`; ``members`` are the counted samples' ids (read from their fold's fit)."""

    def __init__(self, full: _Rows, folds: list[_Rows], fold_of: dict[str, int]):
        self.full = full
        self.folds = folds
        self.fold_of = fold_of
        self.dim = int(full.mf.P.shape[1])

    @classmethod
    def fit(cls, samples: Iterable[Sample], dim: int = 16, epochs: int = 60, weight_decay: float = 1e-4,
            folds: int = 5, seed: int = 0) -> CollabFeatures:
        """Fit the MF on ``samples`` (original labelled samples) and on each of ``folds`` leave-one-fold-out
        parts of them (``folds`` 1: no cross-fitting, every sample reads the full fit)."""
        samples = sorted(samples, key=lambda s: s.sample_id)
        if not samples:
            raise ValueError("collaborative features need at least one labelled sample")
        universe = (np.unique([s.user_id for s in samples]), np.unique([s.item_id for s in samples]))
        full = _fit(samples, dim, epochs, weight_decay, seed, universe)
        fold_of: dict[str, int] = {}
        fits: list[_Rows] = []
        if folds > 1:
            which = np.random.default_rng(seed).integers(0, folds, len(samples))
            fold_of = {s.sample_id: int(k) for s, k in zip(samples, which)}
            for f in range(folds):
                rest = [s for s, k in zip(samples, which) if k != f]
                fits.append(_rotated(_fit(rest, dim, epochs, weight_decay, seed, universe), full) if rest else full)
        return cls(full, fits, fold_of)

    @classmethod
    def fit_implicit(cls, users: np.ndarray, items: np.ndarray, item_universe: np.ndarray,
                     counted: Iterable[Sample], dim: int = 32, epochs: int = 40, weight_decay: float = 1e-4,
                     folds: int = 5, seed: int = 0) -> CollabFeatures:
        """The ranking task's CF view (METHODS §1, §12): BPR-MF (:func:`privrec.model.mf.fit_bpr`) on implicit
        (user, item) interactions, the score ``b_i + p_u . q_i`` in place of a predicted rating.

        ``counted``: the training like-samples whose positives are among the interactions (the training users'
        true next items); they are cross-fitted by user, so that a training user's true item and negatives
        all read the fit that never saw that true item."""
        counted = list(counted)
        held = {(s.user_id, s.item_id) for s in counted if s.label == 1}
        universe = (np.unique(users), np.asarray(item_universe))

        def bpr(keep: np.ndarray) -> _Rows:
            mf = fit_bpr(users[keep], items[keep], universe[1], dim, epochs, seed, weight_decay,
                         users_universe=universe[0])
            return _Rows.of(mf, set(users[keep].tolist()), set(items[keep].tolist()))

        everything = np.ones(len(users), dtype=bool)
        full = bpr(everything)
        fold_of: dict[str, int] = {}
        fits: list[_Rows] = []
        if folds > 1:
            trained_users = sorted({s.user_id for s in counted})
            which = dict(zip(trained_users, np.random.default_rng(seed).integers(0, folds, len(trained_users))))
            fold_of = {s.sample_id: int(which[s.user_id]) for s in counted}
            pair_fold = np.array([which.get(u, -1) if (u, i) in held else -1
                                  for u, i in zip(users.tolist(), items.tolist())])
            fits = [_rotated(bpr(pair_fold != f), full) for f in range(folds)]
        return cls(full, fits, fold_of)

    @property
    def size(self) -> int:
        return input_size(self.dim)

    def _rows(self, s: Sample) -> _Rows:
        f = self.fold_of.get(s.source_id)
        return self.full if f is None else self.folds[f]

    def vector(self, s: Sample) -> np.ndarray:
        """(3 d + 5,) float64: the CoLLM input of ``s``'s (user, target item), cross-fitted when ``s`` was
        counted."""
        return self._rows(s).vector(s.user_id, s.item_id)

    def vector_of(self, user: int, item: int) -> np.ndarray:
        """The full fit's input for any (user, item): what a prompt outside the counted samples reads."""
        return self.full.vector(user, item)

    def predict(self, s: Sample) -> float:
        """The MF's predicted rating of ``s``'s target item by its user (cross-fitted when counted)."""
        return self._rows(s).predict(s.user_id, s.item_id)


def features_digest(stats, collab: CollabFeatures | None) -> str:
    """sha256 over what a model's prompts read from counted labels: the item statistics' counts (``stats``, a
    :class:`privrec.data.ItemStats` or None) and every MF fit of ``collab`` (the full fit and each fold, with
    the fold of every counted sample). Equal digests mean equal features, so ``privrec forget --verify`` can
    recompute them from the data that remains and compare (METHODS §12, features with lineage)."""
    import hashlib

    h = hashlib.sha256()
    if stats is not None:
        h.update(f"stats {stats.global_rate!r} {stats.k!r} {stats.key}\n".encode())
        for i in sorted(stats.counts):
            h.update(f"{i} {stats.likes[i]!r} {stats.counts[i]}\n".encode())
    if collab is not None:
        for name, rows in [("full", collab.full), *((f"fold{k}", r) for k, r in enumerate(collab.folds))]:
            h.update(name.encode())
            for a in (rows.mf.P, rows.mf.Q, rows.mf.bu, rows.mf.bi, np.array([rows.mf.mu])):
                h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
            h.update(repr((sorted(rows.users), sorted(rows.items))).encode())
        h.update(repr(sorted(collab.fold_of.items())).encode())
    return h.hexdigest()
