"""One procedure per command, each readable top to bottom: train, evaluate, baseline, recommend.

``train`` has a fixed life (torchtune style): set up data, then the model (the prompt builder needs the
dataset's records), then encode, score zero-shot, train, save, evaluate, write metrics. With ``task:
ranking`` the same life runs over the ranking protocol (:func:`run_train_ranking`): the like-prompt model is
trained on each training user's true next item (label 1) and sampled candidates (label 0), and evaluated by
ranking every test user's candidates (HR@K / NDCG@K, METHODS §1).
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from privrec import baselines, models, ranking
from privrec.config import ExperimentConfig
from privrec.data import (
    ItemStats,
    Sample,
    Splits,
    augment,
    build_ranking_splits,
    build_splits,
    like_splits,
    load_dataset,
)
from privrec.errors import DataError, RunError, UserError
from privrec.metrics import binary_metrics
from privrec.model.adapters import install_adapter, lineage_of, originals, read_adapter, save_adapter
from privrec.model.recmodel import Encoded, PrefixGroup, RecLM
from privrec.rundir import ADAPTERS_DIR, SINGLE_ADAPTER, ZERO_SHOT_FILE, RunDir, atomic_write_text
from privrec.train import train


def setup_data(cfg: ExperimentConfig) -> Splits:
    """Load the configured dataset and cut the protocol's splits.

    Raises:
        DataError / AssetError: missing or malformed data, or the embedded copy cannot be fetched.
    """
    ds = load_dataset(cfg.data.source, cfg.data.path)
    if cfg.task == "ranking":
        try:
            rs = build_ranking_splits(ds, cfg.data, cfg.ranking.n_candidates, cfg.ranking.candidate_seed, cfg.seed)
        except ValueError as e:
            raise DataError(str(e)) from None
        tr, va, te = like_splits(rs, cfg.ranking.negatives)
        splits = Splits(ds, tr, va, te, pool=tr, ranking=rs)
    else:
        splits = build_splits(ds, cfg.data, cfg.seed)
    if not splits.train or not splits.test:
        raise UserError(f"protocol {cfg.data.protocol} yields {len(splits.train)} train / {len(splits.test)} "
                        "test samples; need at least one of each")
    return splits


def labelled_pool(cfg: ExperimentConfig, splits: Splits) -> list[Sample]:
    """The training labels a run may count beyond its own training samples: the whole training pool of the
    protocol when ``prompt.item_stats`` is on (the item statistics in the prompts are counted over it), else
    just the drawn training samples. The run's references learn from the same samples, so no row of the
    table sees labels another does not. Never a validation or test label."""
    return splits.pool if cfg.prompt.item_stats and splits.pool else splits.train


def item_stats(cfg: ExperimentConfig, splits: Splits) -> ItemStats | None:
    """What ``prompt.item_stats`` shows: item like counts over :func:`labelled_pool` (None when off)."""
    return ItemStats.of(labelled_pool(cfg, splits)) if cfg.prompt.item_stats else None


def setup_model(cfg: ExperimentConfig, splits: Splits) -> RecLM:
    model = RecLM.from_config(cfg, splits.dataset, item_stats=item_stats(cfg, splits))
    model.attach_lora(cfg.lora, cfg.seed)
    return model


def references(cfg: ExperimentConfig, splits: Splits) -> dict:
    """The references of METHODS §0 on the test samples, learnt from :func:`labelled_pool`."""
    return baselines.references(splits.dataset, labelled_pool(cfg, splits), splits.test, cfg.data.like_threshold,
                                cfg.seed)


def _epoch_line(r: dict) -> str:
    line = "epoch {epoch}: train loss {train_loss:.4f}".format(**r)
    if "valid_auc" in r:
        line += f", valid AUC {r['valid_auc']:.4f}"
    if "valid_uauc" in r:
        line += f", valid UAUC {r['valid_uauc']:.4f}"
    return line


def evaluate_split(model: RecLM, samples: list[Sample], items: list[Encoded], batch_size: int,
                   progress: bool = True) -> tuple[dict, np.ndarray]:
    probs = model.score(items, batch_size, progress)
    return binary_metrics([s.label for s in samples], probs, [s.user_id for s in samples]), probs


def write_predictions(path: Path, samples: list[Sample], probs: np.ndarray) -> None:
    lines = ["sample_id,user_id,item_id,label,p_yes"]
    lines += [f"{s.sample_id},{s.user_id},{s.item_id},{s.label},{p:.6f}" for s, p in zip(samples, probs)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    return f"{platform.machine()} {dev}, torch {torch.__version__}"


def _zero_shot(run: RunDir, model: RecLM, resume: bool, evaluate) -> dict:
    """The untuned model's test metrics: ``evaluate()`` with the adapter disabled, written once to
    ZERO_SHOT_FILE and read back on --resume."""
    if resume and (run / ZERO_SHOT_FILE).is_file():
        return run.read_metrics(ZERO_SHOT_FILE)
    with model.adapter_disabled():
        metrics = evaluate()
    run.write_metrics(metrics, ZERO_SHOT_FILE)
    return metrics


def _train_samples(cfg: ExperimentConfig, splits: Splits) -> list[Sample]:
    """The drawn training samples, each followed by its augmented copies (none unless ``augment`` asks)."""
    return augment(splits.train, cfg.augment.shuffle, cfg.augment.mask, cfg.augment.copies, cfg.seed)


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
    tr, va, te, seconds = _encode_and_cache(cfg, model, _train_samples(cfg, splits), splits, progress)
    return len(tr) + len(va) + len(te), seconds


def run_train(cfg: ExperimentConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train one LoRA adapter on the configured samples and evaluate it; returns metrics.json's content.

    Raises:
        UserError: bad data, model or config (see setup_data / setup_model).
        RunError: ``--resume`` into a directory whose config differs.
    """
    if resume and (Path(out) / "config.yaml").is_file():
        if RunDir(out, create=False).load_config().digest() != cfg.digest():
            raise RunError(f"{out} was started with a different config; resume with the same one")
    if cfg.task == "ranking":
        return run_train_ranking(cfg, out, resume, progress)
    # 1. data, then the model (the prompt builder needs the dataset's records); both before the run
    #    directory is touched, so bad input fails with its one-line error and leaves nothing behind
    splits = setup_data(cfg)
    train_samples = _train_samples(cfg, splits)
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
    result = train(model, tr, cfg.train, cfg.seed, valid=va or None, checkpoint_dir=run.path, resume=resume,
                   progress=progress, on_epoch=lambda r: run.log(_epoch_line(r)))

    # 6. save the adapter with its lineage
    save_adapter(model.model, run / ADAPTERS_DIR / SINGLE_ADAPTER, {
        "base_model": cfg.model.name, "base_fingerprint": model.fingerprint, "config_digest": cfg.digest(),
        "sample_ids": sorted({s.source_id for s in train_samples}),
        "lineage_sha256": lineage_of(originals(train_samples)),
        "best_epoch": result.best_epoch,
    })
    models.write(run.path, models.build(cfg, run.path, "single", forget=models.single_forgetting(cfg)))

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
    train_samples = _train_samples(cfg, splits)
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
                   progress=progress, on_epoch=lambda r: run.log(_epoch_line(r)))

    # 6. save the adapter with its lineage
    save_adapter(model.model, run / ADAPTERS_DIR / SINGLE_ADAPTER, {
        "base_model": cfg.model.name, "base_fingerprint": model.fingerprint, "config_digest": cfg.digest(),
        "task": "ranking", "sample_ids": sorted({s.source_id for s in train_samples}),
        "lineage_sha256": lineage_of(originals(train_samples)), "best_epoch": result.best_epoch,
    })
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
        "references": ranking.references(rs.test, rs.popularity, cfg.ranking.n_candidates),
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


