"""Users -> clients (METHODS §2) and the federated config section's checks."""

from __future__ import annotations

from collections import Counter

import pytest

from privrec.config import parse_config
from privrec.errors import ConfigError
from privrec.federated.config import FederatedConfig, FederatedSection
from privrec.federated.partition import age_band, client_samples, mf_user_embeddings, partition_users


@pytest.fixture(scope="module")
def fed_splits(ml100k):
    from privrec.data import build_splits

    cfg = parse_config({"data": {"protocol": "all-users", "n_train": 400, "n_valid": 100, "n_test": 200}},
                       FederatedConfig)
    return build_splits(ml100k, cfg.data, 0)


def test_kmeans_partition_is_seeded_and_keeps_each_users_samples_on_one_client(ml100k, fed_splits):
    sp = fed_splits
    f = FederatedSection(clients=4, partition="kmeans", mf_epochs=15)
    a = partition_users(ml100k, sp.train, sp.valid + sp.test, f, seed=0)
    assert a == partition_users(ml100k, sp.train, sp.valid + sp.test, f, seed=0)
    assert a != partition_users(ml100k, sp.train, sp.valid + sp.test, f, seed=1)
    users = {s.user_id for s in sp.train + sp.valid + sp.test}
    assert set(a) == users and set(a.values()) == {0, 1, 2, 3}
    sizes = Counter(a.values())
    assert sizes[0] == max(sizes.values())  # clients numbered by size
    seen: dict[int, int] = {}
    for c in range(4):
        for part in (sp.train, sp.valid, sp.test):
            for s in client_samples(part, a, c):
                assert seen.setdefault(s.user_id, c) == c  # a user's train, valid and test: one client
    total = sum(len(client_samples(sp.train, a, c)) for c in range(4))
    assert total == len(sp.train)


def test_mf_embeddings_fit_the_ratings_and_put_similar_users_together():
    import numpy as np

    # two taste groups over 20 items: group A loves items 0-9 and hates 10-19, group B the reverse
    users, items, ratings = [], [], []
    for u in range(40):
        for i in range(20):
            users.append(u)
            items.append(i)
            ratings.append(5.0 if (u < 20) == (i < 10) else 1.0)
    emb = mf_user_embeddings(np.array(users), np.array(items), np.array(ratings, dtype=np.float32), dim=4,
                             epochs=80, seed=0)
    from privrec.federated.partition import kmeans_partition

    a = kmeans_partition(emb, 2, seed=0)
    assert len({a[u] for u in range(20)}) == 1 and len({a[u] for u in range(20, 40)}) == 1
    assert a[0] != a[39]


def test_random_partition_deals_users_evenly(ml100k, fed_splits):
    sp = fed_splits
    a = partition_users(ml100k, sp.train, sp.valid + sp.test, FederatedSection(clients=5, partition="random"), 0)
    sizes = Counter(a.values()).values()
    assert max(sizes) - min(sizes) <= 1


def test_attribute_partition_keeps_each_value_on_one_client(ml100k, fed_splits):
    sp = fed_splits
    f = FederatedSection(clients=5, partition="by-attribute", attribute="occupation")
    a = partition_users(ml100k, sp.train, sp.valid + sp.test, f, 0)
    by_value: dict[str, set[int]] = {}
    for u, c in a.items():
        by_value.setdefault(ml100k.users[u].occupation, set()).add(c)
    assert all(len(cs) == 1 for cs in by_value.values())
    assert set(a.values()) == set(range(5))
    f = FederatedSection(clients=3, partition="by-attribute", attribute="age")
    a = partition_users(ml100k, sp.train, sp.valid + sp.test, f, 0)
    bands: dict[str, set[int]] = {}
    for u, c in a.items():
        bands.setdefault(age_band(ml100k.users[u].age), set()).add(c)
    assert all(len(cs) == 1 for cs in bands.values()) and len(bands) > 3


def test_age_bands():
    assert [age_band(x) for x in ("7", "18", "24", "25", "49", "50", "56", "73")] == [
        "under 18", "18-24", "18-24", "25-34", "45-49", "50-55", "56+", "56+"]
    assert age_band("25-34") == "25-34"  # ML-1M's bands pass through


def test_partition_errors(ml100k, fed_splits):
    sp = fed_splits
    with pytest.raises(ConfigError, match="values"):
        partition_users(ml100k, sp.train, sp.valid + sp.test,
                        FederatedSection(clients=30, partition="by-attribute", attribute="occupation"), 0)
    few = sp.train[:3]
    with pytest.raises(ConfigError, match="no training samples"):
        partition_users(ml100k, few, sp.valid + sp.test, FederatedSection(clients=5, partition="random"), 0)


@pytest.mark.parametrize("raw,match", [
    ({"train": {"early_stopping": 2}}, "early_stopping"),
    ({"federated": {"lr_scale": True, "strategy": "fedavg"}}, "lr_scale"),
    ({"federated": {"strategy": "centralised", "split": {"client_first": 1}}}, "centralised"),
    ({"federated": {"partition": "by-attribute", "attribute": "gender"}}, "gender"),
    ({"federated": {"split": {"client_first": 0}}}, "client_first"),
    ({"federated": {"strategy": "scaffold"}}, "strategy"),
    ({"federated": {"rounds": 2, "clientz": 3}}, "unknown key"),
])
def test_config_contradictions_are_refused(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw, FederatedConfig)


def test_shipped_configs_load():
    from pathlib import Path

    from privrec.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    real = load_config(root / "pplr-ml100k.yaml", cls=FederatedConfig)
    tiny = load_config(root / "pplr-tiny.yaml", cls=FederatedConfig)
    assert real.model.name == "smollm2-135m" and real.federated.clients == 5
    assert real.federated.partition == "kmeans" and real.federated.strategy == "pplr"
    assert tiny.model.name == "tiny-random"
