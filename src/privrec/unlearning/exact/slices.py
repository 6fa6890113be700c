"""SISA slicing inside a shard (METHODS §9, SISA §4.2): train a shard in R stages, keep a checkpoint after
each, and on a deletion replay only the stages from the first slice that held the deleted data.

Slices: the shard's samples are cut into R ordered slices of whole users, oldest users first
(:func:`privrec.unlearning.exact.partition.user_slices`), so a user's samples sit in one slice and the
newest users, the likeliest to leave, in the last ones. The slice map is part of the shard adapter's
``privrec.json`` (``slices``); a deletion keeps it and only takes the deleted samples out of their slice.

Stages: stage s trains on slices 1..s, starting from the adapter AND the AdamW state left by stage s-1 (stage 1:
the shard's common LoRA init and a fresh optimizer), with its own seed ``stage_seed(seed, k, s)`` and its own
learning-rate schedule over its own steps (warm-up and decay restart every stage), for ``shards.slice_epochs``
passes over its data (default ``train.epochs``). The schedule is per stage on purpose: one schedule over all
stages would need the later slices' sizes, so the checkpoint after stage s would depend on data it never saw
and could not be restored after a deletion in a later slice. So the checkpoint after stage s (adapter +
optimizer state) is a function of slices 1..s, the seed and the config alone, and replaying stages j..R from
checkpoint j-1 without the deleted samples gives bit for bit what sliced training from scratch on the remaining
samples (same slice map, same seed) gives. A stage whose own slice is empty is skipped (its checkpoint equals
the previous one).

Counted features (METHODS §12): a stage's prompts show the features counted over the samples it has seen (slices
1..s) and nothing else, so its checkpoint's lineage holds every label that reached it, and a deletion in slice j
changes no feature of stages before j. The checkpoint's ``privrec.json`` records them (``features``), as the
adapter records those of the whole shard (stage R).

Checkpoints: ``RUN/slices/shard-K/stage-S/`` for S = 1..R-1 (the state after stage R is the shard adapter
itself): a peft adapter folder whose ``privrec.json`` carries the checkpoint's own lineage (the samples of
slices 1..S that reached it), plus ``optimizer.pt``. The shard adapter's ``privrec.json`` records each
checkpoint's tensor hash and lineage (``checkpoints``), so ``forget --verify`` checks them like adapters. A
deletion writes the replayed checkpoints into the request's staging folder (unaffected ones are copied) and
swaps the whole set in with the adapter, so every checkpoint whose lineage held deleted data is gone when the
request is installed.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from privrec import prepare
from privrec.data import Sample
from privrec.errors import RunError
from privrec.model.adapters import (
    adapter_state,
    lineage_of,
    load_adapter_state,
    read_adapter,
    save_adapter,
    tensors_digest,
)
from privrec.model.recmodel import RecLM
from privrec.rundir import SHARD_PREFIX, SLICES_DIR, is_adapter, swap_in
from privrec.train import shuffled_length_batches, train
from privrec.unlearning.exact.certificate import check_adapter
from privrec.unlearning.exact.partition import user_slices

STAGE_PREFIX = "stage-"
OPTIMIZER_FILE = "optimizer.pt"
INIT = "init"  # what a replay from the first slice restores: the shard's common LoRA init


@dataclass
class StageState:
    """What a stage leaves for the next: the adapter tensors and AdamW's state (None before stage 1)."""

    adapter: dict[str, torch.Tensor]
    optimizer: dict | None


def stage_seed(seed: int, k: int, s: int) -> int:
    """Seed of stage s of shard k (shuffling and dropout)."""
    return int(np.random.SeedSequence([seed, 104729, k, s]).generate_state(1)[0])


def slice_map(samples: list[Sample], r: int) -> list[list[str]]:
    """The R slices of one shard's samples (ids sorted within a slice): whole users, oldest first."""
    samples = sorted(samples, key=lambda s: s.sample_id)
    first: dict[int, int] = {}
    for s in samples:
        first[s.user_id] = min(s.timestamp, first.get(s.user_id, s.timestamp))
    labels = user_slices([s.user_id for s in samples], [first[s.user_id] for s in samples], r)
    return [[s.sample_id for s, lab in zip(samples, labels) if lab == j] for j in range(r)]


def cumulative(slices: list[list[str]], s: int) -> list[str]:
    """The sample ids of slices 1..s, sorted: the lineage of the checkpoint after stage s."""
    return sorted(i for sl in slices[:s] for i in sl)


def stage_samples(slices: list[list[Sample]], s: int) -> list[Sample]:
    """The samples of slices 1..s in sample-id order: what stage s trains on (:func:`cumulative` of samples)."""
    return sorted((x for sl in slices[:s] for x in sl), key=lambda x: x.sample_id)