def load_trained(run_path: str | Path, overrides: list[str] | None = None) -> tuple[ExperimentConfig, Splits, RecLM]:
    """Rebuild a trained run: its config, its splits and its model with the saved adapter loaded.

    Raises:
        RunError: not a run directory, or the adapter is missing / does not fit.
    """
    run = RunDir(run_path, create=False)
    cfg = run.load_config()
    if overrides:
        from privrec.config import apply_overrides, parse_config

        raw = cfg.model_dump()
        cfg = parse_config(apply_overrides(raw, overrides))
    adapter = run / models.load(run.path).adapters[0].path
    splits = setup_data(cfg)
    model = setup_model(cfg, splits)
    state, meta = read_adapter(adapter)
    install_adapter(model, adapter, state, meta, cfg.model.name)
    return cfg, splits, model


def run_evaluate(run_path: str | Path, split: str = "test", progress: bool = True,
                 overrides: list[str] | None = None) -> dict:
    """Score a trained run's adapter on a split; writes ``eval_{split}.json`` and ``predictions_{split}.csv``.

    ``overrides`` (``--set``) may change the task: the one adapter serves both, so ``task=ranking`` ranks
    with a like-prediction run's adapter and ``task=like-prediction`` scores a ranking run's adapter on
    like-prediction samples; the files are then named ``eval_{split}_{task}.json`` and so on.
    """
    own_task = RunDir(run_path, create=False).load_config().task
    cfg, splits, model = load_trained(run_path, overrides)
    tag = split if cfg.task == own_task else f"{split}_{cfg.task}"
    run = RunDir(run_path, create=False)
    if cfg.task == "ranking":
        rankings = splits.ranking.get(split)
        by_scorer, scores = ranking.evaluate_rankings(model, rankings, cfg.ranking, cfg.train.eval_batch_size,
                                                      progress)
        metrics = dict(by_scorer[ranking.scorers_of(cfg.ranking)[0]], scorers=by_scorer, task="ranking")
        run.write_metrics(metrics, f"eval_{tag}.json")
        atomic_write_text(run / f"predictions_{tag}.csv", ranking.predictions_csv(rankings, scores))
        return metrics
    samples = splits.get(split)
    metrics, probs = evaluate_split(model, samples, model.encode(samples), cfg.train.eval_batch_size, progress)
    run.write_metrics(metrics, f"eval_{tag}.json")
    write_predictions(run / f"predictions_{tag}.csv", samples, probs)
    return metrics


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


