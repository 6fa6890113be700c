"""FedABC's balanced client loss as a batch plan of the shared training loop (METHODS §3).

Each epoch, on a client's own samples: every sample of the minority label is kept; the majority label is
under-sampled to ``ratio`` x the minority count (drawn afresh each epoch); of the kept majority, a fraction
``hard`` are the majority samples the current model gets most wrong (highest cross-entropy), the rest are
drawn at random from the other majority samples. Batches are stratified: each holds minority and majority
samples in the same ratio, so every gradient step sees the balanced problem. The loss itself stays the
core's 2-way cross-entropy. A client that holds only one label trains on all its samples unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from privrec.model.recmodel import Encoded


def _bce_per_sample(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """-(y log sigmoid(z) + (1 - y) log sigmoid(-z)), stably."""
    return np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1.0 - y)


def select_balanced(labels: np.ndarray, losses: np.ndarray | None, ratio: float, hard: float,
                    rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(minority indices, kept majority indices) for one epoch.

    ``losses`` (per sample, same order as labels) rank the majority samples for the hard fraction; None
    draws every kept majority sample at random.
    """
    labels = np.asarray(labels)
    pos, neg = np.flatnonzero(labels >= 0.5), np.flatnonzero(labels < 0.5)
    if len(pos) == 0 or len(neg) == 0:
        return [], list(range(len(labels)))  # one label only: nothing to balance
    minority, majority = (pos, neg) if len(pos) <= len(neg) else (neg, pos)
    n_keep = min(len(majority), round(ratio * len(minority)))
    n_hard = round(hard * n_keep) if losses is not None else 0
    if n_hard:
        order = np.argsort(-np.asarray(losses)[majority], kind="stable")
        hardest = majority[order[:n_hard]]
        rest = majority[order[n_hard:]]
    else:
        hardest, rest = majority[:0], majority
    drawn = rng.choice(rest, size=n_keep - n_hard, replace=False) if n_keep > n_hard else rest[:0]
    return minority.tolist(), np.concatenate([hardest, drawn]).astype(int).tolist()


def stratified_batches(minority: list[int], majority: list[int], batch_size: int,
                       rng: np.random.Generator) -> list[list[int]]:
    """Batches that each hold minority : majority in the overall proportion (the last one takes the rest)."""
    if not minority:
        order = rng.permutation(majority).tolist()
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    mi = rng.permutation(minority).tolist()
    ma = rng.permutation(majority).tolist()
    n = len(mi) + len(ma)
    n_batches = max(1, int(np.ceil(n / batch_size)))
    per_min = len(mi) / n * batch_size
    batches, a, b = [], 0, 0
    for k in range(n_batches):
        if k == n_batches - 1:
            take_min, take_maj = len(mi) - a, len(ma) - b
        else:
            take_min = round(per_min * (k + 1)) - round(per_min * k)
            take_maj = batch_size - take_min
        batch = mi[a: a + take_min] + ma[b: b + take_maj]
        a, b = a + take_min, b + take_maj
        if batch:
            batches.append([batch[i] for i in rng.permutation(len(batch))])
    return batches


def fedabc_plan(score_logits: Callable[[list[Encoded]], np.ndarray], batch_size: int, ratio: float,
                hard: float) -> Callable[[int, np.random.Generator, list[Encoded]], list[list[int]]]:
    """A ``batch_plan`` for :func:`privrec.train.train`. ``score_logits`` scores the current model (eval
    mode, no grad) to rank the majority samples; it is called once per epoch, only when ``hard > 0``."""
    memo: dict[int, list[list[int]]] = {}

    def plan(epoch: int, rng: np.random.Generator, data: list[Encoded]) -> list[list[int]]:
        # A second call for the same epoch (same rng seed, same weights) returns the first one's batches
        # instead of scoring again.
        if epoch in memo:
            return memo[epoch]
        labels = np.array([e.label for e in data], dtype=np.float64)
        losses = None
        if hard > 0 and 0 < labels.sum() < len(labels):
            majority = 1.0 if labels.sum() > len(labels) / 2 else 0.0
            idx = np.flatnonzero(labels == majority)  # only the majority is ranked
            losses = np.zeros(len(data))
            z = np.asarray(score_logits([data[i] for i in idx]), dtype=np.float64)
            losses[idx] = _bce_per_sample(z, labels[idx])
        minority, majority = select_balanced(labels, losses, ratio, hard, rng)
        memo.clear()
        memo[epoch] = stratified_batches(minority, majority, batch_size, rng)
        return memo[epoch]

    return plan
