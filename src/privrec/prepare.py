"""What every command sets up: the protocol's splits (minus deleted data), the model with its LoRA (built in
this one place), the metadata saved beside every adapter, and the small pieces of scoring every procedure
shares (metrics of one split, its predictions file, the machine it ran on).
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from privrec import baselines
from privrec.config import DataConfig, ExperimentConfig, LoraConfig
from privrec.data import (
    Dataset,
    ItemStats,
    Sample,
    Splits,
    build_ranking_splits,
    build_splits,
    like_splits,
    load_dataset,
    windows,
)
from privrec.data.ranking import training_interactions
from privrec.errors import DataError, UserError
from privrec.features import CollabFeatures, features_digest
from privrec.metrics import binary_metrics
from privrec.model.adapters import lineage_of
from privrec.model.backbone import use_bf16
from privrec.model.recmodel import Encoded, RecLM
from privrec.rundir import atomic_write_text

Tombstones = set[tuple[int, int]] | frozenset[tuple[int, int]]


# --- data ---------------------------------------------------------------------------------------------------
def shows_tombstoned(sample: Sample, tombstones: Tombstones) -> bool:
    """True when the sample's target or any history item is a deleted (user, item) interaction (a later
    sample's prompt repeats the rating of every history item)."""
    if (sample.user_id, sample.item_id) in tombstones:
        return True
    return any((sample.user_id, item) in tombstones for item, _ in sample.history)


def without_tombstoned(splits: Splits, tombstones: Tombstones) -> Splits:
    """The same splits minus every sample that shows a deleted interaction (the pool too)."""
    if not tombstones:
        return splits

    def keep(part: list[Sample]) -> list[Sample]:
        return [s for s in part if not shows_tombstoned(s, tombstones)]

    return Splits(splits.dataset, keep(splits.train), keep(splits.valid), keep(splits.test), pool=keep(splits.pool),
                  ranking=splits.ranking)


