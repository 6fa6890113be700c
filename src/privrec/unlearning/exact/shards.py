"""Sharded exact unlearning's pieces (METHODS §4, §6): the ``shards`` config, one shard's seeded training from
the common init, its adapter metadata, the untuned model's features (cached per run), and the scoring of
every single shard and aggregation. ``privrec shard-train`` trains K shards; the ``retrain-shards`` route
(:mod:`privrec.unlearning.exact.routes`) retrains the shards that held deleted data.

Shard k always trains with seed ``shard_seed(seed, k)`` from the same init, on its ids in sorted order, for a
fixed number of epochs (no validation-based selection: validation samples are the aggregation's neighbour
pool, never training data). So retraining a shard without some samples gives exactly the adapter that
shard-train would have produced without them.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from privrec import prepare
from privrec.config import ExperimentConfig
from privrec.data import Dataset, Sample, Splits
from privrec.errors import RunError, UserError
from privrec.features import features_digest
from privrec.metrics import binary_metrics
from privrec.model.adapters import adapter_state, lineage_of, load_adapter_state, read_adapter, save_adapter
from privrec.model.recmodel import Encoded, RecLM
from privrec.prepare import source_data
from privrec.rundir import (
    ADAPTERS_DIR,
    FEATURES_FILE,
    SHARD_PREFIX,
    RunDir,
    is_adapter,
)
from privrec.train import TrainResult, train
from privrec.unlearning.exact.apa import aggregate, apa_weights, own_shares, score_each, self_in_pool
from privrec.unlearning.exact.ledger import excluded_ids
from privrec.unlearning.exact.slices import (
    StageState,
    run_stages,
    save_checkpoint,
    slicing_record,
    stage_dir,
    stage_features_record,
    stage_meta,
    stage_samples,
)

# config sections that decide what an adapter is (its hash in the adapter's metadata)
ADAPTER_SECTIONS = ("seed", "data", "prompt", "model", "lora", "train")


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    k: int = Field(4, ge=1, description="Number of shards K, one LoRA adapter each (METHODS §4: K=4).")
    partition: Literal["semantic", "random", "user", "kmeans-balanced", "semantic-users"] = Field(
        "semantic",
        description="semantic: APA's balanced semantic-aware k-means (METHODS §4); random: SISA; "
        "user: RecEraser-style whole users per shard; kmeans-balanced: GraphEraser-style balanced k-means; "
        "semantic-users: APA's balanced semantic walk on users (METHODS §9), so a user's samples are in one "
        "shard and a single-user deletion retrains one shard.",
    )
    slices: int = Field(
        1, ge=1, description="SISA slices R per shard (METHODS §9): a shard's samples cut into R slices of whole "
        "users (newest users last), trained in R stages on slices 1..s, each stage continuing from the previous "
        "stage's adapter and optimizer state, a checkpoint kept after every stage; a deletion replays only "
        "from the first slice it touches. 1 = no slicing (one training of the whole shard).",
    )
    slice_epochs: float | None = Field(
        None, gt=0, description="Passes over its data per stage when slices > 1 (a fraction trains that share of "
        "one pass, at least one batch); None = train.epochs. SISA's budget-neutral choice is "
        "2 * train.epochs / (slices + 1): then the R stages cost as much as one unsliced training.",
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
    own_weight: float = Field(
        0.0, ge=0, le=1, description="Weight w moving each scored sample's aggregation weights towards the shards "
        "that hold its own user's training samples: (1 - w) omega + w * (the share of the user's samples in each "
        "shard), for uniform, apa-d and apa-nd (SISA's mean is left as it is); a user with no training sample "
        "keeps omega. Inference only (no adapter changes); 0 = off. With semantic-users a user's samples sit in "
        "one shard, so w = 1 scores them with that shard's adapter alone.")
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
        if self.collab.inject:
            raise ValueError("collab.inject cannot be used with shard-train / forget yet: each shard's projector "
                             "reads CF vectors of its own MF, which the aggregations cannot combine; set "
                             "collab.inject=false (prompt.item_stats and prompt.cf_score are counted per shard)")
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
        if s.slices > 1 and self.data.n_train is not None and s.k * s.slices > self.data.n_train:
            raise ValueError(f"shards.k x shards.slices = {s.k * s.slices} exceeds data.n_train={self.data.n_train}")
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


def build_model(cfg: ApaConfig, data: Splits | Dataset) -> tuple[RecLM, dict[str, torch.Tensor]]:
    """The RecLM with a fresh seeded LoRA, and that fresh LoRA's tensors (every shard's starting point).

    Prompts that read counted features (METHODS §12) show, at inference, features counted over ``data.train``
    (the shards' samples as they are now: the data that remains, never deleted data; ``data`` must then be the
    splits); each shard trains on features counted over its own samples alone (:func:`train_shard`)."""
    if isinstance(data, Dataset):
        if cfg.shows_labels:
            raise ValueError("a shards model whose prompts read counted features is built from its splits")
        data = Splits(data, [], [], [])
    stats, collab = prepare.counted_features(cfg, data.train) if cfg.shows_labels else (None, None)
    model = prepare.build_model(cfg, data.dataset, stats=stats, collab=collab)
    return model, adapter_state(model.model)


def shard_features(cfg: ApaConfig, samples: list[Sample]) -> tuple:
    """The counted features shard training shows its prompts: counted over the shard's own samples only, so no
    label outside its lineage reaches it (METHODS §12); (None, None) when the prompts read none."""
    return prepare.counted_features(cfg, samples) if cfg.shows_labels else (None, None)


def shard_encodings(model: RecLM, cfg: ApaConfig, samples: list[Sample]) -> list[Encoded]:
    """A shard's training prompts as :func:`train_shard` renders them (under its own features)."""
    samples = sorted(samples, key=lambda s: s.sample_id)
    with model.features_of(shard_features(cfg, samples)):
        return model.encode(samples)


