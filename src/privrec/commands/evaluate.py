"""``privrec evaluate MODEL``: score a model of any kind on one of its splits (the samples it may still see).

- ``single`` / ``student``: the one adapter, like-prediction or ranking (``--set task=...`` switches: one
  adapter serves both tasks); writes ``eval_{split}.json`` and ``predictions_{split}.csv``.
- ``shards``: every single shard and every aggregation, the primary one at the top (as shard-train scores
  them); writes ``eval_{split}.json``.
- ``clients``: each client's samples with its own adapter (strategy ``mixture``: with the mixture of every
  client's adapter weighted on its own validation samples, METHODS §10); ``overall``, per-client rows and their
  balance (as federate scores them), for the clients that are still in the model; writes ``eval_{split}.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privrec import ranking
from privrec.errors import UserError
from privrec.prepare import evaluate_split, write_predictions
from privrec.recommender import ModelDir, OneAdapter, ShardAggregation, open_model, scorer_of
from privrec.rundir import atomic_write_text, run_lock


def run_evaluate(run_path: str | Path, split: str = "test", progress: bool = True,
                 overrides: list[str] | None = None) -> dict:
    """Score a model directory on ``split``; returns (and writes) its metrics.

    ``overrides`` (``--set``, one-adapter models only) may change the task: ``task=ranking`` ranks with a
    like-prediction model's adapter and ``task=like-prediction`` scores a ranking model's adapter on
    like-prediction samples; the files are then named ``eval_{split}_{task}.json`` and so on.

    Raises:
        RunError: not a model directory, an unfinished deletion request, or another privrec command working on
            it (a service holds it while it serves). UserError: ``--set`` on a clients
            model, or on a shards model beyond :data:`SHARD_INFERENCE`.
    """
    with run_lock(run_path, create=False):  # it writes predictions: no deletion may land meanwhile
        return _evaluate(run_path, split, progress, overrides)


# what a shards model's scoring alone reads: `--set` may try other values without retraining a shard
SHARD_INFERENCE = ("shards.own_weight", "shards.neighbours", "shards.tau", "shards.error", "shards.aggregations",
                   "shards.primary")


def _evaluate(run_path: str | Path, split: str, progress: bool, overrides: list[str] | None) -> dict:
    md = open_model(run_path, overrides)
    keys = [o.split("=", 1)[0].strip() for o in overrides or []]
    if md.kind == "shards" and keys and not all(k in SHARD_INFERENCE for k in keys):
        raise UserError(f"--set on a shards model takes what only scoring reads ({', '.join(SHARD_INFERENCE)}); "
                        f"{run_path} is {md.manifest.describe()}")
    if keys and md.kind not in ("single", "student", "shards"):
        raise UserError(f"--set applies to one-adapter and shards models; {run_path} is {md.manifest.describe()}")
    splits = md.splits()
    tag = split if md.cfg.task == md.manifest.task else f"{split}_{md.cfg.task}"
    metrics = {"single": _one_adapter, "student": _one_adapter, "shards": _shards,
               "clients": _clients}[md.kind](md, splits, split, tag, progress)
    metrics["kind"] = md.kind
    md.run.write_metrics(metrics, f"eval_{tag}.json")
    return metrics


def _one_adapter(md: ModelDir, splits, split: str, tag: str, progress: bool) -> dict:
    model, cfg = OneAdapter(md, splits).model, md.cfg
    if cfg.task == "ranking":
        rankings = splits.ranking.get(split)
        by_scorer, scores = ranking.evaluate_rankings(model, rankings, cfg.ranking, cfg.train.eval_batch_size,
                                                      progress)
        atomic_write_text(md.run / f"predictions_{tag}.csv", ranking.predictions_csv(rankings, scores))
        return dict(by_scorer[ranking.scorers_of(cfg.ranking)[0]], scorers=by_scorer, task="ranking")
    samples = splits.get(split)
    metrics, probs = evaluate_split(model, samples, model.encode(samples), cfg.train.eval_batch_size, progress)
    write_predictions(md.run / f"predictions_{tag}.csv", samples, probs)
    return metrics


def _shards(md: ModelDir, splits, split: str, tag: str, progress: bool) -> dict:
    from privrec.unlearning.exact.shards import evaluate_shards, load_features

    cfg = md.cfg
    scorer = ShardAggregation(md, splits)  # the shards' model, adapters and users, as recommend reads them
    model = scorer.model
    samples = splits.get(split)
    va, te = model.encode(splits.valid), model.encode(samples)
    need_pool = any(a in ("apa-d", "apa-nd") for a in cfg.shards.aggregations)
    f_va = load_features(md.run, model, cfg, va, progress) if need_pool else None
    f_te = load_features(md.run, model, cfg, te, progress) if need_pool else None
    ev = evaluate_shards(cfg, model, splits.valid, samples, va, te, f_va, f_te, scorer.states, progress,
                         scorer.shard_users)
    metrics = dict(ev.metrics["aggregations"][cfg.shards.primary])
    metrics.update(ev.metrics, method=cfg.shards.primary, shards=[a.name for a in md.manifest.adapters])
    return metrics


def _clients(md: ModelDir, splits, split: str, tag: str, progress: bool) -> dict:
    from privrec.federated.client import Predictions
    from privrec.federated.runner import Federation, summarise

    scorer = scorer_of(md, splits)
    fed = Federation(md.cfg, splits, dict(md.manifest.clients),  # the clients that left have no adapter
                     frozenset(c for c in range(md.cfg.federated.clients) if c not in scorer.states))
    preds = {}
    for c in fed.clients:
        samples = fed.samples(c)[("train", "valid", "test").index(split)]
        probs = scorer.score(samples, progress) if samples else np.zeros(0)
        preds[c] = Predictions(np.asarray(probs, dtype=np.float64), np.array([s.label for s in samples], np.float64),
                               np.array([s.user_id for s in samples], np.int64))
    metrics = summarise(fed, preds)
    metrics.update({k: v for k, v in metrics["overall"].items() if k != "n"}, n_test=metrics["overall"]["n"],
                   method=f"federated {md.manifest.strategy}")
    return metrics
