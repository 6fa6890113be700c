"""The references E2URec is compared with (METHODS §5), each a small method behind the same interface.

- ``retrain``: exact unlearning by brute force: a fresh LoRA (same seed, same lora and train settings, same
  validation-based epoch choice as the original run) trained on the retained samples only.
- ``neggrad``: the original adapter tuned further on CE_retain - lambda * CE_forget (lambda = 0.2).
- ``bad-teacher``: the original adapter distilled from an incompetent teacher on the forget set and from
  the original (the competent teacher) on the retained set.
- ``original``: nothing is unlearned; the original run measured the same way (the "doing nothing" row).

All train through THE training loop with the paired forget/retain batches of
:func:`privrec.unlearning.approx.task.paired_plan`.
"""

from __future__ import annotations

import numpy as np
import torch

from privrec.model.adapters import adapter_state
from privrec.prepare import build_model
from privrec.train import LossFn, train
from privrec.unlearning.approx.task import (
    Unlearned,
    UnlearnTask,
    forget_mask,
    lookup,
    masked_mean,
    paired_plan,
    soft_bce,
)


def original(task: UnlearnTask) -> Unlearned:
    return Unlearned(task.model, dict(task.original_state), task.cfg.lora, trained_on_retained_only=False)


def retrain(task: UnlearnTask) -> Unlearned:
    """From scratch on the retained samples (augmented copies included, as the original trained on them)."""
    cfg = task.cfg
    model = build_model(cfg, task.dataset)
    res = train(model, task.retain, cfg.train, cfg.seed, valid=task.valid or None, progress=task.progress)
    return Unlearned(model, adapter_state(model.model), cfg.lora, trained_on_retained_only=True, details={
        "history": res.history, "best_epoch": res.best_epoch, "steps": res.steps, "n_trained": len(task.retain)})


def neggrad_loss(forget_ids: set[str], lam: float) -> LossFn:
    """mean CE over the batch's retained items - lam * mean CE over its forget items."""

    def loss_fn(z: torch.Tensor, batch) -> torch.Tensor:
        is_f = forget_mask(batch, forget_ids, z.device)
        ce = soft_bce(z, batch.labels)
        return masked_mean(ce, ~is_f) - lam * masked_mean(ce, is_f)

    return loss_fn


def neggrad(task: UnlearnTask) -> Unlearned:
    s = task.cfg.unlearn.neggrad
    pool = task.forget + task.retain_pool
    res = train(task.model, pool, s.train, task.seed,
                loss_fn=neggrad_loss({x.sample_id for x in task.forget}, s.lam),
                batch_plan=paired_plan(len(task.forget), len(task.retain_pool), s.train.batch_size),
                progress=task.progress)
    return Unlearned(task.model, adapter_state(task.model.model), task.cfg.lora, trained_on_retained_only=False,
                     details={"history": res.history, "steps": res.steps})


def distillation_loss(targets: dict[str, float]) -> LossFn:
    """Mean soft cross-entropy of every item against its teacher's P(Yes)."""

    def loss_fn(z: torch.Tensor, batch) -> torch.Tensor:
        return soft_bce(z, lookup(batch, targets, z.device)).mean()

    return loss_fn


def bad_teacher(task: UnlearnTask) -> Unlearned:
    s = task.cfg.unlearn.bad_teacher
    bs = task.cfg.train.eval_batch_size
    pool = task.forget + task.retain_pool
    if s.teacher == "uniform":
        bad = np.random.default_rng([task.seed, 13]).uniform(size=len(task.forget))
    else:
        with task.model.adapter_disabled():
            bad = task.model.score(task.forget, bs, task.progress)
    good = task.model.score(task.retain_pool, bs, task.progress)
    targets = dict(zip((x.sample_id for x in task.forget), bad.tolist()))
    targets.update(zip((x.sample_id for x in task.retain_pool), good.tolist()))
    res = train(task.model, pool, s.train, task.seed, loss_fn=distillation_loss(targets),
                batch_plan=paired_plan(len(task.forget), len(task.retain_pool), s.train.batch_size),
                progress=task.progress)
    return Unlearned(task.model, adapter_state(task.model.model), task.cfg.lora, trained_on_retained_only=False,
                     details={"history": res.history, "steps": res.steps, "teacher": s.teacher,
                              "bad_teacher_mean_p_yes": float(np.mean(bad))})
