"""``privrec shard-train``: one LoRA adapter per shard, evaluated under every aggregation (METHODS §4, §6).

The procedure (torchtune style, one fixed life):
  1. lock the run, open its deletion ledger, read the tombstones (deleted data stays deleted: every sample
     showing a tombstoned interaction is dropped from the splits before anything else happens);
  2. data, then the model (the prompt builder needs the dataset); the fresh LoRA init is kept as the one
     starting point of every shard;
  3. tokenise once, fill the frozen-layer cache once (with ``lora.top_layers`` it is shared by all shards,
     the full retrain and every later ``forget``);
  4. the untuned model's hidden states (cached per run in ``features.npz``) for the partition and the
     neighbour search;
  5. partition, then train every shard from the common init with the one training loop and save it with
     its lineage (``adapters/shard-k``), recording each in the ledger;
  6. optionally the full-retrain baseline (one adapter on all shards' samples; its adapter is not kept);
  7. score: every single adapter, SISA, uniform, APA(D), APA(ND); write ``metrics.json``.

Shard k always trains with seed ``shard_seed(seed, k)`` from the same init, on its ids in sorted order, for a
fixed number of epochs (no validation-based selection: validation samples are the aggregation's neighbour
pool, never training data). So retraining a shard without some samples gives exactly the adapter that
shard-train would have produced without them.
"""

from __future__ import annotations

import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from privrec import baselines, models
from privrec.config import DataConfig, ExperimentConfig
from privrec.data import Dataset, Sample, Splits, build_splits, load_dataset, windows
from privrec.errors import RunError, UserError
from privrec.metrics import binary_metrics
from privrec.model.adapters import adapter_state, lineage_of, load_adapter_state, read_adapter, save_adapter
from privrec.model.recmodel import Encoded, RecLM
from privrec.rundir import (
    ADAPTERS_DIR,
    FEATURES_FILE,
    LEDGER_FILE,
    SHARD_PREFIX,
    RunDir,
    is_adapter,
)
from privrec.train import TrainResult, train
from privrec.unlearning.apa import aggregate, apa_weights, score_each
from privrec.unlearning.ledger import Ledger, excluded_ids, run_lock
from privrec.unlearning.partition import partition

# config sections that decide what an adapter is (its hash in the adapter's metadata)
ADAPTER_SECTIONS = ("seed", "data", "prompt", "model", "lora", "train")


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    k: int = Field(4, ge=1, description="Number of shards K, one LoRA adapter each (METHODS §4: K=4).")
    partition: Literal["semantic", "random", "user", "kmeans-balanced"] = Field(
        "semantic",
        description="semantic: APA's balanced semantic-aware k-means (METHODS §4); random: SISA; "
        "user: RecEraser-style whole users per shard; kmeans-balanced: GraphEraser-style balanced k-means.",
    )
    features: Literal["final", "cut"] = Field(
        "final",
        description="Hidden state of the untuned model used for partitioning and the neighbour "
        "search: final = last layer, last token (METHODS §4); cut = the frozen bottom layers' output at the "
        "last token, read from the frozen-layer cache (free at inference; needs lora.top_layers).",
    )
    iters: int = Field(25, ge=1, description="Rounds of the balanced k-means / user-anchor updates.")
    aggregations: list[Literal["uniform", "apa-d", "apa-nd", "sisa"]] = Field(
        ["uniform", "apa-d", "apa-nd", "sisa"], description="Aggregations scored on the test set."
    )
    primary: Literal["uniform", "apa-d", "apa-nd", "sisa"] = Field(
        "apa-nd", description="The aggregation reported as the run's top-level auc / logloss / accuracy."
    )
    neighbours: int = Field(20, ge=1, description="n nearest validation samples per test sample (Movie: 20).")
    tau: float = Field(1000.0, ge=0, description="Softmax temperature on -error (tau=0: uniform weights).")
    error: Literal["abs", "squared"] = Field(
        "abs",
        description="Adapter error on a neighbour: |label - P(Yes)| or its square (the paper does not "
        "print its error function).",
    )
    full_retrain: bool = Field(
        False,
        description="Also train one adapter on all training samples (the retrain-from-scratch "
        "baseline) and score it; its adapter is not kept, so forget never has to retrain it.",
    )


