"""What every method of ``privrec unlearn`` shares (METHODS §5): its config section, the choice of the users to
forget, the task a method receives and the result it returns, the paired forget/retain batch plan and the
soft-target losses that all run through THE training loop (``privrec.train.train``).

A method is a small callable ``method(task: UnlearnTask) -> Unlearned`` (see ``privrec.unlearning.approx.e2urec``
and ``privrec.unlearning.approx.baselines``); ``privrec.commands.unlearn.run_unlearn`` is the procedure around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from privrec.config import ExperimentConfig, LoraConfig, TrainConfig, _Section
from privrec.data import Dataset, Sample
from privrec.data.idfiles import read_id_file
from privrec.errors import UserError
from privrec.model.recmodel import Batch, Encoded, RecLM
from privrec.unlearning import UNLEARNING_METHODS

METHOD_NAMES = UNLEARNING_METHODS
Method = Literal[UNLEARNING_METHODS]


# --- config ------------------------------------------------------------------------------------------------
# Each training section is its own TrainConfig subclass so that a partial override (``--set
# unlearn.e2urec.train.epochs=3``) keeps the method's other defaults instead of TrainConfig's.
class _UnlearnTrain(TrainConfig):
    schedule: Literal["constant", "linear", "cosine"] = Field("constant")
    checkpoint: bool = Field(False, description="Unlearning runs are short and are not resumed.")


class AugmentTrain(_UnlearnTrain):
    epochs: int = Field(1, ge=0)
    lr: float = Field(1e-3, gt=0)


class StudentTrain(_UnlearnTrain):
    epochs: int = Field(2, ge=0, description="Student epochs, the first forget_only_epochs of them forget-only.")
    batch_size: int = Field(16, ge=1, description="Per side: a mixed batch holds this many forget and this many "
                            "retained samples.")
    lr: float = Field(1e-3, gt=0)


class BaselineTrain(_UnlearnTrain):
    epochs: int = Field(2, ge=0)
    batch_size: int = Field(8, ge=1, description="Per side: a batch holds this many forget and this many "
                            "retained samples.")
    lr: float = Field(3e-4, gt=0)


class StudentLoraConfig(LoraConfig):
    """E2URec's student LoRA (METHODS §5: r=16, alpha=32, dropout 0.05 on q and v)."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    top_layers: int | None = Field(
        None, ge=1, description="Put the student's LoRA on the top L layers; None = the original run's "
        "lora.top_layers (the frozen-layer cache then serves the student too).")


class E2URecSection(_Section):
    alpha: float = Field(2.0, ge=0, description="Forgetting teacher z_fgt = z_orig - alpha * ReLU(z_aug - z_orig).")
    beta: float = Field(0.4, ge=0, le=1, description="Loss = beta * L_forget + (1 - beta) * L_remember.")
    label_weight: float = Field(
        1.0, ge=0, description="Weight of the ordinary label loss inside L_remember (next to the soft "
        "cross-entropy against the remembering teacher).")
    forget_only_epochs: int = Field(1, ge=0, description="The first N student epochs train L_forget only.")
    logit_space: Literal["logprob", "pair", "difference"] = Field(
        "logprob", description="What the teacher formula acts on, per answer class. logprob: the two-way "
        "log-softmax [ln P(Yes), ln P(No)] (the raw pair normalised, so a shift shared by both logits, which "
        "leaves P(Yes) unchanged, cannot hide or fake a push); pair: the raw LM-head logits [z_yes, z_no] (the "
        "released code applies the formula to raw vocabulary logits); difference: z_yes - z_no (then a forget "
        "sample the augmented model pushed towards No is left as the original has it).")
    augment: AugmentTrain = Field(
        AugmentTrain(),
        description="Training of the augmented model: the original adapter tuned further on the forget set.")
    lora: StudentLoraConfig = Field(StudentLoraConfig(), description="The student's fresh LoRA.")
    train: StudentTrain = Field(StudentTrain(), description="Student training (METHODS §5: AdamW lr 1e-3, "
                                "batch 16).")


class NegGradSection(_Section):
    lam: float = Field(0.2, ge=0, description="Loss = CE_retain - lam * CE_forget (METHODS §5: 0.2).")
    train: BaselineTrain = Field(BaselineTrain(), description="Tuning of the original adapter.")


