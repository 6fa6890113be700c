"""``privrec train``: one LoRA adapter on the configured samples, evaluated (a ``single`` model, privrec.models).

``train`` has a fixed life (torchtune style): set up data, then the model (the prompt builder needs the
dataset's records), then encode, score zero-shot, train, save, evaluate, write metrics. With ``task:
ranking`` the same life runs over the ranking protocol (:func:`run_train_ranking`): the like-prompt model is
trained on each training user's true next item (label 1) and sampled candidates (label 0), and evaluated by
ranking every test user's candidates (HR@K / NDCG@K, METHODS §1).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from privrec import models, ranking
from privrec.config import ExperimentConfig
from privrec.data import Sample, Splits
from privrec.errors import RunError
from privrec.model.adapters import originals, save_adapter
from privrec.model.recmodel import Encoded, RecLM
from privrec.prepare import (
    adapter_meta,
    evaluate_split,
    labelled_pool,
    machine,
    references,
    setup_data,
    setup_model,
    write_predictions,
)
from privrec.rundir import (
    ADAPTERS_DIR,
    LEDGER_FILE,
    SINGLE_ADAPTER,
    ZERO_SHOT_FILE,
    RunDir,
    atomic_write_text,
    run_lock,
)
from privrec.train import epoch_line, fit_single, save_single, train, training_samples
from privrec.unlearning.exact.ledger import Ledger, deleted_interactions


def _zero_shot(run: RunDir, model: RecLM, resume: bool, evaluate) -> dict:
    """The untuned model's test metrics: ``evaluate()`` with the adapter disabled, written once to
    ZERO_SHOT_FILE and read back on --resume."""
    if resume and (run / ZERO_SHOT_FILE).is_file():
        return run.read_metrics(ZERO_SHOT_FILE)
    with model.adapter_disabled():
        metrics = evaluate()
    run.write_metrics(metrics, ZERO_SHOT_FILE)
    return metrics


def _encode_and_cache(cfg: ExperimentConfig, model: RecLM, train_samples: list[Sample], splits: Splits,
                      progress: bool) -> tuple[list[Encoded], list[Encoded], list[Encoded], float]:
    """Steps 2 and 3 of ``train``: the encoded train / valid / test prompts, with the frozen-layer cache
    filled for all of them, and the seconds the caching took."""
    tr, va, te = model.encode(train_samples), model.encode(splits.valid), model.encode(splits.test)
    t0 = time.perf_counter()
    model.prepare(tr + va + te, cfg.train.eval_batch_size, progress)
    return tr, va, te, time.perf_counter() - t0


def cache_prompts(cfg: ExperimentConfig, progress: bool = True) -> tuple[int, float]:
    """Fill the on-disk frozen-layer cache with a like-prediction run's prompts and train nothing (what
    ``train`` does before its first step), so that runs started afterwards side by side, e.g. one per core,
    find them cached instead of each computing the same ones. Returns (prompts, seconds)."""
    splits = setup_data(cfg)
    model = setup_model(cfg, splits)
    tr, va, te, seconds = _encode_and_cache(cfg, model, training_samples(cfg, splits), splits, progress)
    return len(tr) + len(va) + len(te), seconds


def run_train(cfg: ExperimentConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train one LoRA adapter on the configured samples and evaluate it; returns metrics.json's content.

    Into a model directory that has forgotten data (a deletion ledger), the deleted samples stay out and the
    new adapter is recorded in the ledger. The directory's run lock is held throughout.

    Raises:
        UserError: bad data, model or config (see setup_data / setup_model).
        RunError: ``--resume`` into a directory whose config differs; an unfinished deletion request; another
            privrec command working on the directory.
    """
    if resume and (Path(out) / "config.yaml").is_file():
        if RunDir(out, create=False).load_config().digest() != cfg.digest():
            raise RunError(f"{out} was started with a different config; resume with the same one")
    with run_lock(out):  # before its deletions are read: none can land between that and the adapter's write
        if cfg.task == "ranking":
            return run_train_ranking(cfg, out, resume, progress)
        return _train(cfg, out, resume, progress)