class ApaConfig(ExperimentConfig):
    """An experiment config plus the ``shards`` section of sharded exact unlearning."""

    shards: ShardConfig = ShardConfig()

    @model_validator(mode="after")
    def _check_shards(self) -> ApaConfig:
        s = self.shards
        self.refuse_item_stats("shard-train / forget", "a forgotten sample's label would stay in the item "
                               "statistics of other shards' prompts, so retraining its shard would not erase it")
        if s.primary not in s.aggregations:
            raise ValueError(f"shards.primary={s.primary} is not in shards.aggregations {s.aggregations}")
        if self.augment.copies > 0:
            raise ValueError("shard-train partitions original samples: set augment.copies=0")
        if s.features == "cut" and (self.lora.top_layers is None or not self.lora.cache_frozen):
            raise ValueError(
                "shards.features=cut reads the frozen-layer cache: set lora.top_layers and "
                "lora.cache_frozen=true"
            )
        if self.data.n_train is not None and s.k > self.data.n_train:
            raise ValueError(f"shards.k={s.k} exceeds data.n_train={self.data.n_train}")
        if self.train.epochs < 1:
            raise ValueError("shard adapters need train.epochs >= 1")
        return self


def shard_seed(seed: int, k: int) -> int:
    """Seed of shard k's training (shuffling and dropout): fixed by (run seed, shard)."""
    return int(np.random.SeedSequence([seed, 104729, k]).generate_state(1)[0])


def shard_dir(run: RunDir, k: int) -> Path:
    return run / ADAPTERS_DIR / f"{SHARD_PREFIX}{k}"


def shard_folders(run: RunDir) -> dict[int, Path]:
    """Current shard adapters of a run: {k: folder}, complete folders only."""
    base = run / ADAPTERS_DIR
    out = {}
    if base.is_dir():
        for p in base.iterdir():
            if p.name.startswith(SHARD_PREFIX) and is_adapter(p):
                out[int(p.name[len(SHARD_PREFIX) :])] = p
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=2)
def _source_data(data_json: str, seed: int) -> tuple[Dataset, dict[str, Sample], Splits]:
    data = DataConfig.model_validate_json(data_json)
    ds = load_dataset(data.source, data.path)
    seqs = windows(ds, data.history_len, data.like_threshold, data.history_gap)
    universe = {s.sample_id: s for seq in seqs for s in seq}  # every sample the source can give, by id
    return ds, universe, build_splits(ds, data, seed)


def source_data(cfg: ApaConfig) -> tuple[Dataset, dict[str, Sample], Splits]:
    """(dataset, every sample by id, the run's split draw before tombstones), memoised per process: all
    three are pure functions of the source files and the data config (read-only: never mutate them).

    Raises:
        DataError / AssetError: missing or malformed data.
    """
    return _source_data(cfg.data.model_dump_json(), cfg.seed)


def setup_shard_data(cfg: ApaConfig, tombstones: set[tuple[int, int]]) -> Splits:
    """The protocol's splits (the same draw as ``privrec train``), minus every sample showing a tombstone.

    Raises:
        DataError / AssetError: missing or malformed data. UserError: too few samples left.
    """
    ds, _, sp = source_data(cfg)
    gone = excluded_ids(sp.train + sp.valid + sp.test, tombstones)
    sp = Splits(ds, *([s for s in part if s.sample_id not in gone] for part in (sp.train, sp.valid, sp.test)))
    if len(sp.train) < cfg.shards.k or not sp.test:
        raise UserError(
            f"{len(sp.train)} train / {len(sp.test)} test samples left; need >= shards.k="
            f"{cfg.shards.k} train and one test sample"
        )
    needs_pool = any(a in ("apa-d", "apa-nd") for a in cfg.shards.aggregations)
    if needs_pool and not sp.valid:
        raise UserError("apa-d / apa-nd need validation samples (the neighbour pool); none left")
    return sp


def build_model(cfg: ApaConfig, dataset: Dataset) -> tuple[RecLM, dict[str, torch.Tensor]]:
    """The RecLM with a fresh seeded LoRA, and that fresh LoRA's tensors (every shard's starting point)."""
    model = RecLM.from_config(cfg, dataset)
    model.attach_lora(cfg.lora, cfg.seed)
    return model, adapter_state(model.model)


# --- features: the untuned model's hidden states, cached per run ------------------------------------------
def _features_key(model: RecLM, cfg: ApaConfig) -> str:
    prec = "bf16" if model.bf16 else "fp32"
    prompt = cfg.prompt.model_dump_json()
    data = f"{cfg.data.history_len}|{cfg.data.like_threshold}|{cfg.data.history_gap}"
    return f"{model.fingerprint}|{cfg.shards.features}|{prec}|{prompt}|{data}"


