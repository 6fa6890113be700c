"""``privrec baseline``: the no-LLM references on a config's samples: the counters and logistic regressions of
METHODS §0 and the trained MF of §12 for like-prediction; popularity, random order and the trained BPR-MF / MF
for ranking (on the same candidates as ``privrec train``)."""

from __future__ import annotations

import time
from pathlib import Path

from privrec import baselines, ranking
from privrec.config import ExperimentConfig
from privrec.prepare import labelled_pool, references, setup_data
from privrec.rundir import RunDir


def run_baseline(cfg: ExperimentConfig, out: str | Path) -> dict:
    """The references of METHODS §0 on exactly the config's samples, learnt from the labels a ``privrec
    train`` run of the same config sees (:func:`labelled_pool`); ``lr-onehot`` is the primary. Every
    reference carries ``auc`` and ``uauc``."""
    run = RunDir(out)
    run.write_config(cfg)
    splits = setup_data(cfg)
    t0 = time.perf_counter()
    if cfg.task == "ranking":
        rs = splits.ranking
        refs = ranking.references(rs.test, rs.popularity, cfg.ranking.n_candidates, rs, cfg.seed)
        metrics = {"task": "ranking", "references": refs, "n_test": len(rs.test), "n_valid": len(rs.valid),
                   "n_candidates": cfg.ranking.n_candidates, "train_seconds": time.perf_counter() - t0}
        run.write_metrics(metrics)
        run.log(f"ranking references on {len(rs.test)} test users: "
                + ", ".join(f"{k} HR@1 {v['hr@1']:.4f}" for k, v in refs.items()))
        return metrics
    refs = references(cfg, splits)
    metrics = dict(refs[baselines.PRIMARY])
    metrics.update({"method": baselines.PRIMARY, "references": refs, "n_test": len(splits.test),
                    "n_train": len(splits.train), "references_train": len(labelled_pool(cfg, splits)),
                    "train_seconds": time.perf_counter() - t0, "protocol": cfg.data.protocol})
    run.write_metrics(metrics)
    run.log(f"baselines on {len(splits.test)} test samples: "
            + ", ".join(f"{k} {v['auc']:.4f}" for k, v in refs.items()))
    return metrics
