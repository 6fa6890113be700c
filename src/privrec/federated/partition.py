"""Users -> clients (METHODS §2): k-means over matrix-factorisation user embeddings, random, or by attribute.

A partition is a plain ``{user_id: client}`` dict. Every sample of a user (train, valid and test) lives on
that user's client only (:func:`client_samples`).

- ``kmeans`` (the paper's protocol): a small torch MF (:mod:`privrec.model.mf`: user/item vectors and biases,
  squared error on the ratings) is trained on the training interactions (every rating except the evaluated
  valid/test targets), seeded; the user vectors, L2-normalised, are clustered by k-means into C clients.
- ``random``: users shuffled with the seed and dealt into C clients of (almost) equal size.
- ``by-attribute``: one group per value of a user attribute (occupation, age band, gender); when there are
  more groups than clients, groups are assigned largest first to the client with the fewest users so far.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from privrec.data import Dataset, Sample
from privrec.data.records import fmt
from privrec.errors import ConfigError
from privrec.model.mf import fit_mf

AGE_BANDS = ((18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))


def age_band(age: str) -> str:
    """MovieLens-1M style bands; ML-1M's ages are already bands and pass through unchanged."""
    if not age.strip().isdigit():
        return age
    a = int(age)
    for upper, name in AGE_BANDS:
        if a < upper:
            return name
    return "56+"


def training_interactions(ds: Dataset, held_out: set[tuple[int, int]]) -> tuple[np.ndarray, ...]:
    """(users, items, ratings) of every rating except the held-out (user, item) targets."""
    inter = ds.inter
    users = inter["user_id"].to_numpy()
    items = inter["item_id"].to_numpy()
    ratings = inter["rating"].to_numpy(dtype=np.float32)
    keep = np.array([(int(u), int(i)) not in held_out for u, i in zip(users, items)], dtype=bool)
    return users[keep], items[keep], ratings[keep]


def mf_user_embeddings(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, dim: int = 16,
                       epochs: int = 60, seed: int = 0, weight_decay: float = 1e-4
                       ) -> dict[int, np.ndarray]:
    """{user_id: p_u} of the biased MF (:func:`privrec.model.mf.fit_mf`), seeded and machine-independent."""
    return fit_mf(users, items, ratings, dim, epochs, seed, weight_decay).user_vectors()


def kmeans_partition(embeddings: dict[int, np.ndarray], n_clients: int, seed: int) -> dict[int, int]:
    """k-means (k = n_clients, 10 restarts, seeded) over L2-normalised user vectors."""
    from sklearn.cluster import KMeans

    users = sorted(embeddings)
    X = np.stack([embeddings[u] for u in users])  # (U, d)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # the same assignment whatever the machine's thread count
        labels = KMeans(n_clusters=n_clients, n_init=10, random_state=seed).fit_predict(X)
    # Number clients by size (largest = client 0), so client ids do not depend on k-means' label order.
    sizes = Counter(labels.tolist())
    rank = {lab: r for r, (lab, _) in enumerate(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])))}
    return {u: rank[int(lab)] for u, lab in zip(users, labels)}


def random_partition(users: list[int], n_clients: int, seed: int) -> dict[int, int]:
    order = np.random.default_rng([seed, 11]).permutation(sorted(users))
    return {int(u): k % n_clients for k, u in enumerate(order)}


def attribute_partition(ds: Dataset, users: list[int], n_clients: int, attribute: str) -> dict[int, int]:
    """One group per attribute value, groups packed largest first onto the least-filled client.

    Raises:
        ConfigError: fewer distinct values than clients.
    """
    keys = [f.key for f in ds.schema.user_fields]
    if attribute not in keys:
        raise ConfigError(f"federated.attribute={attribute} is not a user field of {ds.name} (its user fields: "
                          f"{', '.join(keys) or 'none'})")

    def value(u: int) -> str:
        rec = ds.users.get(u)
        v = fmt(rec.get(attribute)) if rec is not None else "?"
        return age_band(v) if attribute == "age" else v

    groups: dict[str, list[int]] = defaultdict(list)
    for u in sorted(users):
        groups[value(u)].append(u)
    if len(groups) < n_clients:
        raise ConfigError(f"federated.attribute={attribute} has {len(groups)} values; cannot make "
                          f"{n_clients} clients from it")
    load = [0] * n_clients
    out: dict[int, int] = {}
    for _, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        c = int(np.argmin(load))
        for u in members:
            out[u] = c
        load[c] += len(members)
    return out


def partition_users(ds: Dataset, train: list[Sample], held_out: list[Sample], fcfg, seed: int
                    ) -> dict[int, int]:
    """{user_id: client} over every user that has a sample, by ``fcfg.partition`` (METHODS §2).

    ``held_out``: the valid and test samples; their targets are kept out of the MF fit.

    Raises:
        ConfigError: a partition that leaves a client without training samples.
    """
    users = sorted({s.user_id for s in train} | {s.user_id for s in held_out})
    C = fcfg.clients
    if len(users) < C:
        raise ConfigError(f"federated.clients={C} but the samples hold only {len(users)} users")
    if fcfg.partition == "kmeans":
        u, i, r = training_interactions(ds, {(s.user_id, s.item_id) for s in held_out})
        emb = mf_user_embeddings(u, i, r, fcfg.mf_dim, fcfg.mf_epochs, seed)
        missing = [x for x in users if x not in emb]
        assignment = kmeans_partition({x: emb[x] for x in users if x in emb}, C, seed)
        for x in missing:  # a user with no training interaction at all (cannot happen on the protocols)
            assignment[x] = 0
    elif fcfg.partition == "random":
        assignment = random_partition(users, C, seed)
    else:
        assignment = attribute_partition(ds, users, C, fcfg.attribute)
    per_client = Counter(assignment[s.user_id] for s in train)
    empty = [c for c in range(C) if per_client[c] == 0]
    if empty:
        raise ConfigError(f"partition {fcfg.partition}: client(s) {empty} get no training samples; use fewer "
                          "clients or more training samples (data.n_train)")
    return assignment


def client_samples(samples: list[Sample], assignment: dict[int, int], client: int) -> list[Sample]:
    """The samples of the users on ``client``, in their original order."""
    return [s for s in samples if assignment[s.user_id] == client]