def job_encodings(model: RecLM, cfg: ApaConfig, job: ShardJob) -> list[Encoded]:
    """Every training prompt of a unit of shard work as it trains on them: the shard's under its own features;
    a sliced shard whose prompts read counted features, each stage's from ``job.first`` on under the features of
    the slices it has seen (as :func:`~privrec.unlearning.exact.slices.run_stages` renders them)."""
    if job.slices is None or not cfg.shows_labels:
        return shard_encodings(model, cfg, job.samples)
    return [e for s in range(job.first, len(job.slices) + 1)
            for e in shard_encodings(model, cfg, stage_samples(job.slices, s))]


def plain_encodings(model: RecLM, samples: list[Sample]) -> list[Encoded]:
    """``samples`` rendered without counted features: the partition of training samples reads these, so no
    sample's shard depends on other samples' labels (a deletion would otherwise have moved it)."""
    with model.features_of(None):
        return model.encode(samples)


# --- features: the untuned model's hidden states, cached per run ------------------------------------------
def _features_key(model: RecLM, cfg: ApaConfig) -> str:
    prec = "bf16" if model.bf16 else "fp32"
    prompt = cfg.prompt.model_dump_json()
    data = f"{cfg.data.history_len}|{cfg.data.like_threshold}|{cfg.data.history_gap}"
    key = f"{model.fingerprint}|{cfg.shards.features}|{prec}|{prompt}|{data}"
    if cfg.shows_labels:  # validation / test prompts show the counted features: a deletion changes them
        key += f"|{features_digest(*model.features)}"
    return key


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
    with model.features_of(shard_features(cfg, samples)):
        return train(model, model.encode(samples), cfg.train, shard_seed(cfg.seed, k), progress=progress)


@dataclass
class ShardJob:
    """One shard's training as a unit of work (:mod:`privrec.executor`): shard k on ``samples``; a sliced shard
    (METHODS §9) also with its ``slices`` (of samples), trained in stages ``first``..R from ``start`` (the state
    after stage first-1; None: the common init)."""

    k: int
    samples: list[Sample]
    slices: list[list[Sample]] | None = None
    first: int = 1
    start: StageState | None = None

    @property
    def slice_ids(self) -> list[list[str]] | None:
        """The slice map as sample ids (what the adapter records: ``sliced_fields``); None unsliced."""
        return None if self.slices is None else [[s.sample_id for s in sl] for sl in self.slices]


def train_task(shared: tuple, job: ShardJob) -> tuple[dict[str, torch.Tensor], TrainResult, dict[int, StageState]]:
    """THE unit of shard training for an executor: ``shared`` = (model, common init, config, progress); returns
    the trained adapter's tensors, the training result (no optimizer state) and, for a sliced shard, the state
    after every stage s < R (its checkpoints: adapter and optimizer state). Writes nothing: the caller saves the
    adapter (:func:`save_trained`) and the checkpoints. Run locally or in a Ray worker, it is :func:`train_shard`
    or :func:`~privrec.unlearning.exact.slices.run_stages`."""
    model, init_state, cfg, progress = shared
    if job.slices is None:
        res = train_shard(model, init_state, job.samples, cfg, job.k, progress)
        return adapter_state(model.model), dataclasses.replace(res, optimizer_state=None), {}
    checkpoints: dict[int, StageState] = {}

    def keep(s: int, _data, state: StageState) -> None:  # a copy: the next stage's optimizer steps its tensors
        checkpoints[s] = StageState(state.adapter, copy.deepcopy(state.optimizer))

    start = job.start or StageState(init_state, None)
    seconds = run_stages(model, start, job.slices, cfg, job.k, job.first, keep, progress)
    return adapter_state(model.model), TrainResult(epochs_run=len(job.slices) - job.first + 1,
                                                   seconds=seconds), checkpoints