def load_features(
    run: RunDir, model: RecLM, cfg: ApaConfig, items: list[Encoded], progress: bool = True
) -> np.ndarray:
    """(N, H) untuned hidden states of ``items`` (METHODS §4), computed once per run and kept in
    ``RUN/features.npz`` keyed by sample id (forget purges deleted samples' rows)."""
    path = run / FEATURES_FILE
    key = _features_key(model, cfg)
    have: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                have = dict(zip(z["ids"].tolist(), z["x"]))
    todo = [e for e in items if e.sample_id not in have]
    if todo:
        with model.adapter_disabled():
            x = model.last_hidden(todo, cfg.shards.features, model_batch(cfg), progress)
        have.update(zip([e.sample_id for e in todo], x))
        save_features(path, key, have)
    return np.stack([have[e.sample_id] for e in items]) if items else np.zeros((0, 0), np.float32)


def save_features(path: Path, key: str, rows: dict[str, np.ndarray]) -> None:
    ids = sorted(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            key=np.array(key),
            ids=np.array(ids, dtype=str),
            x=np.stack([rows[i] for i in ids]).astype(np.float32) if ids else np.zeros((0, 0), np.float32),
        )
    tmp.replace(path)


def purge_features(path: Path, sample_ids: set[str]) -> int:
    """Drop the rows of ``sample_ids`` from a run's feature cache; returns how many were dropped."""
    if not path.is_file():
        return 0
    with np.load(path, allow_pickle=False) as z:
        key, rows = str(z["key"]), dict(zip(z["ids"].tolist(), z["x"]))
    gone = [i for i in rows if i in sample_ids]
    if gone:
        for i in gone:
            del rows[i]
        save_features(path, key, rows)
    return len(gone)


def model_batch(cfg: ApaConfig) -> int:
    return cfg.train.eval_batch_size


# --- one shard ---------------------------------------------------------------------------------------
def train_shard(
    model: RecLM,
    init_state: dict[str, torch.Tensor],
    samples: list[Sample],
    cfg: ApaConfig,
    k: int,
    progress: bool = True,
) -> TrainResult:
    """Train shard k from the common init on ``samples`` (sorted by id), with the one training loop.

    The model holds the trained adapter afterwards."""
    samples = sorted(samples, key=lambda s: s.sample_id)
    load_adapter_state(model.model, init_state)
    return train(model, model.encode(samples), cfg.train, shard_seed(cfg.seed, k), progress=progress)


def shard_meta(
    cfg: ApaConfig, model: RecLM, k: int, samples: list[Sample], origin: str, result: TrainResult
) -> dict:
    return {
        "kind": "shard-adapter",
        "shard": k,
        "base_model": cfg.model.name,
        "base_fingerprint": model.fingerprint,
        "config_digest": cfg.digest(*ADAPTER_SECTIONS),
        "partition": cfg.shards.partition,
        "sample_ids": sorted(s.sample_id for s in samples),
        "n_samples": len(samples),
        "lineage_sha256": lineage_of(samples),
        "train_seed": shard_seed(cfg.seed, k),
        "origin": origin,
        "epochs_run": result.epochs_run,
        "train_seconds": result.seconds,
    }


def read_states(run: RunDir) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    """(shard numbers, adapter tensors) of the run's current shards."""
    folders = shard_folders(run)
    if not folders:
        raise RunError(f"{run.path} has no shard adapters ({ADAPTERS_DIR}/{SHARD_PREFIX}*)")
    return list(folders), [read_adapter(p)[0] for p in folders.values()]


# --- evaluation ----------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    metrics: dict
    seconds: dict


