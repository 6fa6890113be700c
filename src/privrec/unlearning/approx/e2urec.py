"""E2URec: efficient and effective approximate unlearning with two teachers and a LoRA student (METHODS §5).

1. Remembering teacher: the original model (base + the trained run's adapter), frozen.
2. Augmented model: the original adapter tuned further on the forget set alone (more confident on it).
3. Forgetting teacher: z_fgt = z_orig - alpha * ReLU(z_aug - z_orig), alpha = 2: whatever training on the
   forget data pushed up is pushed down. The formula acts per answer class (the released code applies it per
   vocabulary logit; privrec's head has only "Yes" and "No"). By default the two logits are first
   normalised to log-probabilities [ln P(Yes), ln P(No)]: raw logits are defined only up to a shared
   constant (P(Yes) ignores it), and when tuning moves both raw logits down, ReLU keeps nothing and the
   teacher silently equals the original. On log-probabilities the label's class always goes up on a forget
   sample the augmented model fits better, so the teacher lowers exactly that class, for Yes and No labels
   alike. ``unlearn.e2urec.logit_space`` selects raw logits or their difference instead.
4. Student: the frozen original plus a fresh LoRA (r=16, alpha=32, dropout 0.05 on q, v); only that LoRA
   trains, through THE training loop, on beta * L_forget + (1 - beta) * L_remember (beta = 0.4):
   L_forget = soft cross-entropy against the forgetting teacher on forget samples; L_remember = soft
   cross-entropy against the remembering teacher plus the label loss on retained samples. The first epoch
   trains L_forget only. Teachers are frozen, so their outputs are computed once up front and looked up
   by sample id in the loss.

How "frozen original + fresh LoRA" is built: peft holds two adapters in the model, the student as
"default" (trainable; what the training loop checkpoints) and the original as "original" (loaded from the
run's tensors, requires_grad off, no dropout); both are active, so each LoRA layer computes
W0 x + s_o B_o A_o x + s_s B_s A_s x. The base weights are never touched, so the frozen-layer cache of the
original run (keyed by the base weights' hash) still serves the student. Afterwards the two adapters are
written as ONE peft adapter of rank r_o + r_s (A stacked, B scaled and concatenated, scaling 1), exactly
equal to the pair; that is the adapter saved in OUT/adapters/default and the model that is measured.
"""

from __future__ import annotations

import numpy as np
import torch

from privrec.config import LoraConfig
from privrec.model.adapters import adapter_state, load_adapter_state
from privrec.model.recmodel import RecLM
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
    student_lora,
)

ORIGINAL = "original"  # peft name of the frozen original adapter inside the student model


# --- the teachers (pure) -----------------------------------------------------------------------------------
def forgetting_teacher(z_orig, z_aug, alpha: float):
    """z_fgt = z_orig - alpha * ReLU(z_aug - z_orig), elementwise (numpy arrays or torch tensors)."""
    if isinstance(z_orig, torch.Tensor):
        return z_orig - alpha * torch.relu(z_aug - z_orig)
    z_orig, z_aug = np.asarray(z_orig, dtype=np.float64), np.asarray(z_aug, dtype=np.float64)
    return z_orig - alpha * np.maximum(z_aug - z_orig, 0.0)


def teacher_space(z_pair: np.ndarray, space: str) -> np.ndarray:
    """(N, 2) raw logits [z_yes, z_no] -> what the teacher formula acts on: the two-way log-softmax
    (``logprob``), the raw pair (``pair``) or the (N,) difference z_yes - z_no (``difference``)."""
    z = np.asarray(z_pair, dtype=np.float64)
    if space == "logprob":
        return z - np.logaddexp(z[:, :1], z[:, 1:])
    if space == "pair":
        return z
    if space == "difference":
        return z[:, 0] - z[:, 1]
    raise ValueError(f"unknown logit space {space!r}")


def p_yes(z) -> np.ndarray:
    """P(Yes) from (N, 2) logits [z_yes, z_no] (softmax) or from (N,) differences z_yes - z_no (sigmoid)."""
    z = np.asarray(z, dtype=np.float64)
    d = z[:, 0] - z[:, 1] if z.ndim == 2 else z
    return 1.0 / (1.0 + np.exp(-d))