class BadTeacherSection(_Section):
    teacher: Literal["uniform", "base"] = Field(
        "uniform", description="The incompetent teacher on the forget set: uniform = P(Yes) drawn uniformly "
        "at random per sample (a randomly initialised classifier's output, seeded); base = the untuned "
        "backbone's P(Yes).")
    train: BaselineTrain = Field(BaselineTrain(), description="Distillation into the original adapter.")


class InfluenceSection(_Section):
    """The influence step of the adapter (METHODS §13; privrec.unlearning.approx.influence)."""

    solver: Literal["cg", "sgd"] = Field(
        "cg", description="cg: conjugate gradient on (H + damping I) x = v, exact residual; sgd: LLMEraser's "
        "mini-batch gradient descent on 1/2 x^T (H + damping I) x - v^T x (LiSSA's recursion), mini-batch "
        "residual.")
    curvature: Literal["hessian", "gauss-newton"] = Field(
        "hessian", description="H: hessian = the loss's Hessian in the adapter's parameters (double backward; "
        "not positive definite for LoRA, so CG stops at negative curvature the damping does not cover); "
        "gauss-newton = its generalised Gauss-Newton part J^T p(1-p) J, positive semi-definite (equal to the "
        "Hessian where the logit is linear in the parameters).")
    damping: float = Field(
        1e-3, gt=0, description="lambda in (H + lambda I): makes the non-convex adapter loss's Hessian positive "
        "definite and bounds the step (per retained item: a loss sum_i l_i + c/2 |theta|^2 has lambda = c / n).")
    iterations: int = Field(10, ge=0, description="CG iterations (each one Hessian-vector product over the "
                            "Hessian sample), or sgd epochs over it.")
    tol: float = Field(1e-3, ge=0, description="Stop once the relative residual |v - (H + lambda I) x| / |v| is "
                       "at most this.")
    hessian_samples: int | None = Field(
        128, ge=1, description="Retained items the Hessian is estimated on, drawn once with the run's seed (None = "
        "every retained item); the cost of each iteration is in proportion to it.")
    batch_size: int = Field(16, ge=1, description="Items per forward in gradients and Hessian-vector products "
                            "(sgd: also its mini-batch).")
    lr: float = Field(0.5, gt=0, description="sgd only: the step on the quadratic (LiSSA: 1 / scale); it must stay "
                      "below 2 / (the largest eigenvalue of H + lambda I) or sgd diverges.")
    scale: float = Field(
        1.0, gt=0, description="Multiplies the update; 1 = the influence (Newton) step. A knob for validation "
                               "requests only.")


class MiaSection(_Section):
    max_samples: int = Field(
        256, ge=8, description="Cap on each attack set (retained members to fit on, never-seen samples to fit "
        "on, never-seen samples to compare the forget set with), drawn with the unlearning seed.")
    unseen: Literal["auto", "unused-train", "valid-test"] = Field(
        "auto", description="Where never-seen samples come from: unused-train = training-period samples the "
        "original run never drew (same period and distribution as the forget set); valid-test = the run's "
        "validation and test samples (later in time: the attack may then tell time apart, not membership); "
        "auto = unused-train when there are any.")