def setup_data(cfg: ExperimentConfig, tombstones: Tombstones = frozenset()) -> Splits:
    """Load the configured dataset and cut the protocol's splits; with ``tombstones`` (a model's deleted
    interactions), every sample showing one is dropped from the draw (the draw itself stays the same).

    Raises:
        DataError / AssetError: missing or malformed data, or the embedded copy cannot be fetched.
        UserError: no training or no test sample.
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
        splits = without_tombstoned(build_splits(ds, cfg.data, cfg.seed), tombstones)
    if not splits.train or not splits.test:
        raise UserError(f"protocol {cfg.data.protocol} yields {len(splits.train)} train / {len(splits.test)} "
                        "test samples; need at least one of each")
    return splits


@functools.lru_cache(maxsize=2)
def _source_data(data_json: str, seed: int) -> tuple[Dataset, dict[str, Sample], Splits]:
    data = DataConfig.model_validate_json(data_json)
    ds = load_dataset(data.source, data.path)
    seqs = windows(ds, data.history_len, data.like_threshold, data.history_gap)
    universe = {s.sample_id: s for seq in seqs for s in seq}  # every sample the source can give, by id
    return ds, universe, build_splits(ds, data, seed)


def source_data(cfg: ExperimentConfig) -> tuple[Dataset, dict[str, Sample], Splits]:
    """(dataset, every like-prediction sample the source can give by id, the run's split draw before
    tombstones), memoised per process: all three are pure functions of the source files and the data config
    (read-only: never mutate them). What lineages are checked against.

    Raises:
        DataError / AssetError: missing or malformed data.
    """
    return _source_data(cfg.data.model_dump_json(), cfg.seed)


def without_interactions(ds: Dataset, tombstones: Tombstones) -> Dataset:
    """The dataset as a model that forgot ``tombstones`` sees it: those (user, item) interactions gone."""
    if not tombstones:
        return ds
    keys = zip(ds.inter["user_id"].tolist(), ds.inter["item_id"].tolist())
    keep = np.array([k not in tombstones for k in keys], dtype=bool)
    return Dataset(ds.name, ds.inter[keep], ds.items, ds.users, ds.schema)


def user_interactions(ds: Dataset, users: Iterable[int]) -> set[tuple[int, int]]:
    """Every (user, item) interaction of ``users`` in ``ds`` (what forgetting them whole deletes)."""
    rows = ds.inter[ds.inter["user_id"].isin(list(users))]
    return set(zip(rows["user_id"].tolist(), rows["item_id"].tolist()))


def labelled_pool(cfg: ExperimentConfig, splits: Splits) -> list[Sample]:
    """The training labels a run may count beyond its own training samples: the whole training pool of the
    protocol when its prompts show counted features (``prompt.item_stats``, ``prompt.cf_score``,
    ``collab.inject``: the item statistics and the CF model are counted over it), else just the drawn
    training samples. The run's references learn from the same samples, so no row of the
    table sees labels another does not. Never a validation or test label."""
    return splits.pool if cfg.shows_labels and splits.pool else splits.train


def item_stats(cfg: ExperimentConfig, splits: Splits) -> ItemStats | None:
    """What ``prompt.item_stats`` shows: item like counts over :func:`labelled_pool` (None when off)."""
    return ItemStats.of(labelled_pool(cfg, splits)) if cfg.prompt.item_stats else None


@functools.lru_cache(maxsize=4)
def _collab(pool: tuple[Sample, ...], dim: int, epochs: int, weight_decay: float, folds: int, seed: int):
    return CollabFeatures.fit(pool, dim, epochs, weight_decay, folds, seed)


_IMPLICIT: dict[str, CollabFeatures] = {}


def _collab_implicit(cfg: ExperimentConfig, splits: Splits) -> CollabFeatures:
    c, rs = cfg.collab, splits.ranking
    key = f"{cfg.data.model_dump_json()}|{cfg.ranking.model_dump_json()}|{cfg.seed}|{c.model_dump_json()}"
    if key not in _IMPLICIT:
        users, items, _ = training_interactions(rs)
        _IMPLICIT.clear()  # one at a time: a process works on one protocol
        _IMPLICIT[key] = CollabFeatures.fit_implicit(users, items, np.array(sorted(rs.dataset.items)), splits.train,
                                                     c.dim, c.epochs, c.weight_decay, c.folds, cfg.seed)
    return _IMPLICIT[key]


def collab_features(cfg: ExperimentConfig, splits: Splits) -> CollabFeatures | None:
    """The CF features ``prompt.cf_score`` and ``collab.inject`` read (METHODS §12), None when neither option
    is on. Like-prediction: the MF of ``cfg.collab`` fit on the ratings of :func:`labelled_pool`, cross-fitted
    for its samples. Ranking: BPR-MF on the training period's interactions
    (:func:`privrec.data.ranking.training_interactions`), cross-fitted by training user. Memoised per process
    (a fit is seconds, and evaluate, recommend and forget rebuild models)."""
    if not (cfg.prompt.cf_score or cfg.collab.inject):
        return None
    c = cfg.collab
    if cfg.task == "ranking":
        return _collab_implicit(cfg, splits)
    return _collab(tuple(labelled_pool(cfg, splits)), c.dim, c.epochs, c.weight_decay, c.folds, cfg.seed)


def counted_features(cfg: ExperimentConfig, samples: list[Sample]) -> tuple[ItemStats | None, CollabFeatures | None]:
    """The counted features of a like-prediction config computed over ``samples`` alone (METHODS §12, features
    with lineage): an adapter trained on exactly these samples (a shard) shows its prompts features counted
    from them, so a deletion outside them never reaches it. (None, None) when the prompts read none."""
    stats = ItemStats.of(samples) if cfg.prompt.item_stats else None
    collab = None
    if cfg.prompt.cf_score or cfg.collab.inject:
        c = cfg.collab
        collab = _collab(tuple(sorted(samples, key=lambda x: x.sample_id)), c.dim, c.epochs, c.weight_decay,
                         c.folds, cfg.seed)
    return stats, collab


def features_block(cfg: ExperimentConfig, samples: list[Sample], counted_over: str,
                   features: tuple[ItemStats | None, CollabFeatures | None]) -> dict | None:
    """The ``features`` record of an adapter whose prompts read ``features`` counted over ``samples`` (None when
    its prompts read none): which features, what they were counted over (the samples' count and
    :func:`~privrec.model.adapters.lineage_of` hash: part of the adapter's lineage) and their
    :func:`~privrec.features.features_digest`."""
    if not cfg.shows_labels:
        return None
    uses = [name for name, on in (("prompt.item_stats", cfg.prompt.item_stats),
                                  ("prompt.cf_score", cfg.prompt.cf_score), ("collab.inject", cfg.collab.inject)) if on]
    return {"uses": uses, "counted_over": counted_over, "n_samples": len(samples),
            "lineage_sha256": lineage_of(samples), "digest": features_digest(*features)}


def features_record(cfg: ExperimentConfig, splits: Splits) -> dict | None:
    """The ``features`` block of an adapter whose prompts read features counted from labels (METHODS §12,
    features with lineage; None when its prompts read none): which features, the samples they were counted over
    (:func:`labelled_pool`: their count and :func:`~privrec.model.adapters.lineage_of` hash, so that they are
    part of what the adapter learnt from) and :func:`~privrec.features.features_digest` of what was computed.
    ``splits`` already lack the deleted data (:func:`setup_data` with the model's tombstones), so a retrain's
    record is its recomputation without them and ``privrec forget --verify`` can recompute it from the data."""
    if not cfg.shows_labels:
        return None
    return features_block(cfg, labelled_pool(cfg, splits), "the protocol's training pool minus deleted data",
                          (item_stats(cfg, splits), collab_features(cfg, splits)))


def references(cfg: ExperimentConfig, splits: Splits) -> dict:
    """The references of METHODS §0 and the trained CF reference of §12 on the test samples, learnt from
    :func:`labelled_pool` (the MF's size chosen on the validation samples)."""
    return baselines.references(splits.dataset, labelled_pool(cfg, splits), splits.test, cfg.data.like_threshold,
                                cfg.seed, valid=splits.valid)


# --- the model ----------------------------------------------------------------------------------------------
def build_model(cfg: ExperimentConfig, dataset: Dataset, *, lora: LoraConfig | None = None, seed: int | None = None,
                stats: ItemStats | None = None, collab: CollabFeatures | None = None, cls: type[RecLM] = RecLM,
                before_lora: Callable[[RecLM], None] | None = None, plain: bool = False) -> RecLM:
    """THE place a model is built: the backbone and prompt builder of ``cfg`` with a fresh seeded LoRA.

    ``lora`` / ``seed`` default to the config's (an E2URec student has its own LoRA); ``cls`` and
    ``before_lora`` let the federated split build its :class:`SplitRecLM` and cut it before LoRA is attached
    (which sets the frozen-cache cut). ``stats`` / ``collab``: the counted features the prompts read
    (:func:`item_stats`, :func:`collab_features`); with ``collab.inject`` the model gets its seeded projector.
    ``plain``: none yet (a federation's model: each client renders under its own, :class:`FederatedClient`).
    """
    model = cls.from_config(cfg, dataset, item_stats=stats, collab=collab, plain=plain)
    if before_lora is not None:
        before_lora(model)
    if cfg.collab.inject:
        model.attach_collab(cfg.collab.hidden, cfg.seed if seed is None else seed)
    model.attach_lora(lora or cfg.lora, cfg.seed if seed is None else seed)
    return model


def setup_model(cfg: ExperimentConfig, splits: Splits) -> RecLM:
    """The model of a ``train`` run: :func:`build_model` with the counted features its prompts show."""
    return build_model(cfg, splits.dataset, stats=item_stats(cfg, splits), collab=collab_features(cfg, splits))


def adapter_meta(cfg: ExperimentConfig, model: RecLM, samples: Iterable[Sample], config_digest: str | None = None,
                 **extra) -> dict:
    """The ``privrec.json`` of an adapter: base model and its fingerprint, config digest, and its lineage (the
    ids of the original samples that reached it and :func:`~privrec.model.adapters.lineage_of` over them),
    plus ``extra`` (which may override the lineage, e.g. an approximate method keeps its original's)."""
    samples = list(samples)
    return {"base_model": cfg.model.name, "base_fingerprint": model.fingerprint,
            "config_digest": config_digest or cfg.digest(), "sample_ids": sorted(s.sample_id for s in samples),
            "lineage_sha256": lineage_of(samples), **extra}


# --- scoring shared by the procedures -------------------------------------------------------------------------
def evaluate_split(model: RecLM, samples: list[Sample], items: list[Encoded], batch_size: int,
                   progress: bool = True) -> tuple[dict, np.ndarray]:
    probs = model.score(items, batch_size, progress)
    return binary_metrics([s.label for s in samples], probs, [s.user_id for s in samples]), probs


def write_predictions(path: Path, samples: list[Sample], probs: np.ndarray) -> None:
    lines = ["sample_id,user_id,item_id,label,p_yes"]
    lines += [f"{s.sample_id},{s.user_id},{s.item_id},{s.label},{p:.6f}" for s, p in zip(samples, probs)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def cpu_kind() -> str:
    """The CPU's vendor and the kind that sets privrec's speed and precision (ENVIRONMENT.md): ``Intel
    AVX512-BF16+AMX``, ``AMD AVX512-BF16``, ``Intel AVX2``, ... (an emulated ISA reads as the real one)."""
    vendor = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(line.split(":", 1)[1].strip(), "")
                break
    except OSError:
        pass
    isa = ("AVX512-BF16+AMX" if torch.cpu._is_amx_tile_supported() else
           "AVX512-BF16" if torch.cpu._is_avx512_bf16_supported() else
           "AVX512" if torch.cpu._is_avx512_supported() else
           "AVX2" if torch.cpu._is_avx2_supported() else platform.machine())
    return f"{vendor} {isa}".strip()


def machine() -> str:
    """Where a number was measured: the device (the CPU's kind and threads), the default precision there, torch."""
    if torch.cuda.is_available():
        return f"{platform.machine()} {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    precision = "bf16 autocast" if use_bf16("auto", torch.device("cpu")) else "fp32"
    return (f"{platform.machine()} {cpu_kind()} CPU x{torch.get_num_threads()} threads, {precision}, "
            f"torch {torch.__version__}")
