"""Partitioners: split training samples into K disjoint shards, one adapter per shard (METHODS §4, §6).

Pure functions over arrays; every one returns a label per sample (``labels[i]`` = shard of sample i) and is
deterministic for a given ``seed``. :func:`partition` turns labels into shards of sample ids.

- ``semantic`` (APA, METHODS §4): k-means on the untuned model's hidden states into K centres; then every
  (sample, centre) pair is sorted by cosine distance, ascending, and walked once: a sample goes to a centre
  when it is still unassigned and the centre's shard holds fewer than ``t = ceil(n / K)`` samples.
- ``kmeans-balanced`` (GraphEraser-style BEKM): the same capacity-bounded walk, with Euclidean distance,
  repeated inside the k-means loop (centres = means of the balanced shards) until the shards stop changing.
- ``random`` (SISA, METHODS §6): a seeded permutation dealt round-robin.
- ``user`` (RecEraser-style, METHODS §6): whole users per shard. Users are embedded by the mean hidden
  state of their samples, K random users are the anchors, and users (weighted by their sample counts) are
  assigned by the capacity-bounded walk around the anchors, anchors updated as shard means, a few rounds;
  without features, users are dealt largest-first to the least-loaded shard. A user never spans two
  shards, so deleting a user retrains exactly one adapter; the price is that shards can exceed
  ``ceil(n / K)`` by less than one user's sample count.
- ``semantic-users`` (METHODS §9): APA's balanced semantic walk done on users. A user's feature is the mean
  of their training samples' untuned hidden states; k-means (cosine-sorted walk, as ``semantic``) on the
  users into K centres; (user, centre) pairs sorted by cosine distance ascending; a user goes to a centre
  while its shard holds fewer than ``t = ceil(n / K)`` samples, so a shard exceeds t by less than one user's
  samples. A user never spans two shards: a single-user deletion retrains exactly one shard.

:func:`user_slices` cuts one shard's samples into R ordered slices for SISA slicing (METHODS §9): whole
users, oldest first.

The first three are balanced: every shard holds at most ``ceil(n / K)`` samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from privrec.errors import PartitionError

Kind = Literal["semantic", "random", "user", "kmeans-balanced", "semantic-users"]
KINDS: tuple[str, ...] = ("semantic", "random", "user", "kmeans-balanced", "semantic-users")
USER_KINDS: tuple[str, ...] = ("user", "semantic-users")  # a user's samples always land in one shard


def capacity(n: int, k: int) -> int:
    """t = ceil(n / K), the most samples a balanced shard may hold."""
    return math.ceil(n / k)


def balanced_assign(dist: np.ndarray, cap: int, sizes: np.ndarray | None = None,
                    while_below: bool = False) -> np.ndarray:
    """Capacity-bounded greedy walk over (row, centre) pairs sorted by distance, ascending.

    Row i goes to centre c at the first pair (i, c) where i is unassigned and ``load[c] + sizes[i] <= cap``
    (``while_below``: ``load[c] < cap``, METHODS §9's rule, which lets a centre exceed ``cap`` by less than one
    row's size and never leaves a row out). Rows that fit nowhere (only possible with unequal sizes) go,
    largest first, to the least-loaded centre.

    Args:
        dist: (n, K) distances. cap: capacity per centre, in units of ``sizes`` (default 1 per row).
    Returns:
        (n,) int labels.
    """
    n, k = dist.shape
    sizes = np.ones(n, dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    order = np.argsort(dist.ravel(), kind="stable")  # pairs (i, c) flattened as i * K + c
    labels = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    left = n
    for flat in order:
        i, c = divmod(int(flat), k)
        full = load[c] >= cap if while_below else load[c] + sizes[i] > cap
        if labels[i] >= 0 or full:
            continue
        labels[i] = c
        load[c] += sizes[i]
        left -= 1
        if left == 0:
            break
    for i in sorted(np.flatnonzero(labels < 0), key=lambda i: (-sizes[i], i)):
        c = int(np.argmin(load))
        labels[i] = c
        load[c] += sizes[i]
    return labels


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_distance(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(n, K) 1 - cos(x_i, c_k)."""
    return 1.0 - _unit(x) @ _unit(centres).T


def euclidean_distance(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(n, K) ||x_i - c_k||_2."""
    d2 = (x * x).sum(1)[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]
    return np.sqrt(np.maximum(d2, 0.0))


def random_labels(n: int, k: int, seed: int) -> np.ndarray:
    """SISA: a seeded permutation dealt round-robin (shard sizes differ by at most one)."""
    labels = np.empty(n, dtype=np.int64)
    labels[np.random.default_rng([seed, 11]).permutation(n)] = np.arange(n) % k
    return labels


def semantic_labels(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """APA's balanced semantic-aware partition: k-means centres, then one cosine-sorted capacity walk."""
    from sklearn.cluster import KMeans

    x = np.asarray(features, dtype=np.float64)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    return balanced_assign(cosine_distance(x, km.cluster_centers_), capacity(len(x), k))


def kmeans_balanced_labels(features: np.ndarray, k: int, seed: int, iters: int = 25) -> np.ndarray:
    """GraphEraser-style balanced k-means: the capacity walk inside every k-means round (Euclidean)."""
    x = np.asarray(features, dtype=np.float64)
    rng = np.random.default_rng([seed, 13])
    centres = x[rng.choice(len(x), size=k, replace=False)]
    cap = capacity(len(x), k)
    labels = balanced_assign(euclidean_distance(x, centres), cap)
    for _ in range(iters):
        centres = np.stack([x[labels == c].mean(0) for c in range(k)])
        new = balanced_assign(euclidean_distance(x, centres), cap)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels


def user_labels(
    users: Sequence[int], k: int, seed: int, features: np.ndarray | None = None, iters: int = 10
) -> np.ndarray:
    """RecEraser-style: whole users per shard, balanced in samples as far as whole users allow."""
    users = np.asarray(users)
    uniq, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
    if len(uniq) < k:
        raise PartitionError(f"user partition needs at least K={k} users, got {len(uniq)}")
    cap = capacity(len(users), k)
    if features is None:
        order = np.random.default_rng([seed, 17]).permutation(len(uniq))
        order = sorted(order, key=lambda u: -counts[u])  # largest first (stable: ties keep the shuffle)
        load = np.zeros(k, dtype=np.int64)
        ulab = np.zeros(len(uniq), dtype=np.int64)
        for u in order:
            c = int(np.argmin(load))
            ulab[u], load[c] = c, load[c] + counts[u]
        return ulab[inverse]
    _, _, _, emb = user_features(users, features)
    anchors = emb[np.random.default_rng([seed, 19]).choice(len(uniq), size=k, replace=False)]
    ulab = balanced_assign(euclidean_distance(emb, anchors), cap, counts)
    for _ in range(iters):
        anchors = np.stack([np.average(emb[ulab == c], axis=0, weights=counts[ulab == c]) for c in range(k)])
        new = balanced_assign(euclidean_distance(emb, anchors), cap, counts)
        if np.array_equal(new, ulab):
            break
        ulab = new
    return ulab[inverse]


def user_features(users: Sequence[int], features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, sample -> user index, samples per user, (U, H) mean feature of each user's samples)."""
    uniq, inverse, counts = np.unique(np.asarray(users), return_inverse=True, return_counts=True)
    x = np.asarray(features, dtype=np.float64)
    emb = np.zeros((len(uniq), x.shape[1]))
    np.add.at(emb, inverse, x)
    return uniq, inverse, counts, emb / counts[:, None]


def semantic_user_labels(users: Sequence[int], features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """METHODS §9: k-means on users' mean features, one cosine-sorted walk filling a shard while it holds
    fewer than ceil(n / K) samples."""
    from sklearn.cluster import KMeans

    uniq, inverse, counts, emb = user_features(users, features)
    if len(uniq) < k:
        raise PartitionError(f"semantic-users partition needs at least K={k} users, got {len(uniq)}")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(emb)
    ulab = balanced_assign(cosine_distance(emb, km.cluster_centers_), capacity(len(inverse), k), counts,
                           while_below=True)
    return ulab[inverse]


def user_slices(users: Sequence[int], first_seen: Sequence[int], r: int) -> np.ndarray:
    """Slice (0..R-1) of each sample of one shard, for SISA slicing (METHODS §9): whole users per slice,
    users ordered by when they joined (``first_seen``: their earliest timestamp in the shard; ties by user id),
    the newest users in the last slices, cut where the running sample count crosses s * n / R. A slice may be
    empty when the shard has fewer users than R or one user holds more than n / R samples.
    """
    users = np.asarray(users)
    n = len(users)
    joined: dict[int, int] = {}
    for u, t in zip(users.tolist(), first_seen):
        joined[u] = min(int(t), joined.get(u, int(t)))
    order = sorted(joined, key=lambda u: (joined[u], u))
    counts = {u: int(c) for u, c in zip(*np.unique(users, return_counts=True))}
    slice_of, before = {}, 0
    for u in order:
        slice_of[u] = min(r - 1, (before * r) // max(n, 1))
        before += counts[u]
    return np.array([slice_of[u] for u in users.tolist()], dtype=np.int64)


def partition(
    kind: Kind,
    sample_ids: Sequence[str],
    k: int,
    seed: int,
    features: np.ndarray | None = None,
    users: Sequence[int] | None = None,
    iters: int = 25,
) -> list[list[str]]:
    """K disjoint shards of ``sample_ids`` covering all of them (ids sorted within a shard).

    Raises:
        PartitionError: K < 1, more shards than samples, duplicate ids, a missing input the kind needs, or an
            empty shard.
    """
    ids = list(sample_ids)
    n = len(ids)
    if k < 1 or k > n:
        raise PartitionError(f"cannot cut {n} samples into K={k} shards")
    if len(set(ids)) != n:
        raise PartitionError("sample ids must be unique to be partitioned")
    if kind in ("semantic", "kmeans-balanced", "semantic-users") and (features is None or len(features) != n):
        raise PartitionError(f"partition {kind!r} needs one feature row per sample")
    if kind in USER_KINDS and (users is None or len(users) != n):
        raise PartitionError(f"partition {kind!r} needs the user id of every sample")
    if kind == "random":
        labels = random_labels(n, k, seed)
    elif kind == "semantic":
        labels = semantic_labels(features, k, seed)
    elif kind == "kmeans-balanced":
        labels = kmeans_balanced_labels(features, k, seed, iters)
    elif kind == "user":
        labels = user_labels(users, k, seed, features, iters)
    elif kind == "semantic-users":
        labels = semantic_user_labels(users, features, k, seed)
    else:
        raise PartitionError(f"unknown partition {kind!r}; choose one of {', '.join(KINDS)}")
    shards = [sorted(ids[i] for i in np.flatnonzero(labels == c)) for c in range(k)]
    empty = [c for c, s in enumerate(shards) if not s]
    if empty:
        raise PartitionError(f"partition {kind!r} left shard {empty[0]} empty")
    return shards