def _train(cfg: ExperimentConfig, out: str | Path, resume: bool, progress: bool) -> dict:
    # 1. data (minus deleted data), then the model (the prompt builder needs the dataset's records); both
    #    before the run directory is touched, so bad input fails with its one-line error and leaves nothing
    splits = setup_data(cfg, deleted_interactions(out, cfg.data))
    train_samples = training_samples(cfg, splits)
    model = setup_model(cfg, splits)

    run = RunDir(out)
    run.write_config(cfg)
    run.log(f"privrec train -> {run.path} (model {cfg.model.name}, protocol {cfg.data.protocol})")
    run.log(f"samples: {len(splits.train)} train (+{len(train_samples) - len(splits.train)} augmented), "
            f"{len(splits.valid)} valid, {len(splits.test)} test")

    # 2. tokenise once; 3. frozen-layer cache (one pass over every prompt; timed apart from training)
    tr, va, te, cache_seconds = _encode_and_cache(cfg, model, train_samples, splits, progress)
    run.log(f"prompt tokens: mean {np.mean([len(e) for e in tr]):.0f}, max {max(len(e) for e in tr + te)}; "
            f"bf16 autocast {'on' if model.bf16 else 'off'}; cached frozen layers: {model.cut}/{model.n_layers}")

    # 4. zero-shot (the untuned model on the same test samples), kept across --resume
    zero_shot = None
    if cfg.eval.zero_shot:
        zero_shot = _zero_shot(run, model, resume, lambda: evaluate_split(
            model, splits.test, te, cfg.train.eval_batch_size, progress)[0])
        run.log(f"zero-shot test AUC {zero_shot['auc']:.4f}")

    # 5. train (checkpoint every epoch; --resume continues from the last one)
    result = fit_single(cfg, model, tr, va, run.path, resume, progress, run.log)

    # 6. save the adapter with its lineage, the manifest, and (where it has one) the deletion ledger's record
    meta = save_single(cfg, model, run / ADAPTERS_DIR / SINGLE_ADAPTER, train_samples, result, splits)
    models.write(run.path, models.build(cfg, run.path, "single", forget=models.single_forgetting(cfg)))
    if (run / LEDGER_FILE).is_file():
        ledger = Ledger(run / LEDGER_FILE, create=False)
        ledger.record_adapter(0, meta["tensors_sha256"], meta["lineage_sha256"], len(meta["sample_ids"]),
                              ledger.next_origin("train"))
        ledger.close()

    # 7. evaluate and write the run's metrics
    t0 = time.perf_counter()
    metrics, probs = evaluate_split(model, splits.test, te, cfg.train.eval_batch_size, progress)
    score_seconds = time.perf_counter() - t0
    write_predictions(run / "predictions_test.csv", splits.test, probs)
    metrics.update({
        "n_test": len(splits.test), "n_train": len(splits.train), "n_train_augmented": len(tr),
        "n_valid": len(splits.valid),
        "train_seconds": result.seconds, "train_samples_per_second": result.samples_per_second,
        "cache_seconds": cache_seconds, "test_score_seconds": score_seconds,
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "select": cfg.train.select,
        "valid_auc": result.best_valid_auc, "valid_uauc": result.best_valid_uauc,
        "stopped_early": result.stopped_early, "history": result.history, "curve": result.curve,
        "zero_shot": zero_shot, "references": references(cfg, splits),
        "references_train": len(labelled_pool(cfg, splits)),
        "model": cfg.model.name, "protocol": cfg.data.protocol, "machine": machine(),
    })
    run.write_metrics(metrics)
    run.log(f"test AUC {metrics['auc']:.4f} (n={len(splits.test)}), trained {result.seconds:.0f}s "
            f"at {result.samples_per_second:.2f} samples/s")
    return metrics