def run_recommend(run_path: str | Path, user: int, top: int = 10, max_candidates: int | None = None,
                  progress: bool = True, shared_prefix: bool = True) -> list[dict]:
    """Rank the user's unrated items by P(Yes) given the user's latest history.

    Every candidate's like-prompt shares the user's prefix: it runs once and the candidates' suffixes are
    scored against its key-value cache in chunks (``shared_prefix=False`` scores every full prompt instead).

    Raises:
        UserError: unknown user, or a user with too short a history.
    """
    cfg, splits, model = load_trained(run_path)
    ds = splits.dataset
    rows = ds.inter[ds.inter["user_id"] == user]
    if rows.empty:
        raise UserError(f"user {user} not found in {ds.name}")
    if len(rows) < cfg.data.history_len:
        raise UserError(f"user {user} has {len(rows)} ratings; the prompt needs {cfg.data.history_len}")
    hist = tuple((int(i), float(r)) for i, r in zip(rows["item_id"].tail(cfg.data.history_len),
                                                     rows["rating"].tail(cfg.data.history_len)))
    seen = set(rows["item_id"].tolist())
    popularity = ds.inter["item_id"].value_counts()
    candidates = [int(i) for i in popularity.index if int(i) not in seen]
    candidates += sorted(i for i in ds.items if i not in seen and i not in set(candidates))
    if max_candidates:
        candidates = candidates[:max_candidates]
    t_last = int(rows["timestamp"].max())
    samples = [Sample(f"u{user}-i{i}", user, i, t_last, 0.0, 0, hist) for i in candidates]
    rc = cfg.ranking
    [z] = model.score_groups([PrefixGroup.of(model.encode(samples))], "yes", shared=shared_prefix,
                             prefix_batch=1, max_suffixes=rc.max_suffixes, batch_size=cfg.train.eval_batch_size,
                             progress=progress)
    probs = 1.0 / (1.0 + np.exp(-z))
    order = np.argsort(-probs, kind="stable")[:top]
    return [{"rank": r + 1, "item_id": candidates[i], "title": ds.items[candidates[i]].title,
             "year": ds.items[candidates[i]].year, "p_yes": float(probs[i])} for r, i in enumerate(order)]
