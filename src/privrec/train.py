"""THE training loop. Centralised training, federated clients, shard adapters and unlearning students all
call :func:`train` with their own data, loss and adapter (DESIGN.md: one trainer, one scorer).

Loss (METHODS §0): cross-entropy of the 2-way softmax over the Yes/No logits against the label, i.e.
``BCEWithLogits(z_yes - z_no, y)``; soft targets in [0, 1] are allowed (distillation). AdamW over the
trainable (LoRA) weights, gradient accumulation, a warm-up + linear/cosine schedule, early stopping on
validation AUC, and an atomic checkpoint after every epoch from which ``resume=True`` continues.

Determinism: epoch e shuffles with ``default_rng([seed, e])`` and seeds dropout with ``(seed, e)``, so a
run resumed from the checkpoint of epoch e-1 repeats exactly what the uninterrupted run did.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from privrec.metrics import auc
from privrec.model.adapters import adapter_state, load_adapter_state
from privrec.model.recmodel import Batch, Encoded, RecLM

# Checkpoint keys (a typed record on disk; constants so readers and writers agree).
CKPT_EPOCH = "epoch"
CKPT_ADAPTER = "adapter"
CKPT_OPTIMIZER = "optimizer"
CKPT_BEST = "best_adapter"
CKPT_STATE = "loop_state"
CHECKPOINT_FILE = "checkpoint.pt"

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
    best_epoch: int = -1
    best_valid_auc: float = float("nan")
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, valid_auc, seconds
    seconds: float = 0.0
    samples_seen: int = 0
    steps: int = 0
    stopped_early: bool = False

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


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(model: RecLM, data: list[Encoded], cfg, seed: int, valid: list[Encoded] | None = None,
          checkpoint_dir: Path | None = None, resume: bool = False, loss_fn: LossFn = bce_loss,
          regularizer: Regularizer | None = None, batch_plan: BatchPlan | None = None,
          lr_scale: float = 1.0, progress: bool = True, on_epoch: Callable[[dict], None] | None = None,
          ) -> TrainResult:
    """Train ``model``'s trainable weights on ``data`` with ``cfg`` (a :class:`TrainConfig`).

    Args:
        valid: scored after every epoch; the best-AUC adapter is kept and restored at the end, and early
            stopping counts epochs without improvement. Without it the last epoch's weights are kept.
        checkpoint_dir: where ``checkpoint.pt`` is written after every epoch (if ``cfg.checkpoint``).
        resume: continue from ``checkpoint_dir/checkpoint.pt`` when it exists.
        loss_fn: ``(z, batch) -> loss``; default 2-way cross-entropy.
        regularizer: extra term added to every batch's loss (e.g. FedProx's proximal term).
        batch_plan: ``(epoch, rng, data) -> list of index batches``; default shuffled length-bucketed. It
            is called once per epoch, at the start of the epoch.
        lr_scale: multiplies ``cfg.lr`` (per-client learning-speed scaling).

    Raises:
        ValueError: no trainable parameters, or no training data.
    """
    params = model.trainable_parameters()
    if not params:
        raise ValueError("the model has no trainable parameters (attach a LoRA adapter first)")
    if not data:
        raise ValueError("no training samples")
    result = TrainResult()
    if cfg.epochs == 0:
        return result
    model.prepare(data + (valid or []), cfg.eval_batch_size, progress)

    plan = batch_plan or (lambda e, rng, d: shuffled_length_batches(len(d), cfg.batch_size, rng, d))
    base_lr = cfg.lr * lr_scale
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=cfg.weight_decay)

    start_epoch, best_state, bad_epochs = 0, None, 0
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=False)
        load_adapter_state(model.model, ck[CKPT_ADAPTER])
        opt.load_state_dict(ck[CKPT_OPTIMIZER])
        best_state = ck[CKPT_BEST]
        st = ck[CKPT_STATE]
        start_epoch, bad_epochs = ck[CKPT_EPOCH] + 1, st["bad_epochs"]
        result.history, result.best_epoch, result.best_valid_auc = st["history"], st["best_epoch"], st["best"]
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
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                            dynamic_ncols=True)
        opt.zero_grad(set_to_none=True)
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
            if progress and hasattr(iterator, "set_postfix"):
                iterator.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        model.model.eval()
        result.seconds += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "samples_seen": result.samples_seen,
                  "seconds": result.seconds}
        if valid:
            probs = model.score(valid, cfg.eval_batch_size, progress)
            record["valid_auc"] = auc([e.label for e in valid], probs)
            if not (record["valid_auc"] <= result.best_valid_auc):  # first epoch, or strictly better
                result.best_valid_auc, result.best_epoch, bad_epochs = record["valid_auc"], epoch + 1, 0
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
                CKPT_STATE: {"bad_epochs": bad_epochs, "history": result.history, "best_epoch": result.best_epoch,
                             "best": result.best_valid_auc, "samples_seen": result.samples_seen,
                             "steps": result.steps, "seconds": result.seconds, "stopped": stop},
            }, ckpt_path)
        if stop:
            result.stopped_early = True
            break
    if best_state is not None:
        load_adapter_state(model.model, best_state)
    return result
