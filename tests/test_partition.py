"""Partitioners (METHODS §4, §6): disjoint, covering, balanced, deterministic; semantic finds the clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privrec.unlearning.exact.partition import balanced_assign, partition


def blobs(sizes, dim=16, seed=0, spread=0.05):
    """Well-separated clusters in random directions (cosine- and Euclidean-separable)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return x, truth


@pytest.mark.parametrize("kind", ["semantic", "random", "kmeans-balanced"])
def test_balanced_partitions_are_disjoint_covering_and_capped(kind):
    sizes = [40, 30, 20, 13]  # unequal clusters: balancing must split the big ones
    x, _ = blobs(sizes)
    n, k = len(x), 4
    ids = [f"u{i}-i{i}" for i in range(n)]
    shards = partition(kind, ids, k, seed=3, features=x)
    assert len(shards) == k
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == n  # disjoint
    assert set(flat) == set(ids)  # covering
    assert max(len(s) for s in shards) <= math.ceil(n / k)  # balanced: t = ceil(n / K)
    assert min(len(s) for s in shards) > 0
    assert partition(kind, ids, k, seed=3, features=x) == shards  # seeded: same shards again


def test_user_partition_keeps_whole_users_together():
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(30), rng.integers(1, 9, size=30))  # 30 users, 1..8 samples each
    ids = [f"u{u}-i{i}" for i, u in enumerate(users)]
    x = rng.normal(size=(len(ids), 8))
    counts = np.bincount(users)
    for features in (x, None):
        shards = partition("user", ids, 4, seed=0, features=features, users=users.tolist())
        flat = [i for s in shards for i in s]
        assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
        owner = {}
        for k, s in enumerate(shards):
            for sid in s:
                u = int(sid.split("-")[0][1:])
                assert owner.setdefault(u, k) == k, f"user {u} split across shards"
        # balanced as far as whole users allow: over the cap by less than one user's samples
        assert max(len(s) for s in shards) <= math.ceil(len(ids) / 4) + counts.max() - 1


def test_semantic_partition_recovers_equal_clusters_and_random_does_not():
    x, truth = blobs([25, 25, 25, 25], seed=4)
    ids = [f"u{i}-i{i}" for i in range(100)]
    index = {sid: i for i, sid in enumerate(ids)}
    for kind in ("semantic", "kmeans-balanced"):
        shards = partition(kind, ids, 4, seed=0, features=x)
        for s in shards:
            assert len({truth[index[sid]] for sid in s}) == 1, f"{kind} mixed clusters in one shard"
    random_shards = partition("random", ids, 4, seed=0)
    assert all(len({truth[index[sid]] for sid in s}) > 1 for s in random_shards)


def test_balanced_assign_walks_pairs_in_distance_order_under_the_cap():
    # Every row is nearest to centre 0; with capacity 2, rows 2 and 3 must go to centre 1, in the order of
    # their (row, centre 1) distances: (3, 1) = 0.6 comes before (2, 1) = 0.7.
    dist = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
    assert balanced_assign(dist, cap=2).tolist() == [0, 0, 1, 1]
    # sizes: a user of 3 samples does not fit a capacity-2 shard anywhere -> least-loaded shard
    labels = balanced_assign(np.array([[0.1, 0.2], [0.3, 0.1], [0.2, 0.3]]), cap=2, sizes=np.array([1, 1, 3]))
    assert labels[:2].tolist() == [0, 1] and labels[2] in (0, 1)


def test_partition_refuses_impossible_requests():
    ids = ["u1-i1", "u1-i2", "u2-i3"]
    with pytest.raises(ValueError, match="K=4"):
        partition("random", ids, 4, seed=0)
    with pytest.raises(ValueError, match="unique"):
        partition("random", ids + ["u1-i1"], 2, seed=0)
    with pytest.raises(ValueError, match="feature"):
        partition("semantic", ids, 2, seed=0)
    with pytest.raises(ValueError, match="at least K"):
        partition("user", ids, 3, seed=0, users=[1, 1, 2])


def test_semantic_users_partition_never_splits_a_user_and_stays_balanced_within_one_users_samples():
    # users drawn around 4 directions, 1..12 samples each (some users bigger than others, as in MovieLens)
    rng = np.random.default_rng(5)
    n_users = 48
    counts = rng.integers(1, 13, size=n_users)
    users = np.repeat(np.arange(n_users), counts)
    centres = rng.normal(size=(4, 16)) * 3
    x = centres[users % 4] + 0.3 * rng.normal(size=(len(users), 16))
    ids = [f"u{u}-i{i}" for i, u in enumerate(users)]
    shards = partition("semantic-users", ids, 4, seed=0, features=x, users=users.tolist())
    flat = [i for s in shards for i in s]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))  # disjoint and covering
    owner = {}
    for k, s in enumerate(shards):
        for sid in s:
            u = int(sid.split("-")[0][1:])
            assert owner.setdefault(u, k) == k, f"user {u} split across shards"
    t = math.ceil(len(ids) / 4)
    assert max(len(s) for s in shards) < t + counts.max()  # over t by less than one user's samples
    # users of one direction land together: the walk is semantic, not a deal
    assert all(len({int(sid.split("-")[0][1:]) % 4 for sid in s}) <= 2 for s in shards)
    assert partition("semantic-users", ids, 4, seed=0, features=x, users=users.tolist()) == shards
    with pytest.raises(ValueError, match="at least K"):
        partition("semantic-users", ids[:5], 4, seed=0, features=x[:5], users=[1, 1, 2, 2, 3])


def test_user_slices_keep_users_whole_oldest_first_and_balanced():
    from privrec.unlearning.exact.partition import user_slices

    users = [1, 1, 2, 3, 3, 3, 4, 5, 5, 6]
    joined = {1: 50, 2: 10, 3: 30, 4: 20, 5: 40, 6: 60}  # join order 2, 4, 3, 5, 1, 6
    labels = user_slices(users, [joined[u] for u in users], 3).tolist()
    of = {u: lab for u, lab in zip(users, labels)}
    assert all(of[u] == lab for u, lab in zip(users, labels))  # one slice per user
    order = sorted(joined, key=joined.get)
    assert [of[u] for u in order] == sorted(of[u] for u in order)  # newest users in the last slices
    assert set(labels) == {0, 1, 2} and of[6] == 2 and of[2] == 0