def e2urec_loss(p_forget: dict[str, float], p_remember: dict[str, float], beta: float,
                label_weight: float) -> LossFn:
    """The student's loss for THE training loop.

    A batch of forget items only (forget-only epochs): L_forget. A mixed batch: beta * L_forget + (1 - beta)
    * L_remember, with L_forget = mean soft CE vs the forgetting teacher over its forget items and
    L_remember = mean [soft CE vs the remembering teacher + label_weight * CE vs the label] over its
    retained items.
    """
    forget_ids = set(p_forget)
    targets = {**p_remember, **p_forget}

    def loss_fn(z: torch.Tensor, batch) -> torch.Tensor:
        is_f = forget_mask(batch, forget_ids, z.device)
        ce_teacher = soft_bce(z, lookup(batch, targets, z.device))
        l_forget = masked_mean(ce_teacher, is_f)
        l_remember = masked_mean(ce_teacher + label_weight * soft_bce(z, batch.labels), ~is_f)
        if bool(is_f.all()):
            return l_forget
        if not bool(is_f.any()):
            return l_remember
        return beta * l_forget + (1 - beta) * l_remember

    return loss_fn


# --- adapters as data: two stacked LoRAs -> one -------------------------------------------------------------
def _lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if k.endswith(suffix):
                mods.setdefault(k[: -len(suffix)], {})[part] = v
                break
        else:
            raise ValueError(f"not a plain LoRA tensor: {k}")
    for m, d in mods.items():
        if set(d) != {"lora_A", "lora_B"}:
            raise ValueError(f"{m}: needs both lora_A and lora_B")
    return {m: (d["lora_A"], d["lora_B"]) for m, d in mods.items()}


def concat_lora(parts: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """One LoRA state (scaling 1) equal to the sum of several: for every module,
    A = [A_1; A_2; ...] (stacked rows), B = [s_1 B_1, s_2 B_2, ...] (side by side), so B A = sum_k s_k B_k A_k.
    A module missing from a part gets zero blocks of that part's rank. The result has rank sum_k r_k.
    """
    mods = [_lora_modules(state) for state, _ in parts]
    ranks = []
    for m in mods:
        rs = {a.shape[0] for a, _ in m.values()}
        if len(rs) != 1:
            raise ValueError(f"a LoRA state with mixed ranks {sorted(rs)}")
        ranks.append(rs.pop())
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set().union(*mods)):
        a0, b0 = next(m[name] for m in mods if name in m)
        d_in, d_out = a0.shape[1], b0.shape[0]
        a_blocks, b_blocks = [], []
        for m, (_, scale), r in zip(mods, parts, ranks):
            a, b = m.get(name, (torch.zeros(r, d_in), torch.zeros(d_out, r)))
            if a.shape != (r, d_in) or b.shape != (d_out, r):
                raise ValueError(f"{name}: shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit ({r}, {d_in})")
            a_blocks.append(a.float())
            b_blocks.append(b.float() * scale)
        out[f"{name}.lora_A.weight"] = torch.cat(a_blocks, 0)  # (sum r, in)
        out[f"{name}.lora_B.weight"] = torch.cat(b_blocks, 1)  # (out, sum r)
    return out


def combined_lora_config(configs: list[LoraConfig]) -> LoraConfig:
    """The privrec LoRA config of :func:`concat_lora`'s result: rank = alpha = sum of ranks (scaling 1),
    the union of target modules, on the union of the layers."""
    r = sum(c.r for c in configs)
    tops = [c.top_layers for c in configs]
    return LoraConfig(r=r, alpha=r, dropout=0.0,
                      target_modules=sorted({m for c in configs for m in c.target_modules}),
                      top_layers=None if any(t is None for t in tops) else max(tops),
                      cache_frozen=configs[0].cache_frozen)