def evaluate_shards(
    cfg: ApaConfig,
    model: RecLM,
    valid: list[Sample],
    test: list[Sample],
    va: list[Encoded],
    te: list[Encoded],
    f_va: np.ndarray | None,
    f_te: np.ndarray | None,
    states: list[dict[str, torch.Tensor]],
    progress: bool = True,
) -> Evaluation:
    """Score every single adapter and every configured aggregation on the test samples."""
    bs = model_batch(cfg)
    y_te, users = [s.label for s in test], [s.user_id for s in test]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    per_te = score_each(model, te, states, bs, progress)  # (N, K)
    seconds["single_adapter"] = (time.perf_counter() - t0) / len(states)
    seconds["sisa"] = time.perf_counter() - t0
    singles = [binary_metrics(y_te, per_te[:, k], users) for k in range(len(states))]
    aggs: dict[str, dict] = {}
    omega = None
    if any(a in ("apa-d", "apa-nd") for a in cfg.shards.aggregations):
        t0 = time.perf_counter()
        per_va = score_each(model, va, states, bs, progress)  # (M, K): the pool's errors, K passes
        seconds["valid_pool_scoring"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        omega = apa_weights(
            f_te,
            f_va,
            per_va,
            [s.label for s in valid],
            cfg.shards.neighbours,
            cfg.shards.tau,
            cfg.shards.error,
        )
        seconds["weights"] = time.perf_counter() - t0
    for name in cfg.shards.aggregations:
        t0 = time.perf_counter()
        probs = aggregate(
            model, name, te, states, omega=omega, per_adapter=per_te, batch_size=bs, progress=progress
        )
        if name != "sisa":
            seconds[name] = time.perf_counter() - t0
        aggs[name] = binary_metrics(y_te, probs, users)
    metrics = {
        "aggregations": aggs,
        "auc_by_aggregation": {k: v["auc"] for k, v in aggs.items()},
        "single_shards": singles,
        "single_shard_mean_auc": float(np.mean([m["auc"] for m in singles])),
    }
    if omega is not None:
        metrics["weights"] = {"mean": omega.mean(0).tolist(), "mean_max": float(omega.max(1).mean())}
    return Evaluation(metrics, seconds)


# --- the procedure -------------------------------------------------------------------------------------
def run_shard_train(cfg: ApaConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train K shard adapters and evaluate every aggregation; returns metrics.json's content.

    With ``resume``, a shard whose saved adapter already holds exactly its shard's samples under the same
    config is kept instead of retrained.

    Raises:
        UserError: bad data, model or config. RunError: the run is busy, has an unfinished deletion
            request, or its ledger belongs to another data source.
    """
    run = RunDir(out)
    with run_lock(run.path):
        # 1. the ledger first: tombstoned samples never reach training
        ledger = Ledger(run / LEDGER_FILE)
        ledger.bind_source(cfg.data.source, cfg.data.path)
        pending = ledger.unfinished()
        if pending:
            raise RunError(
                f"deletion request {pending['id']} is unfinished ({pending['status']}); "
                f"finish it first: privrec forget {run.path} --resume"
            )
        tombstones = ledger.tombstones()
        # 2. data, then the model (the prompt builder needs the dataset's records)
        splits = setup_shard_data(cfg, tombstones)
        model, init_state = build_model(cfg, splits.dataset)
        run.write_config(cfg)
        run.log(
            f"privrec shard-train -> {run.path} (model {cfg.model.name}, K={cfg.shards.k}, partition "
            f"{cfg.shards.partition}, {len(tombstones)} tombstoned interactions)"
        )
        run.log(f"samples: {len(splits.train)} train, {len(splits.valid)} valid, {len(splits.test)} test")

        # 3. tokenise once; the frozen-layer cache once for every prompt (shared by all shards)
        tr, va, te = model.encode(splits.train), model.encode(splits.valid), model.encode(splits.test)
        t0 = time.perf_counter()
        model.prepare(tr + va + te, model_batch(cfg), progress)
        cache_seconds = time.perf_counter() - t0

        # 4. untuned hidden states: train (partition), valid + test (neighbours); only where needed
        need_train = cfg.shards.partition in ("semantic", "kmeans-balanced", "user")
        need_pool = any(a in ("apa-d", "apa-nd") for a in cfg.shards.aggregations)
        t0 = time.perf_counter()
        f_tr = load_features(run, model, cfg, tr, progress) if need_train else None
        f_va = load_features(run, model, cfg, va, progress) if need_pool else None
        f_te = load_features(run, model, cfg, te, progress) if need_pool else None
        features_seconds = time.perf_counter() - t0

        # 5. partition and train every shard from the common init
        t0 = time.perf_counter()
        shards = partition(
            cfg.shards.partition,
            [s.sample_id for s in splits.train],
            cfg.shards.k,
            cfg.seed,
            features=f_tr,
            users=[s.user_id for s in splits.train],
            iters=cfg.shards.iters,
        )
        partition_seconds = time.perf_counter() - t0
        run.log(f"partition {cfg.shards.partition}: shard sizes {[len(s) for s in shards]}")
        by_id = {s.sample_id: s for s in splits.train}
        origin = ledger.next_origin("shard-train")
        states, shard_seconds = [], []
        for k, ids in enumerate(shards):
            samples = [by_id[i] for i in ids]
            folder = shard_dir(run, k)
            kept = _reusable(folder, cfg, samples) if resume else None
            if kept is not None:
                run.log(f"shard {k}: kept (resume), {len(samples)} samples")
                _, meta = read_adapter(folder)
                if (ledger.latest_adapters().get(k) or {}).get("tensors_sha256") != meta["tensors_sha256"]:
                    # saved just before an interruption, never recorded: record it now
                    ledger.record_adapter(
                        k, meta["tensors_sha256"], meta["lineage_sha256"], len(samples), origin
                    )
                states.append(kept)
                shard_seconds.append(0.0)
                continue
            res = train_shard(model, init_state, samples, cfg, k, progress)
            save_adapter(model.model, folder, shard_meta(cfg, model, k, samples, origin, res))
            _, meta = read_adapter(folder)
            ledger.record_adapter(k, meta["tensors_sha256"], meta["lineage_sha256"], len(samples), origin)
            states.append(adapter_state(model.model))
            shard_seconds.append(res.seconds)
            run.log(
                f"shard {k}: {len(samples)} samples, trained {res.seconds:.1f}s, "
                f"last loss {res.history[-1]['train_loss']:.4f}"
            )
        _retire_extra_shards(run, ledger, cfg.shards.k, origin)
        models.write(run.path, models.build(cfg, run.path, "shards", partition=cfg.shards.partition,
                                            aggregations=cfg.shards.aggregations, primary=cfg.shards.primary,
                                            forget=["retrain-shards"]))

        # 6. the full-retrain baseline (not kept)
        retrain = None
        if cfg.shards.full_retrain:
            load_adapter_state(model.model, init_state)
            res = train(model, tr, cfg.train, cfg.seed, progress=progress)
            t0 = time.perf_counter()
            probs = model.score(te, model_batch(cfg), progress)
            retrain = binary_metrics([s.label for s in splits.test], probs, [s.user_id for s in splits.test])
            retrain.update(train_seconds=res.seconds, score_seconds=time.perf_counter() - t0, n_train=len(tr))
            run.log(f"full retrain: {len(tr)} samples, {res.seconds:.1f}s, test AUC {retrain['auc']:.4f}")

        # 7. score every aggregation
        ev = evaluate_shards(cfg, model, splits.valid, splits.test, va, te, f_va, f_te, states, progress)
        primary = ev.metrics["aggregations"][cfg.shards.primary]
        metrics = dict(primary)
        metrics.update(ev.metrics)
        for single, ids in zip(metrics["single_shards"], shards):
            single["n_train"] = len(ids)
        metrics.update(
            {
                "method": cfg.shards.primary,
                "partition": cfg.shards.partition,
                "k": cfg.shards.k,
                "shards": [len(s) for s in shards],
                "retrain": retrain,
                "n_train": len(splits.train),
                "n_valid": len(splits.valid),
                "n_test": len(splits.test),
                "n_tombstoned_interactions": len(tombstones),
                "train_seconds": float(sum(shard_seconds)),
                "shard_train_seconds": shard_seconds,
                "cache_seconds": cache_seconds,
                "features_seconds": features_seconds,
                "partition_seconds": partition_seconds,
                "score_seconds": ev.seconds,
                "references": baselines.references(
                    splits.dataset, splits.train, splits.test, cfg.data.like_threshold, cfg.seed
                ),
                "model": cfg.model.name,
                "protocol": cfg.data.protocol,
            }
        )
        from privrec.run import machine

        metrics["machine"] = machine()
        run.write_metrics(metrics)
        run.log(
            "test AUC: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics["auc_by_aggregation"].items())
            + f"; single shards mean {metrics['single_shard_mean_auc']:.4f}"
        )
        ledger.close()
        return metrics


def _reusable(folder: Path, cfg: ApaConfig, samples: list[Sample]) -> dict[str, torch.Tensor] | None:
    """The saved adapter of a shard when it holds exactly these samples under the same config."""
    if not is_adapter(folder):
        return None
    state, meta = read_adapter(folder)
    same = (
        meta.get("config_digest") == cfg.digest(*ADAPTER_SECTIONS)
        and meta.get("lineage_sha256") == lineage_of(samples)
        and meta.get("sample_ids") == sorted(s.sample_id for s in samples)
    )
    return state if same else None


def _retire_extra_shards(run: RunDir, ledger: Ledger, k: int, origin: str) -> None:
    """A re-partition into fewer shards removes the shards it no longer has."""
    for j, folder in shard_folders(run).items():
        if j >= k:
            shutil.rmtree(folder)
            ledger.record_adapter(j, None, None, 0, origin)
            run.log(f"shard {j}: removed (run now has K={k})")
