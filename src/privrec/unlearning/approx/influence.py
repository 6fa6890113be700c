"""Influence-function unlearning of the adapter (METHODS §13; LLMEraser, arXiv 2412.00383, ICLR 2025).

The original adapter theta* minimises the training loss (the mean 2-way cross-entropy of THE training loop).
Removing the forget set F moves the minimiser of the retained loss L_R(theta) = 1/n sum_{z in R} l(z, theta)
(n = the retained training items, augmented copies included) by one Newton step from theta*:

    theta_-F = theta* + (H_R + lambda I)^-1 v,    v = 1/n sum_{z in F} grad l(z, theta*),

the sign of removing samples: at a minimum of the whole training loss sum_R grad l = -sum_F grad l, so
grad L_R(theta*) = -v. H_R is the mean Hessian of l over the retained items, estimated on
``unlearn.influence.hessian_samples`` of them (drawn once, seeded), and lambda I damps it: a LoRA adapter's loss
is not convex, and the damping also stands for the weight decay the original trained with (for a loss
sum_i l_i + c/2 ||theta||^2 the step is exact to second order with lambda = c / n). Only the adapter's
trainable tensors move; the base weights and the frozen-layer cache are untouched.

H is never formed. ``solver: cg`` runs conjugate gradient on (H_R + lambda I) x = v with Hessian-vector
products by double backward (the gradient of <grad l, x>: one forward and two backward passes of the top LoRA
layers over the cached frozen states per batch, about two to three training steps); its residual
||v - (H_R + lambda I) x|| / ||v|| is exact (the same items every iteration) and is logged per iteration.
``solver: sgd`` is LLMEraser's recasting of the inverse-Hessian-vector product as the finite-sum quadratic
min_x 1/2 x^T (H_R + lambda I) x - v^T x, solved by mini-batch gradient descent (its gradient on a batch B is
(H_B + lambda I) x - v; LiSSA is the same recursion with step 1/scale); its residual is the mini-batch one.

CG also records the curvature it meets, p^T H p / p^T p along each search direction (Rayleigh quotients of
the undamped H): their range against lambda says whether the damping or the Hessian's conditioning decides
the step, and a negative one (the loss is not convex there) stops CG where lambda is too small to cover it.

``curvature: gauss-newton`` replaces H by the generalised Gauss-Newton matrix G = sum_z J_z^T p_z (1 - p_z) J_z
(J_z the gradient of the sample's Yes-minus-No logit in the adapter's parameters, p_z its P(Yes)): the Hessian
without the term that carries the logit's own second derivative, which is where a LoRA adapter's negative
curvature comes from (the loss is convex in the logit). G is positive semi-definite, so CG never stops on
negative curvature and the damping only has to bound the step; for a model linear in its parameters G = H.
This is the usual curvature of influence functions on deep networks (Martens' Gauss-Newton products; the
EK-FAC influence of Grosse et al. 2023 approximates the same matrix). Its product costs one forward, a backward
with its graph kept, and two backward passes through that graph (about what H's does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from privrec.model.adapters import adapter_state
from privrec.model.recmodel import Encoded, RecLM
from privrec.unlearning.approx.task import InfluenceSection, Unlearned, UnlearnTask, draw

Vec = list[torch.Tensor]  # one tensor per trainable parameter, in trainable_parameters() order


# --- vectors over the adapter's parameters -----------------------------------------------------------------
def _dot(a: Vec, b: Vec) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def _norm(a: Vec) -> float:
    return math.sqrt(_dot(a, a))


def _axpy(alpha: float, x: Vec, y: Vec) -> Vec:
    """alpha * x + y."""
    return [alpha * xi + yi for xi, yi in zip(x, y, strict=True)]


# --- the loss, its gradient and Hessian-vector products, on the model's own forward ----------------------------
def _chunks(model: RecLM, items: list[Encoded], batch_size: int) -> list[list[Encoded]]:
    return [[items[i] for i in idx] for idx in model.length_batches(items, batch_size)]


def _loss_sum(model: RecLM, items: list[Encoded]) -> torch.Tensor:
    """sum over ``items`` of the training loss (2-way cross-entropy against the label), through THE forward."""
    batch = model.collate(items)
    return F.binary_cross_entropy_with_logits(model.logits(batch), batch.labels, reduction="sum")


def loss_gradient(model: RecLM, items: list[Encoded], batch_size: int) -> Vec:
    """sum_{z in items} grad l(z, theta) over the trainable parameters (zeros for no items)."""
    params = model.trainable_parameters()
    total = [torch.zeros_like(p) for p in params]
    for chunk in _chunks(model, items, batch_size):
        g = torch.autograd.grad(_loss_sum(model, chunk), params, materialize_grads=True)
        total = [t + gi.detach() for t, gi in zip(total, g)]
    return total


def _summed_over_chunks(model: RecLM, items: list[Encoded], batch_size: int,
                        product: Callable[[list[Encoded], Vec], Vec | None]) -> Vec:
    """sum over ``items``' batches of ``product(chunk, params)`` (None: this chunk adds nothing), a curvature
    product that differentiates a backward pass. The fused CPU attention kernel has no derivative of its
    backward; the math kernel (the same attention written in differentiable ops) has."""
    params = model.trainable_parameters()
    total = [torch.zeros_like(p) for p in params]
    with sdpa_kernel(SDPBackend.MATH):
        for chunk in _chunks(model, items, batch_size):
            part = product(chunk, params)
            if part is not None:
                total = [t + h.detach() for t, h in zip(total, part)]
    return total


def hessian_vector_product(model: RecLM, items: list[Encoded], x: Vec, batch_size: int) -> Vec:
    """sum_{z in items} H(z) x, H(z) the Hessian of l(z, theta) in the trainable parameters, by double backward
    (Pearlmutter's trick: the gradient of <grad l, x>); the Hessian itself is never formed."""
    def hx(chunk: list[Encoded], params: Vec) -> Vec | None:
        g = torch.autograd.grad(_loss_sum(model, chunk), params, create_graph=True, materialize_grads=True)
        gx = sum((gi * xi).sum() for gi, xi in zip(g, x))
        if not gx.requires_grad:  # the loss is linear in every parameter here: H = 0
            return None
        return torch.autograd.grad(gx, params, materialize_grads=True)

    return _summed_over_chunks(model, items, batch_size, hx)


def gauss_newton_vector_product(model: RecLM, items: list[Encoded], x: Vec, batch_size: int) -> Vec:
    """sum_{z in items} G(z) x, G(z) = J_z^T p_z (1 - p_z) J_z the Gauss-Newton matrix of the 2-way cross-entropy
    in the trainable parameters (J_z: the gradient of the sample's logit). J x comes from the derivative of
    J^T u in the dummy u (the double-backward form of a Jacobian-vector product), then J^T (p (1 - p) J x) is one
    more backward; G is never formed."""
    def gx(chunk: list[Encoded], params: Vec) -> Vec | None:
        z = model.logits(model.collate(chunk))
        u = torch.zeros_like(z, requires_grad=True)
        jtu = torch.autograd.grad(z, params, grad_outputs=u, create_graph=True, materialize_grads=True)
        ux = sum((g * xi).sum() for g, xi in zip(jtu, x))
        if not ux.requires_grad:  # no parameter reaches the logit
            return None
        jx = torch.autograd.grad(ux, u)[0].detach()  # (B,) J x
        p = torch.sigmoid(z.detach().float())
        return torch.autograd.grad(z, params, grad_outputs=(p * (1 - p) * jx).to(z.dtype), materialize_grads=True)

    return _summed_over_chunks(model, items, batch_size, gx)


CURVATURE = {"hessian": hessian_vector_product, "gauss-newton": gauss_newton_vector_product}


# --- the solvers -----------------------------------------------------------------------------------------------
@dataclass
class Solution:
    """The solver's x ~ (H + lambda I)^-1 v and its record: relative residual ||v - A x|| / ||v|| after each
    iteration (``residuals[0]`` = 1 at x = 0), the curvature met (CG: p^T H p / p^T p per direction), and why
    it stopped."""

    x: Vec
    residuals: list[float] = field(default_factory=list)
    curvatures: list[float] = field(default_factory=list)
    stopped: str = "iterations"

    @property
    def iterations(self) -> int:
        return len(self.residuals) - 1


def conjugate_gradient(hvp: Callable[[Vec], Vec], v: Vec, damping: float, iterations: int, tol: float,
                       log: Callable[[str], None] = print) -> Solution:
    """Solve (H + damping I) x = v from x = 0 with conjugate gradient, ``hvp(x) = H x``.

    Stops after ``iterations``, when the relative residual reaches ``tol``, or at a direction p with
    p^T (H + damping I) p <= 0 (the damped Hessian is not positive definite there: more damping needed)."""
    x = [torch.zeros_like(t) for t in v]
    v_norm = _norm(v)
    sol = Solution(x, [0.0 if v_norm == 0 else 1.0])
    if v_norm == 0:  # nothing to remove: the identity
        sol.stopped = "v = 0"
        return sol
    r = [t.clone() for t in v]
    p = [t.clone() for t in v]
    rr = _dot(r, r)
    for k in range(iterations):
        hp = hvp(p)
        pp = _dot(p, p)
        php = _dot(p, hp)
        sol.curvatures.append(php / pp)
        pap = php + damping * pp
        if pap <= 0:
            sol.stopped = f"negative curvature {php / pp:.3g} < -damping {damping:g}"
            log(f"influence cg {k + 1}/{iterations}: stopped, {sol.stopped}")
            break
        alpha = rr / pap
        ap = _axpy(damping, p, hp)
        sol.x = x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rr_new = _dot(r, r)
        sol.residuals.append(math.sqrt(rr_new) / v_norm)
        log(f"influence cg {k + 1}/{iterations}: relative residual {sol.residuals[-1]:.3e}, curvature "
            f"p'Hp/p'p {sol.curvatures[-1]:.3e} (damping {damping:g})")
        if sol.residuals[-1] <= tol:
            sol.stopped = "tol"
            break
        p = _axpy(rr_new / rr, p, r)
        rr = rr_new
    return sol


def sgd_quadratic(hvp_batch: Callable[[int, Vec], Vec], n_batches: int, v: Vec, damping: float, epochs: int,
                  lr: float, tol: float, log: Callable[[str], None] = print) -> Solution:
    """LLMEraser's solver: min_x 1/2 x^T (H + damping I) x - v^T x by gradient descent over mini-batches,
    ``hvp_batch(b, x)`` = H_b x, the mean Hessian of batch b times x. Residual per epoch: the mean over its
    batches of ||(H_b + damping I) x - v|| / ||v|| (a stochastic estimate; CG's is exact)."""
    x = [torch.zeros_like(t) for t in v]
    v_norm = _norm(v)
    sol = Solution(x, [0.0 if v_norm == 0 else 1.0])
    if v_norm == 0:
        sol.stopped = "v = 0"
        return sol
    for e in range(epochs):
        res = []
        for b in range(n_batches):
            grad = _axpy(-1.0, v, _axpy(damping, x, hvp_batch(b, x)))  # (H_b + damping I) x - v
            res.append(_norm(grad) / v_norm)
            x = _axpy(-lr, grad, x)
        sol.x = x
        sol.residuals.append(sum(res) / len(res))
        log(f"influence sgd epoch {e + 1}/{epochs}: mean mini-batch relative residual {sol.residuals[-1]:.3e}")
        if not math.isfinite(sol.residuals[-1]):
            sol.stopped = "diverged (lower unlearn.influence.lr)"
            break
        if sol.residuals[-1] <= tol:
            sol.stopped = "tol"
            break
    return sol


# --- the update ------------------------------------------------------------------------------------------------
def hessian_items(s: InfluenceSection, retain: list[Encoded], seed: int) -> list[Encoded]:
    """The retained items H_R is estimated on: ``hessian_samples`` of them drawn once (seeded), all when None."""
    return draw(retain, s.hessian_samples, [seed, 19])


def influence_update(model: RecLM, forget: list[Encoded], hessian: list[Encoded], n_retained: int,
                     s: InfluenceSection, log: Callable[[str], None] = print) -> tuple[Vec, Solution, dict]:
    """(the update of the trainable parameters, the solver's record, sizes): x = s.scale * (H + lambda I)^-1 v,
    v = sum_F grad l / n_retained, H the mean Hessian (``s.curvature``: or Gauss-Newton matrix) over ``hessian``.
    The model is not changed."""
    if not hessian and forget:
        raise ValueError("no retained items to estimate the Hessian on")
    was_training = model.model.training
    model.model.eval()  # no dropout: the deterministic loss the original minimised
    try:
        g_forget = loss_gradient(model, forget, s.batch_size)
        v = [g / n_retained for g in g_forget]
        m, product = len(hessian), CURVATURE[s.curvature]
        if s.solver == "cg":
            sol = conjugate_gradient(lambda x: [h / m for h in product(model, hessian, x, s.batch_size)],
                                     v, s.damping, s.iterations, s.tol, log)
        else:
            chunks = _chunks(model, hessian, s.batch_size)
            sol = sgd_quadratic(lambda b, x: [h / len(chunks[b]) for h in product(model, chunks[b], x, s.batch_size)],
                                len(chunks), v, s.damping, s.iterations, s.lr, s.tol, log)
    finally:
        model.model.train(was_training)
    delta = [s.scale * xi for xi in sol.x]
    info = {"v_norm": _norm(v), "update_norm": _norm(delta), "n_hessian": len(hessian), "n_retained": n_retained,
            "n_forget": len(forget)}
    return delta, sol, info


def apply_update(model: RecLM, delta: Vec) -> None:
    """theta += delta on the trainable (adapter) parameters only."""
    with torch.no_grad():
        for p, d in zip(model.trainable_parameters(), delta, strict=True):
            p.add_(d.to(p.dtype))


def influence(task: UnlearnTask) -> Unlearned:
    """Unlearn ``task.forget`` by one damped influence step of the original adapter (in place in ``task.model``):
    the Hessian on ``hessian_samples`` retained items, v from every forgotten item (augmented copies too)."""
    s = task.cfg.unlearn.influence
    theta_norm = _norm([p.detach() for p in task.model.trainable_parameters()])
    hessian = hessian_items(s, task.retain, task.seed)
    task.model.prepare(task.forget + hessian, task.cfg.train.eval_batch_size, task.progress)
    task.log(f"influence: {len(task.forget)} forgotten items, {s.curvature} on {len(hessian)} of {len(task.retain)} "
             f"retained items, {s.solver}, damping {s.damping:g}, {s.iterations} iterations")
    delta, sol, info = influence_update(task.model, task.forget, hessian, len(task.retain), s, task.log)
    apply_update(task.model, delta)
    task.log(f"influence: {sol.iterations} iterations ({sol.stopped}), relative residual {sol.residuals[-1]:.3e}, "
             f"|update| {info['update_norm']:.3e} against |theta| {theta_norm:.3e}")
    curv = sol.curvatures
    return Unlearned(task.model, adapter_state(task.model.model), task.cfg.lora, trained_on_retained_only=False,
                     details={**info, "solver": s.solver, "curvature": s.curvature, "damping": s.damping,
                              "scale": s.scale,
                              "iterations": sol.iterations, "stopped": sol.stopped, "residuals": sol.residuals,
                              "curvatures": curv, "curvature_range": [min(curv), max(curv)] if curv else None,
                              "theta_norm": theta_norm})