class UnlearnSection(_Section):
    method: Method = Field(
        "e2urec", description="e2urec / neggrad / bad-teacher / influence: approximate unlearning; retrain: from "
        "scratch on the retained samples with the original run's lora and train settings; original: no unlearning "
        "(the reference row 'doing nothing').")
    forget_fraction: float | None = Field(
        0.2, gt=0, lt=1, description="Forget this fraction of the training users (all their samples), drawn "
        "with forget_seed. Mutually exclusive with forget_users.")
    forget_users: list[int] | None = Field(None, description="Forget exactly these user ids.")
    forget_seed: int | None = Field(None, description="Seed for drawing the forget users; None = the run's seed.")
    retain_per_forget: float = Field(
        1.0, gt=0, description="Approximate methods see this many retained samples per forget sample "
        "(drawn once, capped at all retained samples): their budget is set by the request, not by the training "
        "set (METHODS §8; request_budget). A one-user request of 10 samples sees 10 x this many.")
    e2urec: E2URecSection = E2URecSection()
    neggrad: NegGradSection = NegGradSection()
    bad_teacher: BadTeacherSection = BadTeacherSection()
    influence: InfluenceSection = InfluenceSection()
    mia: MiaSection = MiaSection()

    @model_validator(mode="after")
    def _check(self) -> UnlearnSection:
        if (self.forget_fraction is None) == (self.forget_users is None):
            raise ValueError("give exactly one of unlearn.forget_fraction and unlearn.forget_users")
        if self.forget_users is not None and not self.forget_users:
            raise ValueError("unlearn.forget_users is empty: nothing to forget")
        for name, tc in (("e2urec.augment", self.e2urec.augment), ("e2urec.train", self.e2urec.train),
                         ("neggrad.train", self.neggrad.train), ("bad_teacher.train", self.bad_teacher.train)):
            if tc.early_stopping is not None:
                raise ValueError(f"unlearn.{name}.early_stopping: unlearning trains without validation")
        if self.e2urec.forget_only_epochs > self.e2urec.train.epochs:
            raise ValueError(f"unlearn.e2urec.forget_only_epochs={self.e2urec.forget_only_epochs} exceeds "
                             f"unlearn.e2urec.train.epochs={self.e2urec.train.epochs}")
        return self


class UnlearnConfig(ExperimentConfig):
    """The original run's config plus the ``unlearn`` section (``privrec unlearn`` writes it resolved)."""

    unlearn: UnlearnSection = UnlearnSection()

    @property
    def forget_seed(self) -> int:
        return self.seed if self.unlearn.forget_seed is None else self.unlearn.forget_seed


def student_lora(cfg: UnlearnConfig) -> LoraConfig:
    """The student's LoRA as a plain :class:`LoraConfig`, top layers resolved against the original's."""
    s = cfg.unlearn.e2urec.lora
    top = s.top_layers if s.top_layers is not None else cfg.lora.top_layers
    return LoraConfig(r=s.r, alpha=s.alpha, dropout=s.dropout, target_modules=list(s.target_modules),
                      top_layers=top, cache_frozen=cfg.lora.cache_frozen)


# --- the forget set ----------------------------------------------------------------------------------------
def read_user_file(path: str | Path) -> list[int]:
    """User ids, one per line; blank lines and ``#`` comments ignored.

    Raises:
        DataError: missing file, a line that is not an integer, or no ids at all.
    """
    return read_id_file(path, "forget-users", int, "a user id")


def choose_forget_users(samples: list[Sample], fraction: float, seed: int) -> list[int]:
    """round(fraction x #users) of the users that own training samples, drawn without replacement (seeded)."""
    users = sorted({s.user_id for s in samples})
    k = max(1, round(fraction * len(users)))
    if k >= len(users):
        raise UserError(f"forgetting {fraction:g} of {len(users)} training users leaves none to retain")
    rng = np.random.default_rng([seed, 11])
    return sorted(int(u) for u in rng.choice(users, size=k, replace=False))


def split_by_users(samples: list[Sample], users) -> tuple[list[Sample], list[Sample]]:
    """(samples of ``users``, the rest), order kept."""
    users = set(users)
    return [s for s in samples if s.user_id in users], [s for s in samples if s.user_id not in users]


def draw(items: list, n: int | None, seed: list[int] | int) -> list:
    """Up to n items drawn without replacement, kept in their input order (all when n is None or larger)."""
    if n is None or n >= len(items):
        return list(items)
    idx = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[i] for i in idx]


# --- the budget of a request (METHODS §8) --------------------------------------------------------------------
def request_budget(cfg: UnlearnConfig, n_forget: int, n_retain: int) -> dict:
    """What the approximate methods spend on a request of ``n_forget`` training items, all of it in proportion
    to the request (never to the training set): ``retain`` = round(retain_per_forget x n_forget) retained items
    (at most the ``n_retain`` there are), and per method its optimizer steps, epochs x ceil(n_forget /
    batch_size), every step one batch of batch_size forget items (+ as many retained items in mixed epochs,
    :func:`paired_plan`). E2URec also tunes the augmented model on the forget items alone. With the
    ``unlearn`` section's defaults a one-user request of 10 items takes 2 steps per method; 1% of 943 users
    (~10 users, ~100 items) about 13. Influence is the exception (METHODS §13): its Hessian is the retained
    loss's, estimated on a fixed ``hessian_samples`` items whatever the request; it spends one gradient pass
    over the forget items and ``iterations`` Hessian-vector passes over those items (at most)."""
    u = cfg.unlearn
    e, ng, bt, inf = u.e2urec, u.neggrad, u.bad_teacher, u.influence

    def steps(tc) -> int:
        return tc.epochs * math.ceil(n_forget / tc.batch_size)

    n_hessian = n_retain if inf.hessian_samples is None else min(n_retain, inf.hessian_samples)
    return {"n_forget": n_forget, "retain": min(n_retain, round(u.retain_per_forget * n_forget)),
            "steps": {"e2urec": {"augment": steps(e.augment), "student": steps(e.train)},
                      "neggrad": steps(ng.train), "bad-teacher": steps(bt.train),
                      "influence": {"hessian_items": n_hessian, "hvp_passes": inf.iterations}}}