def save_checkpoints(model: RecLM, cfg: ApaConfig, set_dir: Path, job: ShardJob,
                     checkpoints: dict[int, StageState], base_meta: dict) -> None:
    """Write the checkpoints a sliced unit returned (:func:`train_task`) under ``set_dir``, each with its stage's
    lineage, as :func:`~privrec.unlearning.exact.slices.train_sliced` writes them."""
    for s, state in sorted(checkpoints.items()):
        data = stage_samples(job.slices, s)
        load_adapter_state(model.model, state.adapter)
        save_checkpoint(model, stage_dir(set_dir, s), state,
                        stage_meta(base_meta, s, data, features=stage_features_record(cfg, data, s)))


def save_trained(model: RecLM, folder: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Save an adapter a task trained (its tensors put into the driver's model first)."""
    load_adapter_state(model.model, state)
    save_adapter(model.model, folder, meta)


def shard_meta(
    cfg: ApaConfig, model: RecLM, k: int, samples: list[Sample], origin: str, result: TrainResult
) -> dict:
    extra = {}
    if cfg.shows_labels:
        extra["features"] = features_record(cfg, samples)
    return prepare.adapter_meta(
        cfg, model, samples, config_digest=cfg.digest(*ADAPTER_SECTIONS), kind="shard-adapter", shard=k,
        partition=cfg.shards.partition, n_samples=len(samples), train_seed=shard_seed(cfg.seed, k), origin=origin,
        epochs_run=result.epochs_run, train_seconds=result.seconds, **extra)


def features_record(cfg: ApaConfig, samples: list[Sample]) -> dict | None:
    """A shard adapter's ``features`` record: counted over its own training samples (METHODS §12)."""
    samples = sorted(samples, key=lambda s: s.sample_id)
    return prepare.features_block(cfg, samples, "the shard's own training samples", shard_features(cfg, samples))


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
    shard_users: list[list[int]] | None = None,
) -> Evaluation:
    """Score every single adapter and every configured aggregation on the test samples (``shard_users``: the user
    of every training sample of each shard, for ``shards.own_weight``)."""
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
            self_in_pool([s.sample_id for s in test], [s.sample_id for s in valid]),  # leave-one-out on valid
        )
        seconds["weights"] = time.perf_counter() - t0
    own = own_of(cfg, users, shard_users)
    for name in cfg.shards.aggregations:
        t0 = time.perf_counter()
        probs = aggregate(
            model, name, te, states, omega=omega, per_adapter=per_te, batch_size=bs, progress=progress, own=own,
            own_weight=cfg.shards.own_weight
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


def own_of(cfg: ApaConfig, users: list[int], shard_users: list[list[int]] | None) -> np.ndarray | None:
    """(N, K) the share of each scored user's training samples in each shard (:func:`~.apa.own_shares`), or
    None when ``shards.own_weight`` is 0."""
    if cfg.shards.own_weight == 0:
        return None
    if shard_users is None:
        raise ValueError("shards.own_weight needs the shards' users")
    return own_shares(users, shard_users)


def users_of(metas: list[dict], train: list[Sample]) -> list[list[int]]:
    """The user of every current training sample of each shard, from the shard adapters' ``privrec.json``."""
    user = {s.sample_id: s.user_id for s in train}
    return [[user[i] for i in meta["sample_ids"] if i in user] for meta in metas]


def reusable(folder: Path, cfg: ApaConfig, samples: list[Sample],
             slices: list[list[str]] | None = None) -> dict[str, torch.Tensor] | None:
    """The saved adapter of a shard when it holds exactly these samples under the same config (and, sliced,
    the same slicing and slice map)."""
    if not is_adapter(folder):
        return None
    state, meta = read_adapter(folder)
    same = (
        meta.get("config_digest") == cfg.digest(*ADAPTER_SECTIONS)
        and meta.get("lineage_sha256") == lineage_of(samples)
        and meta.get("sample_ids") == sorted(s.sample_id for s in samples)
        and meta.get("slicing") == slicing_record(cfg)
        and meta.get("slices") == slices
    )
    return state if same else None
