"""THE training loop. Centralised training, federated clients, shard adapters and unlearning students all
call :func:`train` with their own data, loss and adapter (DESIGN.md: one trainer, one scorer).

Loss (METHODS §0): cross-entropy of the 2-way softmax over the Yes/No logits against the label, i.e.
``BCEWithLogits(z_yes - z_no, y)``; soft targets in [0, 1] are allowed (distillation). AdamW over the
trainable (LoRA) weights, gradient accumulation, a warm-up + linear/cosine schedule, early stopping on
validation AUC (or UAUC, ``train.select``), and an atomic checkpoint after every epoch from which
``resume=True`` continues.

Learning curve: every validation scoring (each epoch end, and every ``train.eval_every`` optimizer steps
inside an epoch) appends a point {epoch, steps, samples_seen, valid_auc, valid_uauc, seconds} to
``TrainResult.curve``; ``seconds`` is training time only. Mid-epoch scoring runs under a forked RNG, so it
never changes what is trained; the best epoch is still chosen at epoch ends only.

Determinism: epoch e shuffles with ``default_rng([seed, e])`` and seeds dropout with ``(seed, e)``, so a
run resumed from the checkpoint of epoch e-1 repeats exactly what the uninterrupted run did (the curve
points of the interrupted epoch included: they are recomputed, not kept).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from privrec.config import ExperimentConfig
from privrec.data import Sample, Splits, augment
from privrec.errors import RunError, TrainingError
from privrec.metrics import auc, uauc
from privrec.model.adapters import adapter_state, load_adapter_state, originals, read_meta, save_adapter
from privrec.model.recmodel import Batch, Encoded, RecLM
from privrec.prepare import adapter_meta, features_record, setup_data, setup_model
from privrec.progress import track
from privrec.rundir import CHECKPOINT_FILE

# Checkpoint keys (a typed record on disk; constants so readers and writers agree).
CKPT_EPOCH = "epoch"
CKPT_ADAPTER = "adapter"
CKPT_OPTIMIZER = "optimizer"
CKPT_BEST = "best_adapter"
CKPT_STATE = "loop_state"

LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]
Regularizer = Callable[[], torch.Tensor]
BatchPlan = Callable[[int, np.random.Generator, list[Encoded]], list[list[int]]]


def bce_loss(z: torch.Tensor, batch: Batch) -> torch.Tensor:
    """2-way cross-entropy of softmax([z_yes, z_no]) against the (possibly soft) label."""
    return F.binary_cross_entropy_with_logits(z, batch.labels)


def shuffled_length_batches(n_items: int, batch_size: int, rng: np.random.Generator,
                            items: list[Encoded], pool: int = 32) -> list[list[int]]:
    """Random batches of similar length: shuffle, sort within pools of ``pool`` batches, shuffle batches."""
    order = rng.permutation(n_items)
    batches = []
    span = batch_size * pool
    for s in range(0, n_items, span):
        chunk = sorted(order[s: s + span].tolist(), key=lambda i: len(items[i]))
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class TrainResult:
    epochs_run: int = 0
    best_epoch: int = -1  # chosen by ``train.select``
    best_valid_auc: float = float("nan")  # validation AUC of the best epoch
    best_valid_uauc: float = float("nan")  # validation UAUC of the best epoch (NaN without user ids)
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, valid_auc, valid_uauc, seconds
    curve: list[dict] = field(default_factory=list)  # every validation scoring, epoch ends and eval_every
    seconds: float = 0.0
    samples_seen: int = 0
    steps: int = 0
    stopped_early: bool = False
    optimizer_state: dict | None = None  # AdamW's state at the end (a sliced shard's next stage continues it)

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.seconds if self.seconds > 0 else float("nan")


def lr_factor(cfg, step: int, total_steps: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based) out of ``total_steps``: linear warm-up
    over ``cfg.warmup_ratio`` of the steps, then constant, linear decay to 0, or cosine decay to 0."""
    warm = int(cfg.warmup_ratio * total_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total_steps - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def validation_scores(model: RecLM, valid: list[Encoded], batch_size: int, progress: bool = False) -> dict:
    """``valid_auc``, and ``valid_uauc`` when every validation item carries its user id."""
    probs = model.score(valid, batch_size, progress)
    labels = [e.label for e in valid]
    out = {"valid_auc": auc(labels, probs)}
    users = [e.user_id for e in valid]
    if all(u is not None for u in users):
        out["valid_uauc"] = uauc(users, labels, probs)
    return out


def improves(value: float, best: float) -> bool:
    """Whether a validation score beats the best so far: anything beats nothing (NaN best), NaN beats nothing."""
    if math.isnan(best):
        return True
    return not math.isnan(value) and value > best


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A training checkpoint, read with torch's weights-only loader (tensors, numbers, strings, lists and dicts:
    nothing in the file can run code).

    Raises:
        RunError: not a readable privrec checkpoint (e.g. it holds objects, or it is torn).
    """
    try:
        ck = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the file holds, one line
        raise RunError(f"{path} is not a privrec training checkpoint ({type(e).__name__}); remove it and "
                       "train again") from None
    if not isinstance(ck, dict) or not {CKPT_EPOCH, CKPT_ADAPTER, CKPT_OPTIMIZER, CKPT_STATE} <= set(ck):
        raise RunError(f"{path} is not a privrec training checkpoint; remove it and train again")
    return ck


def train(model: RecLM, data: list[Encoded], cfg, seed: int, valid: list[Encoded] | None = None,
          checkpoint_dir: Path | None = None, resume: bool = False, loss_fn: LossFn = bce_loss,
          regularizer: Regularizer | None = None, batch_plan: BatchPlan | None = None,
          lr_scale: float = 1.0, progress: bool = True, on_epoch: Callable[[dict], None] | None = None,
          optimizer_state: dict | None = None) -> TrainResult:
    """Train ``model``'s trainable weights on ``data`` with ``cfg`` (a :class:`TrainConfig`).

    Args:
        valid: scored after every epoch (and every ``cfg.eval_every`` steps for the curve); the adapter of the
            epoch with the best ``cfg.select`` score is kept and restored at the end, and early stopping
            counts epochs without improvement. Without it the last epoch's weights are kept. UAUC needs
            each item's ``user_id``.
        checkpoint_dir: where ``checkpoint.pt`` is written after every epoch (if ``cfg.checkpoint``).
        resume: continue from ``checkpoint_dir/checkpoint.pt`` when it exists.
        loss_fn: ``(z, batch) -> loss``; default 2-way cross-entropy.
        regularizer: extra term added to every batch's loss (e.g. FedProx's proximal term).
        batch_plan: ``(epoch, rng, data) -> list of index batches``; default shuffled length-bucketed. It
            is called once per epoch, at the start of the epoch.
        lr_scale: multiplies ``cfg.lr`` (per-client learning-speed scaling).
        optimizer_state: an AdamW ``state_dict`` to continue from (its moments and step counts; the learning
            rate still follows this call's own schedule). The state at the end is ``result.optimizer_state``.

    Raises:
        TrainingError: no trainable parameters, no training data, or ``select: uauc`` without user ids.
    """
    params = model.trainable_parameters()
    if not params:
        raise TrainingError("the model has no trainable parameters (attach a LoRA adapter first)")
    if not data:
        raise TrainingError("no training samples")
    select = "valid_auc" if cfg.select == "last" else f"valid_{cfg.select}"  # last: every epoch replaces the kept
    if valid and cfg.select == "uauc" and any(e.user_id is None for e in valid):
        raise TrainingError("train.select=uauc needs the user id of every validation item")
    result = TrainResult()
    if cfg.epochs == 0:
        result.optimizer_state = optimizer_state
        return result
    model.prepare(data + (valid or []), cfg.eval_batch_size, progress)

    plan = batch_plan or (lambda e, rng, d: shuffled_length_batches(len(d), cfg.batch_size, rng, d))
    base_lr = cfg.lr * lr_scale
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=cfg.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)

    start_epoch, best_state, bad_epochs, best_score = 0, None, 0, float("nan")
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        load_adapter_state(model.model, ck[CKPT_ADAPTER])
        opt.load_state_dict(ck[CKPT_OPTIMIZER])
        best_state = ck[CKPT_BEST]
        st = ck[CKPT_STATE] if isinstance(ck[CKPT_STATE], dict) else json.loads(ck[CKPT_STATE])
        start_epoch, bad_epochs = ck[CKPT_EPOCH] + 1, st["bad_epochs"]
        result.history, result.best_epoch, result.best_valid_auc = st["history"], st["best_epoch"], st["best"]
        result.best_valid_uauc = st.get("best_uauc", float("nan"))
        best_score = st.get("best_score", st["best"])  # checkpoints before train.select scored by AUC
        result.curve = st.get("curve", [])
        result.samples_seen, result.steps, result.seconds = st["samples_seen"], st["steps"], st["seconds"]
        if st.get("stopped"):
            start_epoch = cfg.epochs  # early stopping already ended this run

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        torch.manual_seed(seed * 1_000_003 + epoch)  # dropout
        batches = plan(epoch, rng, data)
        # The schedule is placed by this epoch's step count: with equal epochs it is exactly a schedule over
        # epochs x steps; a plan whose epochs differ in length (E2URec's forget-only first epoch) gets each
        # epoch's share of it. Derived from (epoch, step), so resuming needs no scheduler state.
        epoch_steps = math.ceil(len(batches) / cfg.grad_accum)
        step_in_epoch = 0
        model.model.train()
        losses = []
        iterator = track(batches, len(batches), f"epoch {epoch + 1}/{cfg.epochs}", progress)
        opt.zero_grad(set_to_none=True)
        scoring = 0.0  # seconds of mid-epoch validation scoring, not counted as training time
        for b_i, idx in enumerate(iterator):
            batch = model.collate([data[i] for i in idx])
            z = model.logits(batch)
            loss = loss_fn(z, batch)
            if regularizer is not None:
                loss = loss + regularizer()
            (loss / cfg.grad_accum).backward()
            losses.append(float(loss.detach()))
            result.samples_seen += len(idx)
            if (b_i + 1) % cfg.grad_accum == 0 or b_i + 1 == len(batches):
                lr = base_lr * lr_factor(cfg, epoch * epoch_steps + step_in_epoch, epoch_steps * cfg.epochs)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
                step_in_epoch += 1
                opt.zero_grad(set_to_none=True)
                result.steps += 1
                if (valid and cfg.eval_every and result.steps % cfg.eval_every == 0
                        and step_in_epoch < epoch_steps):  # the epoch's last step is scored below
                    s0 = time.perf_counter()
                    trained = result.seconds + (s0 - t0) - scoring
                    with torch.random.fork_rng(devices=[]):  # scoring never moves the training RNG
                        point = validation_scores(model, valid, cfg.eval_batch_size)
                    model.model.train()
                    scoring += time.perf_counter() - s0
                    result.curve.append({"epoch": epoch + step_in_epoch / epoch_steps, "steps": result.steps,
                                         "samples_seen": result.samples_seen, **point, "seconds": trained})
            if progress and hasattr(iterator, "set_postfix"):
                iterator.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        model.model.eval()
        result.seconds += time.perf_counter() - t0 - scoring
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "samples_seen": result.samples_seen,
                  "seconds": result.seconds}
        if valid:
            record.update(validation_scores(model, valid, cfg.eval_batch_size, progress))
            result.curve.append({"epoch": float(epoch + 1), "steps": result.steps,
                                 "samples_seen": result.samples_seen,
                                 **{k: v for k, v in record.items() if k.startswith("valid_")},
                                 "seconds": result.seconds})
            if cfg.select == "last" or improves(record[select], best_score):
                best_score, result.best_epoch, bad_epochs = record[select], epoch + 1, 0
                result.best_valid_auc = record["valid_auc"]
                result.best_valid_uauc = record.get("valid_uauc", float("nan"))
                best_state = adapter_state(model.model)
            else:
                bad_epochs += 1
        result.history.append(record)
        result.epochs_run = epoch + 1
        stop = bool(valid) and cfg.early_stopping is not None and bad_epochs >= cfg.early_stopping
        if on_epoch is not None:
            on_epoch(record)
        if ckpt_path is not None and cfg.checkpoint:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_save({
                CKPT_EPOCH: epoch, CKPT_ADAPTER: adapter_state(model.model), CKPT_OPTIMIZER: opt.state_dict(),
                CKPT_BEST: best_state,
                CKPT_STATE: json.dumps({  # plain JSON text: nothing in the file is an object to unpickle
                    "bad_epochs": bad_epochs, "history": result.history, "best_epoch": result.best_epoch,
                    "best": result.best_valid_auc, "best_uauc": result.best_valid_uauc, "best_score": best_score,
                    "curve": result.curve, "samples_seen": result.samples_seen, "steps": result.steps,
                    "seconds": result.seconds, "stopped": stop}),
            }, ckpt_path)
        if stop:
            result.stopped_early = True
            break
    if best_state is not None:
        load_adapter_state(model.model, best_state)
    result.optimizer_state = copy.deepcopy(opt.state_dict())
    return result


# --- one adapter, start to end: what privrec train and retrain-all share -----------------------------------
def epoch_line(r: dict) -> str:
    line = "epoch {epoch}: train loss {train_loss:.4f}".format(**r)
    if "valid_auc" in r:
        line += f", valid AUC {r['valid_auc']:.4f}"
    if "valid_uauc" in r:
        line += f", valid UAUC {r['valid_uauc']:.4f}"
    return line


def training_samples(cfg: ExperimentConfig, splits: Splits) -> list[Sample]:
    """The drawn training samples, each followed by its augmented copies (none unless ``augment`` asks)."""
    return augment(splits.train, cfg.augment.shuffle, cfg.augment.mask, cfg.augment.copies, cfg.seed,
                   splits.dataset.schema.kv_keys())


def fit_single(cfg: ExperimentConfig, model: RecLM, tr: list[Encoded], va: list[Encoded], checkpoint_dir: Path,
               resume: bool, progress: bool, log=None) -> TrainResult:
    """Step 5 of ``privrec train``: THE training loop from the model's fresh seeded LoRA; the validation prompts
    pick the epoch (checkpoint every epoch; ``resume`` continues from the last one)."""
    return train(model, tr, cfg.train, cfg.seed, valid=va or None, checkpoint_dir=checkpoint_dir, resume=resume,
                 progress=progress, on_epoch=(lambda r: log(epoch_line(r))) if log else None)


def save_single(cfg: ExperimentConfig, model: RecLM, folder: Path, train_samples: list[Sample],
                result: TrainResult, splits: Splits, **extra) -> dict:
    """Step 6 of ``privrec train``: the adapter with its lineage (the original samples; augmented copies derive
    from them) and, when its prompts read features counted from labels, what they were counted over
    (:func:`privrec.prepare.features_record`, METHODS §12)."""
    features = features_record(cfg, splits)
    if features is not None:
        extra["features"] = features
    save_adapter(model.model, folder, adapter_meta(cfg, model, originals(train_samples), best_epoch=result.best_epoch,
                                                   **extra))
    return read_meta(folder)


def retrain_single(cfg: ExperimentConfig, tombstones: set[tuple[int, int]], folder: Path, checkpoint_dir: Path,
                   progress: bool = True, log=None) -> dict:
    """``retrain-all`` (``privrec forget`` on a single model): steps 1, 2, 5 and 6 of ``privrec train`` on the
    same draw of samples minus every one showing a deleted interaction, saved to ``folder``; returns its
    ``privrec.json``. It is exactly the adapter ``privrec train`` gives on that data (the same code, seed and
    order); ``checkpoint_dir`` lets an interrupted retrain continue from its last epoch."""
    splits = setup_data(cfg, tombstones)
    train_samples = training_samples(cfg, splits)
    model = setup_model(cfg, splits)
    tr, va = model.encode(train_samples), model.encode(splits.valid)
    result = fit_single(cfg, model, tr, va, checkpoint_dir, resume=True, progress=progress, log=log)
    return save_single(cfg, model, folder, train_samples, result, splits, train_seconds=result.seconds)
