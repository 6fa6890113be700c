"""Metrics, each with its formula (RecBole style: plain functions over arrays, keys like ``ndcg@10``).

Like-prediction (METHODS §0): AUC, UAUC, LogLoss, accuracy. Ranking (METHODS §1): HR@K, NDCG@K from the
1-based rank of the true item among the candidates.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

EPS = 1e-7


def auc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties 1/2.

    NaN when only one class is present."""
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def logloss(labels, probs) -> float:
    """-mean(y log p + (1 - y) log(1 - p)), p clipped to [1e-7, 1 - 1e-7]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def accuracy(labels, probs, threshold: float = 0.5) -> float:
    """mean(1[p > threshold] == y)."""
    y = np.asarray(labels)
    return float(np.mean((np.asarray(probs) > threshold).astype(int) == y))


def _rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC by the rank-sum (Mann-Whitney) identity, ties as average ranks (= ties 1/2, as :func:`auc`):
    (sum of the positives' ranks - P(P+1)/2) / (P * N). Fast for the many small arrays of :func:`uauc`."""
    ranks = rankdata(s)
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def uauc(users, labels, scores) -> float:
    """Mean over users of the AUC within the user's samples, over users that have both labels."""
    by_user: dict = defaultdict(list)
    for i, u in enumerate(users):
        by_user[u].append(i)
    y_all = np.asarray(labels, dtype=np.float64)
    s_all = np.asarray(scores, dtype=np.float64)
    values = []
    for idx in by_user.values():
        y = y_all[idx]
        if 0 < y.sum() < len(y):
            values.append(_rank_auc(y, s_all[idx]))
    return float(np.mean(values)) if values else float("nan")


def binary_metrics(labels, probs, users=None) -> dict[str, float]:
    """``auc``, ``logloss``, ``accuracy``, ``n``, and ``uauc`` when users are given."""
    out = {"auc": auc(labels, probs), "logloss": logloss(labels, probs), "accuracy": accuracy(labels, probs),
           "n": len(labels), "positive_rate": float(np.mean(labels)) if len(labels) else float("nan")}
    if users is not None:
        out["uauc"] = uauc(users, labels, probs)
    return out


def ranks_from_scores(scores, true_index) -> np.ndarray:
    """1-based rank of the true item among each list's candidates (higher score = better), ties pessimistic:

        rank_u = 1 + #{j != t_u : s_uj >= s_ut}

    so a true item tied with others is placed below all of them (a constant scorer gets rank n, never 1).
    A NaN score counts as -inf. ``scores``: a (U, n) array or a list of 1-D arrays (lists may differ in
    length); ``true_index``: (U,) position of the true item in each list."""
    out = np.zeros(len(scores), dtype=np.int64)
    for u, (s, t) in enumerate(zip(scores, true_index)):
        s = np.nan_to_num(np.asarray(s, dtype=np.float64), nan=-np.inf)
        out[u] = int(np.sum(s >= s[t]))  # itself + every other candidate scored at least as high
    return out


def ranks_by_group(groups, labels, scores) -> np.ndarray:
    """Ranks (as :func:`ranks_from_scores`) of the label-1 row within each group of rows (e.g. a user's
    candidates scored one row each); groups in first-seen order, groups without exactly one positive skipped."""
    rows: dict = defaultdict(list)
    for i, g in enumerate(groups):
        rows[g].append(i)
    lists, trues = [], []
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    for idx in rows.values():
        pos = np.flatnonzero(labels[idx] == 1)
        if len(pos) == 1:
            lists.append(scores[idx])
            trues.append(int(pos[0]))
    return ranks_from_scores(lists, trues)


def hit_rate(ranks, k: int) -> float:
    """HR@K = mean(1[rank <= K]), rank 1-based."""
    return float(np.mean(np.asarray(ranks) <= k))


def ndcg(ranks, k: int) -> float:
    """NDCG@K with one relevant item = mean(1[rank <= K] / log2(rank + 1))."""
    r = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)))


HR_KS = (1, 3, 5, 10)
NDCG_KS = (3, 5, 10)


def ranking_metrics(ranks, hr_ks=HR_KS, ndcg_ks=NDCG_KS) -> dict[str, float]:
    """``hr@K`` and ``ndcg@K`` for every cut-off, from one array of 1-based ranks (NaN when empty)."""
    if len(ranks) == 0:
        return {**{f"hr@{k}": float("nan") for k in hr_ks}, **{f"ndcg@{k}": float("nan") for k in ndcg_ks}}
    out = {f"hr@{k}": hit_rate(ranks, k) for k in hr_ks}
    out.update({f"ndcg@{k}": ndcg(ranks, k) for k in ndcg_ks})
    return out


def random_ranking_metrics(n_candidates: int, hr_ks=HR_KS, ndcg_ks=NDCG_KS) -> dict[str, float]:
    """Expected metrics of a uniformly random order of n candidates: HR@K = min(K, n) / n and
    NDCG@K = (1/n) * sum_{r=1..min(K, n)} 1 / log2(r + 1)."""
    n = n_candidates
    out = {f"hr@{k}": min(k, n) / n for k in hr_ks}
    out.update({f"ndcg@{k}": float(sum(1 / np.log2(r + 1) for r in range(1, min(k, n) + 1)) / n) for k in ndcg_ks})
    return out
