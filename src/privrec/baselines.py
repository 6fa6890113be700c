"""The honest references every like-prediction table carries, on exactly the LLM's samples (METHODS §0).

- ``like-rate``: the user's like-rate over the history items shown in the prompt (no learning at all);
- ``item-mean``: the target item's like-rate among the training samples, shrunk to the global like-rate
  with k=5 pseudo-counts: (likes + k * global) / (n + k);
- ``lr-onehot``: logistic regression on one-hot user id, item id and the schema's categorical fields (MovieLens:
  item genres, multi-hot, and user gender, age, occupation);
- ``lr-onehot+like-rate``: the same plus the history like-rate as a numeric feature;
- ``lr-like-rate+item-mean``: logistic regression on the two counters above;
- ``mf``: a trained collaborative filter (METHODS §12): the biased MF of :mod:`privrec.features` fit on the
  training ratings, its size chosen on the validation samples' AUC among :data:`MF_GRID`, its predicted rating
  mapped to P(like) by a one-feature logistic regression on the validation samples (monotone: AUC and UAUC are
  the raw MF's; only LogLoss and accuracy read the mapping). Without validation samples the first size is used
  and the mapping is fit on the training samples.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import OneHotEncoder

from privrec.data import Dataset, ItemStats, Sample
from privrec.data.stats import SHRINK_K
from privrec.features import CollabFeatures
from privrec.metrics import binary_metrics

PRIMARY = "lr-onehot"
# (dim, epochs, weight decay) of the MF reference, chosen per run on validation AUC
MF_GRID = ((16, 60, 1e-4), (32, 100, 3e-4), (64, 200, 1e-4))


def like_rate(samples: list[Sample], threshold: float) -> np.ndarray:
    return np.array([s.history_like_rate(threshold) for s in samples])


def item_mean(train: list[Sample], samples: list[Sample], k: float = SHRINK_K) -> np.ndarray:
    """Shrunk per-item like-rate learnt from ``train``, read for each of ``samples`` (:class:`ItemStats`: the
    estimate ``prompt.item_stats`` shows; a sample of ``train`` itself is read leaving its own label out)."""
    stats = ItemStats.of(train, k)
    return np.array([stats.read(s)[0] for s in samples])


def _categorical(ds: Dataset, samples: list[Sample]) -> tuple[list[list[str]], list[list[tuple[str, ...]]]]:
    """Per sample: [user id, item id, each categorical user field, each categorical scalar item field] (one-hot),
    and each categorical list-valued item field's values (multi-hot; MovieLens: genres)."""
    sch = ds.schema
    ufields = [f.key for f in sch.user_fields if f.categorical]
    ifields = [f.key for f in sch.item_fields if f.categorical and not f.is_list]
    lfields = [f.key for f in sch.item_fields if f.categorical and f.is_list]
    rows, lists = [], []
    for s in samples:
        u, it = ds.users.get(s.user_id), ds.items[s.item_id]
        rows.append([f"u{s.user_id}", f"i{s.item_id}", *(str(u.get(k)) if u else "?" for k in ufields),
                     *(str(it.get(k)) for k in ifields)])
        lists.append([tuple(it.get(k, ())) for k in lfields])
    return rows, lists


def _list_index(ds: Dataset) -> list[dict[str, int]]:
    """Per categorical list-valued item field, its values' column offsets (all fields in one block)."""
    out, offset = [], 0
    for f in ds.schema.item_fields:
        if f.categorical and f.is_list:
            values = sorted({v for it in ds.items.values() for v in it.get(f.key, ())})
            out.append({v: offset + i for i, v in enumerate(values)})
            offset += len(values)
    return out


def _features(enc: OneHotEncoder, list_index: list[dict[str, int]], ds: Dataset, samples: list[Sample],
              extra: np.ndarray | None):
    rows, lists = _categorical(ds, samples)
    x = enc.transform(rows)
    g = sparse.lil_matrix((len(samples), sum(len(ix) for ix in list_index)))
    for i, per_field in enumerate(lists):
        for index, values in zip(list_index, per_field):
            for name in values:
                if name in index:
                    g[i, index[name]] = 1.0
    parts = [x, g.tocsr()]
    if extra is not None:
        parts.append(sparse.csr_matrix(extra))
    return sparse.hstack(parts).tocsr()


