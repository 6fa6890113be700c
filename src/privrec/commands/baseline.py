"""``privrec baseline``: the no-LLM references of METHODS §0 on a config's samples."""

from __future__ import annotations

import time
from pathlib import Path

from privrec import baselines
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
    refs = references(cfg, splits)
    metrics = dict(refs[baselines.PRIMARY])
    metrics.update({"method": baselines.PRIMARY, "references": refs, "n_test": len(splits.test),
                    "n_train": len(splits.train), "references_train": len(labelled_pool(cfg, splits)),
                    "train_seconds": time.perf_counter() - t0, "protocol": cfg.data.protocol})
    run.write_metrics(metrics)
    run.log(f"baselines on {len(splits.test)} test samples: "
            + ", ".join(f"{k} {v['auc']:.4f}" for k, v in refs.items()))
    return metrics
