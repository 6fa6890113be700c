"""What linear combinations of the collaborative and counter signals reach on the all-users protocol: the
ceiling the LLM with CF vectors is compared against (docs/results.md, "Collaborative signal in the LLM").

Signals, per sample: the biased MF's predicted rating (``privrec.features``; on training-pool samples the
5-fold cross-fitted prediction, on validation and test the full fit's), the history like-rate (all 10 ratings,
or all but the 2 latest) and the shrunk item like-rate (a pool sample's own label left out). A logistic
regression on a subset of them is fit either on the training pool or on the validation samples, and scored on
validation and test. No LLM; about 1 minute.

    python benchmarks/cf_combos.py
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression

from privrec.config import load_config
from privrec.data import ItemStats
from privrec.features import CollabFeatures
from privrec.metrics import binary_metrics
from privrec.prepare import labelled_pool, setup_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/all-users-ml100k.yaml")
    args = ap.parse_args()
    cfg = load_config(args.config, ["collab.inject=true"])
    splits = setup_data(cfg)
    pool = labelled_pool(cfg, splits)
    cf = CollabFeatures.fit(pool, cfg.collab.dim, cfg.collab.epochs, cfg.collab.weight_decay, cfg.collab.folds,
                            cfg.seed)
    stats = ItemStats.of(pool)
    thr = cfg.data.like_threshold

    def feats(samples, skip: int) -> np.ndarray:
        return np.c_[[cf.predict(s) for s in samples], [s.history_like_rate(thr, skip) for s in samples],
                     [stats.read(s)[0] for s in samples]]

    def show(samples, p) -> str:
        m = binary_metrics([s.label for s in samples], p, [s.user_id for s in samples])
        return f"{m['auc']:.4f} / {m['uauc']:.4f}"

    names = ["MF", "like-rate", "item mean"]
    print("| fit on | signals | like-rate counts | valid AUC / UAUC | test AUC / UAUC |\n|---|---|---|---|---|")
    for skip in (0, 2):
        x = {part: feats(getattr(splits, part) if part != "pool" else pool, skip) for part in ("pool", "valid", "test")}
        for fit_on in ("pool", "valid"):
            y = np.array([s.label for s in (pool if fit_on == "pool" else splits.valid)])
            for cols in ([0], [0, 1], [0, 1, 2], [1, 2]):
                lr = LogisticRegression(max_iter=1000).fit(x[fit_on][:, cols], y)
                print(f"| {fit_on} | {' + '.join(names[c] for c in cols)} | "
                      f"{'all 10' if skip == 0 else f'all but the {skip} latest'} | "
                      f"{show(splits.valid, lr.predict_proba(x['valid'][:, cols])[:, 1])} | "
                      f"{show(splits.test, lr.predict_proba(x['test'][:, cols])[:, 1])} |")


if __name__ == "__main__":
    main()