def first_affected(old: list[list[str]], new: list[list[str]]) -> int | None:
    """The first slice (1-based) that lost samples, or None."""
    return next((j + 1 for j, (a, b) in enumerate(zip(old, new)) if len(b) < len(a)), None)


def slicing_record(cfg) -> dict | None:
    """What the adapter records about its slicing (None unsliced): a saved adapter is reusable only when equal."""
    s = cfg.shards
    if s.slices == 1:
        return None
    return {"r": s.slices, "slice_epochs": s.slice_epochs if s.slice_epochs is not None else cfg.train.epochs}


def _stage_plan(cfg):
    """(train config, batch plan) of one stage: ``slice_epochs`` passes, the last one cut to its fraction."""
    passes = cfg.shards.slice_epochs if cfg.shards.slice_epochs is not None else cfg.train.epochs
    epochs = math.ceil(passes)
    tcfg = cfg.train.model_copy(update={"epochs": epochs})
    frac = passes - (epochs - 1)
    if frac >= 1:
        return tcfg, None

    def plan(epoch, rng, data):
        batches = shuffled_length_batches(len(data), tcfg.batch_size, rng, data)
        return batches if epoch < epochs - 1 else batches[: max(1, round(frac * len(batches)))]

    return tcfg, plan


def stage_features_record(cfg, data: list[Sample], s: int) -> dict | None:
    """A checkpoint's ``features`` record (None when the prompts read none): counted over ``data``, the samples
    of slices 1..s (METHODS §12)."""
    if not cfg.shows_labels:
        return None
    return prepare.features_block(cfg, data, f"slices 1..{s} of the shard", prepare.counted_features(cfg, data))


def run_stages(model: RecLM, start: StageState, slices: list[list[Sample]], cfg, k: int, first: int,
               on_stage: Callable[[int, list[Sample], StageState], None] | None = None,
               progress: bool = True) -> float:
    """Train stages ``first``..R of shard k from ``start`` (the state after stage first-1); the model holds the
    adapter after stage R. ``on_stage(s, samples of slices 1..s, state)`` is called after every stage s < R.
    Stage s's prompts show the counted features of slices 1..s alone (METHODS §12). Returns the training
    seconds."""
    tcfg, plan = _stage_plan(cfg)
    state, seconds = start, 0.0
    load_adapter_state(model.model, state.adapter)
    r = len(slices)
    for s in range(first, r + 1):
        data = stage_samples(slices, s)
        if slices[s - 1]:  # a stage whose own slice is empty changes nothing: skipped
            load_adapter_state(model.model, state.adapter)
            counted = (model.features_of(prepare.counted_features(cfg, data)) if cfg.shows_labels
                       else contextlib.nullcontext())
            with counted:
                res = train(model, model.encode(data), tcfg, stage_seed(cfg.seed, k, s), batch_plan=plan,
                            progress=progress, optimizer_state=state.optimizer)
            state = StageState(adapter_state(model.model), res.optimizer_state)
            seconds += res.seconds
        if s < r and on_stage is not None:
            on_stage(s, data, state)
    load_adapter_state(model.model, state.adapter)
    return seconds


# --- checkpoints on disk -------------------------------------------------------------------------------------
def checkpoint_set(root: Path, k: int, prefix: str = SHARD_PREFIX) -> Path:
    """The folder of shard k's (``prefix`` client-: client k's) checkpoints under a run (or a request's staging
    folder)."""
    return Path(root) / SLICES_DIR / f"{prefix}{k}"


def stage_dir(set_dir: Path, s: int) -> Path:
    return Path(set_dir) / f"{STAGE_PREFIX}{s}"


def complete(folder: Path) -> bool:
    return is_adapter(folder) and (Path(folder) / OPTIMIZER_FILE).is_file()


def save_checkpoint(model: RecLM, folder: Path, state: StageState, meta: dict) -> None:
    """Write a checkpoint folder atomically (adapter + optimizer state, then one rename). The model must hold
    ``state.adapter``."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model.model, tmp, meta)
    torch.save(state.optimizer, tmp / OPTIMIZER_FILE)
    swap_in(tmp, folder)


def checkpoint_records(set_dir: Path, r: int) -> list[dict]:
    """The shard adapter's record of its checkpoints 1..R-1 (``checkpoints`` in its ``privrec.json``)."""
    out = []
    for s in range(1, r):
        state, meta = read_adapter(stage_dir(set_dir, s))
        out.append({"stage": s, "tensors_sha256": tensors_digest(state), "lineage_sha256": meta["lineage_sha256"],
                    "n_samples": len(meta["sample_ids"])})
    return out


