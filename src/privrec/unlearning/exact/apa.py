"""APA's sample-adaptive aggregation and the output-averaging baselines (METHODS §4, §6).

For a test sample (METHODS §4):
  1. its n nearest validation samples by cosine similarity of the untuned model's hidden states;
  2. ``error_k`` = mean prediction error of adapter k on those neighbours (privrec: |label - P(Yes)|, or the
     squared error; the paper does not print its error function);
  3. ``omega_k = softmax(-tau * error_k)`` (tau = 0 gives uniform weights 1/K);
  4. one forward pass with the per-sample mixture: APA(D) mixes A and B, APA(ND) mixes B_k A_k x
     (:mod:`privrec.model.mixture`).

Aggregations: ``uniform`` (omega = 1/K in the ND form: the mean of the adapters' updates, one pass),
``apa-d``, ``apa-nd``, and ``sisa`` (the mean of the K adapters' P(Yes): K passes, SISA / RecEraser-style
output averaging). The weight maths are pure numpy functions, tested without a model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from privrec.errors import AggregationError
from privrec.model.adapters import load_adapter_state
from privrec.model.mixture import score_mixture
from privrec.model.recmodel import Encoded, RecLM

Aggregation = Literal["uniform", "apa-d", "apa-nd", "sisa"]
AGGREGATIONS: tuple[str, ...] = ("uniform", "apa-d", "apa-nd", "sisa")
ErrorKind = Literal["abs", "squared"]


def prediction_errors(probs: np.ndarray, labels: Sequence[float], kind: ErrorKind = "abs") -> np.ndarray:
    """(M, K) error of each adapter on each pool sample: |y - p| ("abs") or (y - p)^2 ("squared")."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)[:, None]  # (M, 1)
    if kind == "abs":
        return np.abs(y - p)
    if kind == "squared":
        return (y - p) ** 2
    raise ValueError(f"unknown error kind {kind!r}")


def nearest(query: np.ndarray, pool: np.ndarray, n: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """(N, n) indices of each query's n most cosine-similar pool rows, most similar first (ties: lower
    pool index first). ``exclude`` (N,): a pool row each query may not take (the query itself, when it is a
    pool sample: leave-one-out), -1 for none."""
    if len(pool) == 0:
        raise ValueError("the neighbour pool is empty")
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    p = pool / np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)
    sims = q.astype(np.float64) @ p.astype(np.float64).T  # (N, M)
    rows = np.flatnonzero(np.asarray(exclude) >= 0) if exclude is not None else np.zeros(0, dtype=np.int64)
    if len(rows):
        if len(pool) == 1:
            raise ValueError("the neighbour pool holds only the sample itself")
        sims[rows, np.asarray(exclude)[rows]] = -np.inf
    n = min(n, len(pool) - (1 if len(rows) else 0))
    return np.argsort(-sims, axis=1, kind="stable")[:, :n]


def neighbour_errors(query: np.ndarray, pool: np.ndarray, pool_errors: np.ndarray, n: int,
                     exclude: np.ndarray | None = None) -> np.ndarray:
    """(N, K) mean error of every adapter over each query's n nearest pool samples (``exclude``: see
    :func:`nearest`). A query whose only pool sample is itself has no neighbour: equal errors, so no adapter is
    preferred (uniform weights)."""
    errors = np.asarray(pool_errors, dtype=np.float64)
    if exclude is not None and len(pool) == 1:
        out = np.repeat(errors, len(query), axis=0)  # (N, K): the one pool row's errors
        out[np.asarray(exclude) >= 0] = 0.0
        return out
    idx = nearest(query, pool, n, exclude)  # (N, n)
    return errors[idx].mean(axis=1)  # (N, n, K) -> (N, K)


def self_in_pool(query_ids: Sequence[str], pool_ids: Sequence[str]) -> np.ndarray | None:
    """(N,) each query's own row in the pool (-1 where it is not a pool sample), or None when no query is: a
    validation sample scored against the validation pool must not be its own neighbour, or its own label
    chooses its weights."""
    where = {sid: i for i, sid in enumerate(pool_ids)}
    out = np.array([where.get(sid, -1) for sid in query_ids], dtype=np.int64)
    return out if (out >= 0).any() else None