# --- what a method receives and returns --------------------------------------------------------------------
@dataclass
class UnlearnTask:
    """Everything a method needs. ``model`` is the original (base + the trained run's adapter, named "default");
    a method may tune it in place (NegGrad, Bad-Teacher) or build new models from ``cfg`` and ``dataset``."""

    cfg: UnlearnConfig
    dataset: Dataset
    model: RecLM
    original_state: dict[str, torch.Tensor]
    forget: list[Encoded]  # every training item of the forget users (augmented copies included)
    retain: list[Encoded]  # every training item of the retained users
    retain_pool: list[Encoded]  # the retained items the approximate methods see (retain_per_forget)
    valid: list[Encoded]
    seed: int
    progress: bool = True
    log: Callable[[str], None] = print


@dataclass
class Unlearned:
    """A method's result: a model that scores as the unlearned recommender, and the one peft adapter (tensors
    + config) that holds it, which ``privrec unlearn`` saves as OUT/adapters/default."""

    model: RecLM
    adapter_state: dict[str, torch.Tensor]
    lora: LoraConfig
    trained_on_retained_only: bool  # True only when no forgotten sample ever reached these weights
    details: dict = field(default_factory=dict)


class Unlearner(Protocol):
    def __call__(self, task: UnlearnTask) -> Unlearned: ...


# --- batches and losses shared by the approximate methods ---------------------------------------------------
def paired_plan(n_forget: int, n_retain: int, batch_size: int, forget_only_epochs: int = 0):
    """A ``batch_plan`` for data laid out as [forget items..., retain pool items...].

    Forget-only epochs: the forget items in shuffled batches of ``batch_size``. Mixed epochs: ceil(n_forget /
    batch_size) batches, each with the next ``batch_size`` forget items and ``batch_size`` retained items from
    a fresh permutation of the pool (cycled when the pool is smaller), like zipping two loaders.
    """
    if n_forget < 1:
        raise ValueError("no forget samples")

    def plan(epoch: int, rng: np.random.Generator, data) -> list[list[int]]:
        assert len(data) == n_forget + n_retain, "data must be forget items followed by the retain pool"
        f = rng.permutation(n_forget).tolist()
        f_batches = [f[i: i + batch_size] for i in range(0, n_forget, batch_size)]
        if epoch < forget_only_epochs or n_retain == 0:
            return f_batches
        need = len(f_batches) * batch_size
        r = np.concatenate([rng.permutation(n_retain) for _ in range(math.ceil(need / n_retain))])
        return [fb + (n_forget + r[k * batch_size:(k + 1) * batch_size]).tolist() for k, fb in enumerate(f_batches)]

    return plan


def soft_bce(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per item 2-way cross-entropy of the student's softmax([z_yes, z_no]) against a target P(Yes)."""
    return F.binary_cross_entropy_with_logits(z, target, reduction="none")


def lookup(batch: Batch, table: dict[str, float], device) -> torch.Tensor:
    """Per-item values of a sample_id -> float table (teacher targets computed once up front)."""
    return torch.tensor([table[e.sample_id] for e in batch.items], dtype=torch.float32, device=device)


def forget_mask(batch: Batch, forget_ids: set[str], device) -> torch.Tensor:
    return torch.tensor([e.sample_id in forget_ids for e in batch.items], dtype=torch.bool, device=device)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask; 0 (with grad) when the mask is empty."""
    return (x * mask).sum() / mask.sum().clamp(min=1)