def logistic_onehot(ds: Dataset, train: list[Sample], test: list[Sample], threshold: float,
                    with_like_rate: bool, seed: int = 0) -> np.ndarray:
    """P(like) from logistic regression on one-hot ids, the schema's categorical fields (MovieLens: genres and
    the user's gender, age, occupation) (+ history like-rate)."""
    rows, _ = _categorical(ds, train)
    enc = OneHotEncoder(handle_unknown="ignore").fit(rows)
    list_index = _list_index(ds)
    ex_tr = like_rate(train, threshold)[:, None] if with_like_rate else None
    ex_te = like_rate(test, threshold)[:, None] if with_like_rate else None
    y = np.array([s.label for s in train])
    if len(np.unique(y)) < 2:
        return np.full(len(test), float(y.mean()) if len(y) else 0.5)
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    clf.fit(_features(enc, list_index, ds, train, ex_tr), y)
    return clf.predict_proba(_features(enc, list_index, ds, test, ex_te))[:, 1]


def logistic_counters(train: list[Sample], test: list[Sample], threshold: float) -> np.ndarray:
    """Logistic regression on [history like-rate, shrunk item mean] (item mean out-of-sample on train:
    each training sample's own label is left out of its item's mean)."""
    stats = ItemStats.of(train)
    x_tr = np.c_[like_rate(train, threshold), [stats.read(s)[0] for s in train]]
    x_te = np.c_[like_rate(test, threshold), [stats.read(s)[0] for s in test]]
    y = np.array([s.label for s in train])
    if len(np.unique(y)) < 2:
        return np.full(len(test), float(y.mean()) if len(y) else 0.5)
    return LogisticRegression(max_iter=1000).fit(x_tr, y).predict_proba(x_te)[:, 1]


def _labels(samples: list[Sample]) -> np.ndarray:
    return np.array([s.label for s in samples])


def mf_reference(train: list[Sample], valid: list[Sample], test: list[Sample], seed: int = 0,
                 grid=MF_GRID) -> tuple[np.ndarray, dict]:
    """P(like) of ``test`` from the biased MF fit on ``train``'s ratings (``mf`` above), and its chosen size
    ``{"dim", "epochs", "weight_decay", "valid_auc"}``."""
    from privrec.metrics import auc

    best = None
    for dim, epochs, wd in grid if valid else grid[:1]:
        cf = CollabFeatures.fit(train, dim, epochs, wd, folds=1, seed=seed)
        va = np.array([cf.predict(s) for s in valid])
        score = auc(_labels(valid), va) if valid and len(np.unique(_labels(valid))) == 2 else float("nan")
        if best is None or score > best[0]:
            best = (score, cf, va, {"dim": dim, "epochs": epochs, "weight_decay": wd, "valid_auc": score})
    _, cf, va, chosen = best
    fit_on, fit_x = (valid, va) if valid and len(np.unique(_labels(valid))) == 2 else (
        train, np.array([cf.predict(s) for s in train]))
    te = np.array([cf.predict(s) for s in test])
    if len(np.unique(_labels(fit_on))) < 2:
        return 1.0 / (1.0 + np.exp(-(te - 3.5))), chosen
    lr = LogisticRegression().fit(fit_x[:, None], _labels(fit_on))
    return lr.predict_proba(te[:, None])[:, 1], chosen


def reference_scores(ds: Dataset, train: list[Sample], test: list[Sample], threshold: float,
                     seed: int = 0, valid: list[Sample] | None = None) -> dict[str, np.ndarray]:
    return {
        "like-rate": like_rate(test, threshold),
        "item-mean": item_mean(train, test),
        "lr-onehot": logistic_onehot(ds, train, test, threshold, False, seed),
        "lr-onehot+like-rate": logistic_onehot(ds, train, test, threshold, True, seed),
        "lr-like-rate+item-mean": logistic_counters(train, test, threshold),
        "mf": mf_reference(train, valid or [], test, seed)[0],
    }


def references(ds: Dataset, train: list[Sample], test: list[Sample], threshold: float,
               seed: int = 0, valid: list[Sample] | None = None) -> dict[str, dict[str, float]]:
    """Metrics (auc, uauc, logloss, accuracy) of every reference on ``test``, learnt from ``train`` (the MF's
    size chosen on ``valid``)."""
    labels = [s.label for s in test]
    users = [s.user_id for s in test]
    return {name: binary_metrics(labels, p, users)
            for name, p in reference_scores(ds, train, test, threshold, seed, valid).items()}