def run_train_ranking(cfg: ExperimentConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """``task: ranking``: train the like-prompt model on next-item samples and rank the test users' candidates;
    returns metrics.json's content (primary scorer's ``hr@K`` / ``ndcg@K`` at the top, every scorer under
    ``scorers``, ``zero_shot`` per scorer, ``references``: popularity and random). Called by :func:`run_train`.
    """
    # 1. data (ranking samples, expanded to like-samples for training), then the model
    splits = setup_data(cfg)
    rs = splits.ranking
    train_samples = training_samples(cfg, splits)
    model = setup_model(cfg, splits)
    bs = cfg.train.eval_batch_size

    run = RunDir(out)
    run.write_config(cfg)
    run.log(f"privrec train -> {run.path} (task ranking, model {cfg.model.name}, {cfg.ranking.n_candidates} "
            f"candidates, scorers {'+'.join(ranking.scorers_of(cfg.ranking))})")
    run.log(f"users: {len(rs.train)} train ({len(splits.train)} like-samples: true item + {cfg.ranking.negatives} "
            f"negatives, +{len(train_samples) - len(splits.train)} augmented), {len(rs.valid)} valid, "
            f"{len(rs.test)} test")

    # 2. tokenise the training and validation like-prompts once; 3. frozen-layer cache
    tr, va = model.encode(train_samples), model.encode(splits.valid)
    t0 = time.perf_counter()
    model.prepare(tr + va, bs, progress)
    cache_seconds = time.perf_counter() - t0

    # 4. zero-shot rankings (the untuned model, every scorer), kept across --resume
    zero_shot = None
    if cfg.eval.zero_shot:
        zero_shot = _zero_shot(run, model, resume, lambda: ranking.evaluate_rankings(
            model, rs.test, cfg.ranking, bs, progress)[0])
        run.log("zero-shot " + ", ".join(f"{k} HR@1 {v['hr@1']:.4f}" for k, v in zero_shot.items()))

    # 5. train the like-prompt model (validation AUC over the validation users' candidates picks the epoch)
    result = train(model, tr, cfg.train, cfg.seed, valid=va or None, checkpoint_dir=run.path, resume=resume,
                   progress=progress, on_epoch=lambda r: run.log(epoch_line(r)))

    # 6. save the adapter with its lineage
    save_adapter(model.model, run / ADAPTERS_DIR / SINGLE_ADAPTER,
                 adapter_meta(cfg, model, originals(train_samples), task="ranking", best_epoch=result.best_epoch))
    models.write(run.path, models.build(cfg, run.path, "single", forget=models.single_forgetting(cfg)))

    # 7. rank the test users' candidates with every scorer; references on the same candidates
    t0 = time.perf_counter()
    by_scorer, scores = ranking.evaluate_rankings(model, rs.test, cfg.ranking, bs, progress)
    score_seconds = time.perf_counter() - t0
    atomic_write_text(run / "predictions_test.csv", ranking.predictions_csv(rs.test, scores))
    primary = ranking.scorers_of(cfg.ranking)[0]
    metrics = {k: v for k, v in by_scorer[primary].items() if k.startswith(("hr@", "ndcg@"))}
    metrics.update({
        "task": "ranking", "primary_scorer": primary, "scorers": by_scorer, "zero_shot": zero_shot,
        "references": ranking.references(rs.test, rs.popularity, cfg.ranking.n_candidates,
                                         rs if cfg.ranking.cf_references else None, cfg.seed),
        "n_candidates": cfg.ranking.n_candidates, "n_test": len(rs.test), "n_train": len(rs.train),
        "n_valid": len(rs.valid), "n_train_samples": len(splits.train), "n_train_augmented": len(tr),
        "train_seconds": result.seconds, "train_samples_per_second": result.samples_per_second,
        "cache_seconds": cache_seconds, "test_score_seconds": score_seconds,
        "test_candidates_per_second": len(rs.test) * cfg.ranking.n_candidates * len(by_scorer) / score_seconds
        if score_seconds > 0 else None,
        "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "select": cfg.train.select,
        "valid_auc": result.best_valid_auc, "valid_uauc": result.best_valid_uauc,
        "stopped_early": result.stopped_early, "history": result.history, "curve": result.curve,
        "model": cfg.model.name, "protocol": "ranking (last item test, second-to-last train)", "machine": machine(),
    })
    run.write_metrics(metrics)
    run.log(f"test ({len(rs.test)} users): " + "; ".join(
        f"{k} HR@1 {v['hr@1']:.4f} NDCG@5 {v['ndcg@5']:.4f}" for k, v in by_scorer.items())
        + f"; popularity HR@1 {metrics['references']['popularity']['hr@1']:.4f}")
    return metrics
