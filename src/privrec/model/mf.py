"""Biased matrix factorisation over explicit ratings (METHODS §2 places users into clients with its user
vectors; METHODS §11 proposes a service's candidates with its scores).

r_ui ~ mu + b_u + b_i + p_u . q_i, fitted full-batch with Adam on squared error, seeded and single-threaded
for the duration of the fit, so the same interactions give the same factors on any machine thread count.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

# the one default size of the MF: the federated k-means partition (FederatedSection.mf_dim / mf_epochs) and the
# service's candidate stage (privrec.candidates) both start from it
DEFAULT_DIM, DEFAULT_EPOCHS = 16, 60


@dataclass(frozen=True)
class MF:
    """Fitted factors; rows follow ``user_ids`` / ``item_ids`` (sorted)."""

    user_ids: np.ndarray  # (U,)
    item_ids: np.ndarray  # (I,)
    P: np.ndarray  # (U, d) user vectors
    Q: np.ndarray  # (I, d) item vectors
    bu: np.ndarray  # (U,)
    bi: np.ndarray  # (I,)
    mu: float

    def user_vectors(self) -> dict[int, np.ndarray]:
        return {int(u): self.P[k] for k, u in enumerate(self.user_ids)}

    def user_row(self, user: int) -> int | None:
        k = int(np.searchsorted(self.user_ids, user))
        return k if k < len(self.user_ids) and int(self.user_ids[k]) == user else None

    def scores(self, user: int) -> dict[int, float]:
        """Predicted rating of every item the fit saw, for ``user`` (the item terms alone for an unseen user)."""
        k = self.user_row(user)
        s = self.mu + self.bi + (self.Q @ self.P[k] + self.bu[k] if k is not None else 0.0)  # (I,)
        return {int(i): float(v) for i, v in zip(self.item_ids, s)}


def fit_mf(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, dim: int = 16, epochs: int = 60,
           seed: int = 0, weight_decay: float = 1e-4, universe: tuple[np.ndarray, np.ndarray] | None = None) -> MF:
    """Fit the biased MF on (users, items, ratings) arrays of equal length.

    ``universe``: sorted (user ids, item ids) that index the factors instead of the ids present, so that fits on
    parts of one data set start from the same seeded initialisation row for row (and so end in nearly the same
    coordinates: privrec.features' cross-fitting). Rows of ids absent from the data get no data gradient."""
    if universe is None:
        uid, u_idx = np.unique(users, return_inverse=True)
        iid, i_idx = np.unique(items, return_inverse=True)
    else:
        uid, iid = universe
        u_idx, i_idx = np.searchsorted(uid, users), np.searchsorted(iid, items)
    n_items = len(iid)
    g = torch.Generator().manual_seed(seed)
    P = torch.nn.Parameter(torch.randn(len(uid), dim, generator=g) * 0.1)  # (U, d)
    Q = torch.nn.Parameter(torch.randn(n_items, dim, generator=g) * 0.1)  # (I, d)
    bu = torch.nn.Parameter(torch.zeros(len(uid)))
    bi = torch.nn.Parameter(torch.zeros(n_items))
    mu = float(ratings.mean())
    u_t, i_t, r_t = torch.from_numpy(u_idx), torch.from_numpy(i_idx), torch.from_numpy(ratings)
    opt = torch.optim.Adam([P, Q, bu, bi], lr=0.05, weight_decay=0.0)
    with _one_thread():
        for _ in range(epochs):
            pred = mu + bu[u_t] + bi[i_t] + (P[u_t] * Q[i_t]).sum(-1)  # (N,)
            loss = ((pred - r_t) ** 2).mean() + weight_decay * (P.pow(2).sum() + Q.pow(2).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return MF(uid, iid, _arr(P), _arr(Q), _arr(bu), _arr(bi), mu)


@contextlib.contextmanager
def _one_thread():
    """Reductions in a fixed order for the duration of a fit: the factors must not depend on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _arr(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def fit_bpr(users: np.ndarray, items: np.ndarray, n_items_universe: np.ndarray, dim: int = 32, epochs: int = 40,
            seed: int = 0, weight_decay: float = 1e-4, batch_size: int = 4096, lr: float = 0.01,
            users_universe: np.ndarray | None = None) -> MF:
    """BPR-MF (Rendle et al., UAI 2009) on implicit interactions (user, item) pairs: for every observed pair a
    seeded random item of ``n_items_universe`` the user did not interact with is drawn each epoch, and
    -log sigmoid(x_ui - x_uj) + weight_decay * (|p_u|^2 + |q_i|^2 + |q_j|^2) is minimised with Adam in
    mini-batches, x_ui = b_i + p_u . q_i. Seeded and single-threaded like :func:`fit_mf`; the result is an
    :class:`MF` with zero user biases and mu 0 (its :meth:`MF.scores` rank a user's items). ``users_universe``:
    sorted user ids indexing the factors (as :func:`fit_mf`'s ``universe``), default the users present."""
    if users_universe is None:
        uid, u_idx = np.unique(users, return_inverse=True)
    else:
        uid, u_idx = np.asarray(users_universe), np.searchsorted(users_universe, users)
    iid = np.asarray(n_items_universe)
    i_idx = np.searchsorted(iid, items)
    n_i = len(iid)
    seen = np.unique(u_idx.astype(np.int64) * n_i + i_idx)  # sorted codes of the observed pairs
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    P = torch.nn.Parameter(torch.randn(len(uid), dim, generator=g) * 0.1)  # (U, d)
    Q = torch.nn.Parameter(torch.randn(len(iid), dim, generator=g) * 0.1)  # (I, d)
    bi = torch.nn.Parameter(torch.zeros(len(iid)))
    opt = torch.optim.Adam([P, Q, bi], lr=lr)
    u_all, i_all = torch.from_numpy(u_idx), torch.from_numpy(i_idx)
    with _one_thread():
        for _ in range(epochs):
            neg = rng.integers(0, n_i, len(u_idx))
            clash = np.isin(u_idx * n_i + neg, seen)  # the (few) negatives the user did interact with: redraw
            while clash.any():
                neg[clash] = rng.integers(0, n_i, int(clash.sum()))
                clash = np.isin(u_idx * n_i + neg, seen)
            order = torch.from_numpy(rng.permutation(len(u_idx)))
            j_all = torch.from_numpy(neg)
            for start in range(0, len(order), batch_size):
                b = order[start: start + batch_size]
                u, i, j = u_all[b], i_all[b], j_all[b]
                x = bi[i] - bi[j] + (P[u] * (Q[i] - Q[j])).sum(-1)  # (B,)
                loss = -torch.nn.functional.logsigmoid(x).mean() + weight_decay * (
                    P[u].pow(2).sum(-1) + Q[i].pow(2).sum(-1) + Q[j].pow(2).sum(-1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    return MF(uid, iid, _arr(P), _arr(Q), np.zeros(len(uid)), _arr(bi), 0.0)