def train_sliced(model: RecLM, start: StageState, slices: list[list[Sample]], cfg, k: int, first: int,
                 set_dir: Path, base_meta: dict, progress: bool = True,
                 fault: Callable[[str], None] | None = None) -> float:
    """Stages ``first``..R from ``start``, every checkpoint s < R saved under ``set_dir`` (``fault`` is called
    after each: tests kill the process there); the model holds the final adapter. Returns training seconds."""

    def on_stage(s: int, data: list[Sample], state: StageState) -> None:
        save_checkpoint(model, stage_dir(set_dir, s), state,
                        stage_meta(base_meta, s, data, features=stage_features_record(cfg, data, s)))
        if fault is not None:
            fault(f"checkpoint-shard-{k}-stage-{s}")

    return run_stages(model, start, slices, cfg, k, first, on_stage, progress)


def load_checkpoint(folder: Path) -> tuple[StageState, dict]:
    state, meta = read_adapter(folder)
    try:  # weights only: optimizer state is tensors and numbers; nothing in the file can run code
        optimizer = torch.load(Path(folder) / OPTIMIZER_FILE, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RunError(f"{folder}: unreadable optimizer state ({type(e).__name__}); train the model again") from None
    return StageState(state, optimizer), meta


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder atomically (a copy, then one rename)."""
    tmp = dst.with_name(f".{dst.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp)
    swap_in(tmp, dst)


def stage_meta(base: dict, s: int, samples: list[Sample], kind: str = "shard-checkpoint",
               features: dict | None = None) -> dict:
    """A checkpoint's ``privrec.json``: the shard's (client's) adapter metadata with this stage's own lineage and
    its own ``features`` record (:func:`stage_features_record`; never the whole shard's)."""
    meta = {key: v for key, v in base.items() if key != "features"}
    if features is not None:
        meta["features"] = features
    return dict(meta, kind=kind, stage=s, sample_ids=sorted(x.sample_id for x in samples),
                lineage_sha256=lineage_of(samples), n_samples=len(samples))


def check_checkpoints(set_dir: Path, meta: dict, universe: dict[str, Sample],
                      tombstones: set[tuple[int, int]]) -> list[str]:
    """Problems of a shard's checkpoints against its adapter's ``privrec.json``: every recorded checkpoint is
    there, hashes to its record, holds exactly slices 1..s of the adapter's slice map, its lineage recomputes
    from the data and holds no deleted sample; no other checkpoint folder lies beside them."""
    problems = []
    records = meta.get("checkpoints") or []
    slices = meta.get("slices") or []
    expected = set()
    for rec in records:
        s = rec["stage"]
        folder = stage_dir(set_dir, s)
        expected.add(folder.name)
        if not complete(folder):
            problems.append(f"checkpoint {folder.name} missing")
            continue
        c = check_adapter(folder, universe, tombstones, rec["tensors_sha256"])
        problems += [f"checkpoint {folder.name}: {p}" for p in c["problems"]]
        if c["lineage_sha256"] != rec["lineage_sha256"]:
            problems.append(f"checkpoint {folder.name}: lineage differs from the adapter's record")
        if read_adapter(folder)[1].get("sample_ids") != cumulative(slices, s):
            problems.append(f"checkpoint {folder.name}: does not hold exactly slices 1..{s} of the adapter")
    set_dir = Path(set_dir)
    for p in sorted(set_dir.iterdir()) if set_dir.is_dir() else []:
        if p.name not in expected:
            problems.append(f"checkpoint folder {p.name} is not recorded by the adapter (may hold deleted data)")
    return problems


def restore(set_dir: Path, meta: dict, s: int, init_state: dict[str, torch.Tensor]) -> StageState:
    """The state after stage s of the shard whose adapter metadata is ``meta`` (s = 0: the common init), checked
    against the adapter's record of that checkpoint.

    Raises:
        RunError: the checkpoint is missing or differs from the record.
    """
    if s == 0:
        return StageState(init_state, None)
    folder = stage_dir(set_dir, s)
    rec = next((c for c in meta.get("checkpoints") or [] if c["stage"] == s), None)
    if rec is None or not complete(folder):
        raise RunError(f"{folder}: the checkpoint to replay from is missing; train the model again (privrec "
                       "shard-train --resume, or privrec federate)")
    state, _ = load_checkpoint(folder)
    if tensors_digest(state.adapter) != rec["tensors_sha256"]:
        raise RunError(f"{folder}: the checkpoint differs from the one its shard recorded")
    return state


def stage_label(s: int) -> str:
    return INIT if s == 0 else f"{STAGE_PREFIX}{s}"


def sliced_fields(cfg, slices: list[list[str]], set_dir: Path) -> dict:
    """What a sliced shard adapter's ``privrec.json`` adds: its slicing, slice map and checkpoint records."""
    return {"slicing": slicing_record(cfg), "slices": slices,
            "checkpoints": checkpoint_records(set_dir, cfg.shards.slices)}