def softmax_weights(errors: np.ndarray, tau: float) -> np.ndarray:
    """(N, K) omega = softmax(-tau * error) over adapters; tau = 0 gives exactly 1/K."""
    z = -float(tau) * np.asarray(errors, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)  # stable: the best adapter gets exp(0)
    w = np.exp(z)
    return w / w.sum(axis=1, keepdims=True)


def uniform_weights(n: int, k: int) -> np.ndarray:
    return np.full((n, k), 1.0 / k)


def own_shares(users: Sequence[int], shard_users: Sequence[Sequence[int]]) -> np.ndarray:
    """(N, K): for each query's user, the share of their training samples that shard k holds (``shard_users[k]``:
    the user of every training sample of shard k); a row of zeros for a user with none (a cold user)."""
    counts = [Counter(u) for u in shard_users]
    out = np.array([[c.get(u, 0) for c in counts] for u in users], dtype=np.float64).reshape(len(users), len(counts))
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def with_own(omega: np.ndarray, own: np.ndarray | None, weight: float) -> np.ndarray:
    """(1 - weight) omega + weight own: each query's weights moved towards the shards that hold its own user's
    history (:func:`own_shares`; ``shards.own_weight``, issue 35); a cold user's row keeps omega."""
    if own is None or weight == 0:
        return omega
    has = own.sum(axis=1, keepdims=True) > 0
    return np.where(has, (1.0 - weight) * omega + weight * own, omega)


def apa_weights(
    query: np.ndarray,
    pool: np.ndarray,
    pool_probs: np.ndarray,
    pool_labels: Sequence[float],
    n: int,
    tau: float,
    error: ErrorKind = "abs",
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """METHODS §4 steps 1-3: per test sample weights over the K adapters from its neighbours' errors
    (``exclude``: a pool row per query it may not take, :func:`self_in_pool`)."""
    return softmax_weights(
        neighbour_errors(query, pool, prediction_errors(pool_probs, pool_labels, error), n, exclude), tau
    )


def score_each(
    model: RecLM,
    items: list[Encoded],
    states: Sequence[dict[str, torch.Tensor]],
    batch_size: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """(N, K) P(Yes) of every item under every adapter, one scoring pass per adapter (loads each state)."""
    out = np.zeros((len(items), len(states)))
    for k, state in enumerate(states):
        load_adapter_state(model.model, state)
        out[:, k] = model.score(items, batch_size, progress)
    return out


def aggregate(
    model: RecLM,
    method: Aggregation,
    items: list[Encoded],
    states: Sequence[dict[str, torch.Tensor]],
    omega: np.ndarray | None = None,
    per_adapter: np.ndarray | None = None,
    batch_size: int = 16,
    progress: bool = True,
    own: np.ndarray | None = None,
    own_weight: float = 0.0,
) -> np.ndarray:
    """P(Yes) of ``items`` under one aggregation of the K adapters ``states``.

    ``omega`` (N, K) is needed for apa-d / apa-nd; ``per_adapter`` (N, K), when given, saves SISA's K passes.
    ``own`` (N, K) and ``own_weight``: the weighted aggregations (uniform, apa-d, apa-nd) move each sample's
    weights towards the shards holding its user's history (:func:`with_own`); SISA's mean is left as it is.
    """
    if method == "sisa":
        if per_adapter is None:
            per_adapter = score_each(model, items, states, batch_size, progress)
        return per_adapter.mean(axis=1)
    if method == "uniform":
        weights = with_own(uniform_weights(len(items), len(states)), own, own_weight)
        return score_mixture(model, items, states, weights, "nd", batch_size, progress)
    if method in ("apa-d", "apa-nd"):
        if omega is None:
            raise AggregationError(f"{method} needs per-sample weights omega")
        return score_mixture(
            model, items, states, with_own(omega, own, own_weight), "d" if method == "apa-d" else "nd", batch_size,
            progress
        )
    raise AggregationError(f"unknown aggregation {method!r}; choose one of {', '.join(AGGREGATIONS)}")