# --- the student -------------------------------------------------------------------------------------------
def stack_frozen_adapter(model: RecLM, lora_cfg: LoraConfig, state: dict[str, torch.Tensor],
                         name: str = ORIGINAL) -> None:
    """Add adapter ``name`` (tensors ``state``) under the model's trainable "default" adapter: both active,
    ``name`` frozen and without dropout. The frozen-layer cache cut moves below both adapters.

    Raises:
        ValueError: the tensors do not fit the adapter.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import set_peft_model_state_dict

    layers = None
    if lora_cfg.top_layers is not None:
        layers = list(range(model.n_layers - lora_cfg.top_layers, model.n_layers))
    pcfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=0.0,
                          target_modules=list(lora_cfg.target_modules), layers_to_transform=layers,
                          layers_pattern="layers" if layers else None, bias="none", task_type="CAUSAL_LM")
    model.model.add_adapter(name, pcfg)
    result = set_peft_model_state_dict(model.model, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter tensors do not fit: {result.unexpected_keys[:3]}")
    model.model.base_model.set_adapter(["default", name])  # both in the forward ...
    for n, p in model.model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)  # ... only the student trains
    if model.cut > 0:
        cut = 0 if layers is None else min(model.cut, layers[0])
        if cut == 0:
            model.cut, model.cache = 0, None
        elif cut != model.cut:
            model.enable_cache(cut)


def build_student(task: UnlearnTask) -> RecLM:
    """The frozen original model plus a fresh, seeded student LoRA."""
    student = build_model(task.cfg, task.dataset, lora=student_lora(task.cfg), seed=task.seed)
    stack_frozen_adapter(student, task.cfg.lora, task.original_state)
    return student


# --- the method --------------------------------------------------------------------------------------------
def e2urec(task: UnlearnTask) -> Unlearned:
    """Unlearn ``task.forget`` with E2URec; ``task.model`` is left holding the original adapter."""
    cfg, e = task.cfg, task.cfg.unlearn.e2urec
    bs = cfg.train.eval_batch_size
    forget, pool = task.forget, task.forget + task.retain_pool
    nf = len(forget)

    # 1. the remembering teacher (the original) on every sample the student will see
    z_orig = teacher_space(task.model.score_logits(pool, bs, task.progress, pair=True), e.logit_space)
    # 2. the augmented model: the original adapter tuned further on the forget set, then put back
    aug = train(task.model, forget, e.augment, task.seed, progress=task.progress)
    z_aug = teacher_space(task.model.score_logits(forget, bs, task.progress, pair=True), e.logit_space)
    load_adapter_state(task.model.model, task.original_state)
    # 3. the forgetting teacher, and both teachers' targets by sample id
    z_fgt = forgetting_teacher(z_orig[:nf], z_aug, e.alpha)
    p_orig, p_aug, p_fgt = p_yes(z_orig), p_yes(z_aug), p_yes(z_fgt)
    targets_f = dict(zip((x.sample_id for x in forget), p_fgt.tolist()))
    targets_r = dict(zip((x.sample_id for x in task.retain_pool), p_orig[nf:].tolist()))
    task.log(f"e2urec teachers on {nf} forget samples: mean P(Yes) original {p_orig[:nf].mean():.4f}, augmented "
             f"{p_aug.mean():.4f}, forgetting teacher {p_fgt.mean():.4f}")

    # 4. the student: a fresh LoRA on the frozen original, trained through the one training loop
    student = build_student(task)
    s_lora = student_lora(cfg)
    res = train(student, pool, e.train, task.seed,
                loss_fn=e2urec_loss(targets_f, targets_r, e.beta, e.label_weight),
                batch_plan=paired_plan(nf, len(task.retain_pool), e.train.batch_size, e.forget_only_epochs),
                progress=task.progress)

    # 5. original + student as one adapter (exactly the stacked pair), in a model of its own
    state = concat_lora([(task.original_state, cfg.lora.alpha / cfg.lora.r),
                         (adapter_state(student.model), s_lora.alpha / s_lora.r)])
    lora = combined_lora_config([cfg.lora, s_lora])
    del student
    model = build_model(cfg, task.dataset, lora=lora, seed=task.seed)
    load_adapter_state(model.model, state)
    return Unlearned(model, adapter_state(model.model), lora, trained_on_retained_only=False, details={
        "augment_history": aug.history, "student_history": res.history, "student_steps": res.steps,
        "teacher_mean_p_yes_forget": {"original": float(p_orig[:nf].mean()), "augmented": float(p_aug.mean()),
                                      "forgetting": float(p_fgt.mean())},
        "student_lora": s_lora.model_dump(), "n_retain_pool": len(task.retain_pool), "logit_space": e.logit_space,
    })
