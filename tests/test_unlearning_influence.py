"""Influence-function unlearning of the adapter (METHODS §13) on the tiny random Llama, fp32: CG and the
quadratic's SGD solve a damped system; the Hessian-vector product is the derivative of the gradient; on a
strongly convex case the influence step lands where retraining without the samples lands; only adapter tensors
move; removing nothing is the identity; the residual is reported and falls with iterations; the command end to
end writes an approximate student. Also benchmarks/bench_forget.py's ``tune`` (settings chosen on validation
requests) on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import benchmark_module, make_model, randomise_lora, run_cli, tiny_config

from privrec.config import parse_config
from privrec.data import build_splits
from privrec.model.adapters import adapter_state
from privrec.unlearning.approx.influence import (
    _loss_sum,
    apply_update,
    conjugate_gradient,
    gauss_newton_vector_product,
    hessian_vector_product,
    influence,
    influence_update,
    loss_gradient,
)
from privrec.unlearning.approx.task import InfluenceSection, UnlearnConfig, UnlearnTask

FP32 = {"threads": 1, "precision": "fp32"}  # bf16 autocast moves gradients by ~1%: exact comparisons pin fp32


def flat(vec) -> np.ndarray:
    return np.concatenate([t.detach().double().reshape(-1).numpy() for t in vec])


def params_now(model) -> np.ndarray:
    return flat(model.trainable_parameters())


# --- the solvers, on explicit matrices (no model) -----------------------------------------------------------
def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(-2, 1, n, dtype=torch.float64)) @ q.T  # eigenvalues 0.01 .. 10


def test_conjugate_gradient_solves_the_damped_system_and_its_residual_falls():
    a, damping = spd(12, 0), 0.05
    v = [torch.arange(12, dtype=torch.float64).reshape(3, 4) / 10, torch.ones(2, dtype=torch.float64)]

    def hvp(x):  # H acts on the first tensor as the matrix a, and is 0 on the second
        return [(a @ x[0].reshape(-1)).reshape(3, 4), torch.zeros(2, dtype=torch.float64)]

    sol = conjugate_gradient(hvp, v, damping, iterations=40, tol=1e-12, log=lambda m: None)
    exact = torch.linalg.solve(a + damping * torch.eye(12, dtype=torch.float64), v[0].reshape(-1))
    np.testing.assert_allclose(sol.x[0].reshape(-1).numpy(), exact.numpy(), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sol.x[1].numpy(), v[1].numpy() / damping, rtol=1e-8)  # H = 0 there: v / lambda
    assert sol.stopped == "tol" and sol.residuals[0] == 1.0 and sol.residuals[-1] <= 1e-12
    assert min(sol.curvatures) >= -1e-12 and max(sol.curvatures) <= 10 + 1e-9  # within H's spectrum
    few = conjugate_gradient(hvp, v, damping, iterations=3, tol=0.0, log=lambda m: None)
    assert few.iterations == 3 and few.residuals[-1] > sol.residuals[-1]


def test_conjugate_gradient_stops_at_negative_curvature_the_damping_does_not_cover():
    lines = []
    sol = conjugate_gradient(lambda x: [-2.0 * x[0]], [torch.ones(3)], damping=1.0, iterations=5, tol=0.0,
                             log=lines.append)
    assert sol.iterations == 0 and sol.stopped.startswith("negative curvature") and "stopped" in lines[-1]
    assert not sol.x[0].any()  # no step along a direction of ascent


# --- the convex case: a strongly convex adapter loss, trained to convergence ---------------------------------
# Only the LoRA B of the top layer's down_proj trains (A frozen at a small seeded draw): its output enters the
# residual stream right below the final norm and the Yes/No head, so z is nearly linear in theta and the loss
# sum_i l_i + c/2 |theta|^2 is a strongly convex, nearly logistic regression (the curvature CG meets stays within
# [-0.005, 0.13] per item against lambda = c / n = 0.12). It is minimised by full-batch L-BFGS to a gradient
# below 1e-4 (from ~10). METHODS §13's step with damping lambda = c / n (n = retained items) is then a Newton
# step on the retained loss: exact up to the loss's third-order terms, O(|step|^2). (LoRA on q/v with a large A
# is far from quadratic over such a step: its Newton step misses the retrained minimum by 15-500%.)
C = 5.0


def fit(model, items, c: float = C) -> float:
    """Minimise sum_i l(z_i) + c/2 |theta|^2 over the trainable tensors; returns the final gradient norm.

    L-BFGS with a line search first; its Wolfe tests compare fp32 loss values, whose rounding (~1e-6 of a loss
    of ~30) stalls it at a gradient of ~1e-2, so it continues with unit steps, which read gradients only."""
    params = model.trainable_parameters()

    def objective():
        for p in params:
            p.grad = None
        loss = _loss_sum(model, items) + c / 2 * sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    for search, iters in (("strong_wolfe", 40), (None, 60)):
        torch.optim.LBFGS(params, lr=1.0, max_iter=iters, tolerance_grad=1e-12, tolerance_change=0, history_size=20,
                          line_search_fn=search).step(objective)
    objective()
    return float(torch.cat([p.grad.reshape(-1) for p in params]).norm())


@pytest.fixture(scope="module")
def convex(ml100k):
    cfg = tiny_config(model=FP32, data={"n_train": 48, "n_valid": 8, "n_test": 16},
                      lora={"r": 4, "alpha": 8, "top_layers": 1, "dropout": 0.0, "target_modules": ["down_proj"]})
    sp = build_splits(ml100k, cfg.data, cfg.seed)
    model = make_model(cfg, ml100k)
    randomise_lora(model, seed=3, scale=0.1)  # A: a fixed random projection (B is then fit from here)
    for n, p in model.model.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    model.model.eval()
    items = model.encode(sp.train)
    model.prepare(items, 16, progress=False)
    forget, retain = items[:6], items[6:]
    assert fit(model, items) < 1e-4  # converged: the influence formula assumes a minimum
    theta_star = [p.detach().clone() for p in model.trainable_parameters()]
    return model, forget, retain, theta_star


def restore(model, theta) -> None:
    with torch.no_grad():
        for p, t in zip(model.trainable_parameters(), theta):
            p.copy_(t)


def set_flat(model, vec: np.ndarray) -> None:
    with torch.no_grad():
        off = 0
        for p in model.trainable_parameters():
            p.copy_(torch.from_numpy(vec[off: off + p.numel()]).reshape(p.shape))
            off += p.numel()


def section(**kw) -> InfluenceSection:
    return InfluenceSection(**{"iterations": 60, "tol": 1e-9, "hessian_samples": None, "batch_size": 16, **kw})


def test_hessian_vector_product_is_the_derivative_of_the_gradient(convex):
    model, forget, retain, theta = convex
    restore(model, theta)
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(p.shape, generator=g) for p in model.trainable_parameters()]
    hx = flat(hessian_vector_product(model, retain, x, 16))
    eps = 1e-3
    grads = []
    for sign in (1, -1):
        restore(model, [t + sign * eps * xi for t, xi in zip(theta, x)])
        grads.append(flat(loss_gradient(model, retain, 16)))
    restore(model, theta)
    fd = (grads[0] - grads[1]) / (2 * eps)
    assert np.linalg.norm(hx - fd) < 1e-3 * np.linalg.norm(fd)


def test_influence_step_matches_retraining_without_the_samples_on_a_convex_loss(convex):
    model, forget, retain, theta = convex
    restore(model, theta)
    n = len(retain)
    before = params_now(model)
    delta, sol, info = influence_update(model, forget, retain, n, section(damping=C / n), log=lambda m: None)
    assert sol.stopped == "tol" and sol.residuals[-1] <= 1e-9  # the solve is not what is tested below
    assert min(sol.curvatures) > -0.1 * (C / n)  # the data term is nearly convex; with c/2 |theta|^2 strongly
    influenced = before + flat(delta)
    assert np.array_equal(params_now(model), before)  # influence_update leaves the model as it was

    assert fit(model, retain) < 1e-4  # retrain without the forget set (from theta*: the minimum is unique)
    retrained = params_now(model)
    restore(model, theta)
    move = np.linalg.norm(retrained - before)
    assert move > 1e-2 * np.linalg.norm(before)  # forgetting 6 of 48 samples moves the minimum ...
    # ... and the influence step lands within 5% of that move from the retrained minimum (doing nothing: 100%,
    # the wrong sign: 200%); what is left is the O(|step|^2) third-order term of the loss
    err = np.linalg.norm(influenced - retrained)
    assert err < 0.05 * move, (err, move)
    # the same on the outputs: the forgotten samples' P(Yes) as the retrained model's, to 5% of how far the
    # original is from it
    p_orig = model.score(forget, progress=False)
    set_flat(model, retrained)
    p_ret = model.score(forget, progress=False)
    set_flat(model, influenced)
    p_inf = model.score(forget, progress=False)
    restore(model, theta)
    assert np.abs(p_inf - p_ret).max() < 0.05 * np.abs(p_orig - p_ret).max()


def test_sgd_on_the_quadratic_approaches_the_cg_solution(convex):
    model, forget, retain, theta = convex
    restore(model, theta)
    n = len(retain)
    cg, _, _ = influence_update(model, forget, retain, n, section(damping=C / n), log=lambda m: None)
    sgd, sol, _ = influence_update(model, forget, retain, n, section(damping=C / n, solver="sgd", lr=0.05,
                                                                      iterations=30, batch_size=8),
                                   log=lambda m: None)
    assert sol.residuals[-1] < 0.5 * sol.residuals[1]  # its mini-batch residual falls ...
    assert np.linalg.norm(flat(sgd) - flat(cg)) < 0.2 * np.linalg.norm(flat(cg))  # ... towards CG's solution


def test_removing_no_sample_is_the_identity(convex):
    model, _, retain, theta = convex
    restore(model, theta)
    before = params_now(model)
    delta, sol, info = influence_update(model, [], retain, len(retain), section(damping=0.01), log=lambda m: None)
    assert all(not d.any() for d in delta) and sol.iterations == 0 and sol.residuals == [0.0]
    apply_update(model, delta)
    assert np.array_equal(params_now(model), before)


def test_residual_is_reported_and_falls_with_iterations(convex):
    model, forget, retain, theta = convex
    restore(model, theta)
    lines: list[str] = []
    final = {}
    for k in (1, 2, 4):
        lines.clear()
        _, sol, _ = influence_update(model, forget, retain, len(retain), section(damping=C / len(retain),
                                                                                 iterations=k, tol=0),
                                     log=lines.append)
        assert sol.iterations == k and len(sol.residuals) == k + 1
        assert [line.split(":")[0] for line in lines] == [f"influence cg {i}/{k}" for i in range(1, k + 1)]
        assert f"relative residual {sol.residuals[-1]:.3e}" in lines[-1]
        final[k] = sol.residuals[-1]
    assert final[4] < final[2] < final[1] < 1.0, final


# --- the Gauss-Newton curvature: J^T p(1-p) J, positive semi-definite --------------------------------------
@pytest.fixture(scope="module")
def lora_qv(ml100k):
    """A non-convex case: LoRA on q/v of the top layer with random A and B, far from any minimum."""
    cfg = tiny_config(model=FP32, data={"n_train": 24, "n_valid": 8, "n_test": 8},
                      lora={"r": 4, "alpha": 8, "top_layers": 1, "dropout": 0.0})
    sp = build_splits(ml100k, cfg.data, cfg.seed)
    model = make_model(cfg, ml100k)
    randomise_lora(model, seed=1, scale=0.3)
    model.model.eval()
    items = model.encode(sp.train)
    model.prepare(items, 16, progress=False)
    return model, items


def test_gauss_newton_product_is_the_jacobian_form_and_positive_semi_definite(lora_qv):
    model, items = lora_qv
    params = model.trainable_parameters()
    few = items[:6]
    z = model.logits(model.collate(few))
    jac = np.stack([flat(torch.autograd.grad(z[i], params, retain_graph=True)) for i in range(len(few))])  # (6, P)
    w = torch.sigmoid(z.detach()).double().numpy()
    g = torch.Generator().manual_seed(5)
    xs = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
    gx = [flat(gauss_newton_vector_product(model, few, x, 4)) for x in xs]  # two batches of the six
    for x, got in zip(xs, gx):
        want = jac.T @ (w * (1 - w) * (jac @ flat(x)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
        assert flat(x) @ got >= 0  # x^T G x = sum p(1-p) (J x)^2
    assert flat(xs[0]) @ gx[1] == pytest.approx(flat(xs[1]) @ gx[0], rel=1e-4)  # symmetric


def test_gauss_newton_cg_solves_where_the_hessians_negative_curvature_stops_it(lora_qv):
    model, items = lora_qv
    forget, retain = items[:4], items[4:]
    runs = {c: influence_update(model, forget, retain, len(retain), section(damping=1e-3, iterations=8, tol=0,
                                                                            curvature=c), log=lambda m: None)
            for c in ("hessian", "gauss-newton")}
    _, hess, _ = runs["hessian"]
    delta, gn, info = runs["gauss-newton"]
    assert hess.stopped.startswith("negative curvature") and min(hess.curvatures) < -1e-3  # this loss is not convex
    assert gn.stopped == "iterations" and gn.iterations == 8 and min(gn.curvatures) >= 0  # G never is
    assert gn.residuals[-1] < 0.5 * hess.residuals[-1] and gn.residuals[-1] < gn.residuals[1]
    assert info["update_norm"] > 0 and any(d.any() for d in delta)


def test_gauss_newton_step_matches_retraining_on_the_nearly_linear_convex_loss(convex):
    """Where the logit is nearly linear in theta, G ~ H, so the Gauss-Newton step lands near the Newton step:
    within 20% of the move from the retrained minimum (measured 14%; the Newton step: 5%, doing nothing: 100%);
    what it leaves out is the logit's own curvature, which this loss still has a little of."""
    model, forget, retain, theta = convex
    restore(model, theta)
    n = len(retain)
    before = params_now(model)
    delta, sol, _ = influence_update(model, forget, retain, n, section(damping=C / n, curvature="gauss-newton"),
                                     log=lambda m: None)
    hdelta, _, _ = influence_update(model, forget, retain, n, section(damping=C / n), log=lambda m: None)
    assert sol.stopped == "tol" and min(sol.curvatures) >= 0
    assert fit(model, retain) < 1e-4
    retrained = params_now(model)
    restore(model, theta)
    move = np.linalg.norm(retrained - before)
    err = np.linalg.norm(before + flat(delta) - retrained)
    assert err < 0.2 * move, (err, move)
    gap = np.linalg.norm(flat(delta) - flat(hdelta)) / np.linalg.norm(flat(hdelta))
    assert gap < 0.2, gap


# --- the method on a task: only adapter tensors move ---------------------------------------------------------
def test_influence_moves_only_the_adapter_and_says_it_is_approximate(ml100k):
    cfg = tiny_config(model=FP32, lora={"r": 4, "alpha": 8, "top_layers": 1})
    raw = cfg.model_dump()
    raw["unlearn"] = {"influence": {"iterations": 4, "damping": 0.01, "hessian_samples": 16}}
    ucfg = parse_config(raw, UnlearnConfig)
    sp = build_splits(ml100k, cfg.data, cfg.seed)
    model = make_model(ucfg, ml100k)
    randomise_lora(model, seed=1, scale=0.3)
    items = model.encode(sp.train)
    model.prepare(items, 16, progress=False)
    state = adapter_state(model.model)
    base = {n: p.detach().clone() for n, p in model.model.named_parameters() if not p.requires_grad}
    assert base and all("lora_" not in n for n in base)
    logged: list[str] = []
    task = UnlearnTask(ucfg, ml100k, model, state, items[:8], items[8:], items[8:16], [], seed=0, progress=False,
                       log=logged.append)
    result = influence(task)
    after = dict(result.model.model.named_parameters())
    for n, t in base.items():
        assert torch.equal(after[n].detach(), t), f"{n} changed"  # base weights bit-identical
    new = result.adapter_state
    assert set(new) == set(state) and any(not torch.equal(new[k], state[k]) for k in state)
    assert not result.trained_on_retained_only and result.lora == cfg.lora
    d = result.details
    assert d["n_hessian"] == 16 and d["n_retained"] == len(items) - 8 and d["iterations"] <= 4
    assert len(d["residuals"]) == d["iterations"] + 1 and d["update_norm"] > 0
    assert any("relative residual" in line for line in logged)


# --- the command ---------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def test_unlearn_method_influence_end_to_end(tmp_path, capsys):
    from privrec import models

    run = tmp_path / "tiny"
    code, _, _ = run_cli(capsys, "train", str(ROOT / "configs" / "tiny.yaml"), "--out", str(run), "--set",
                         "model.precision=fp32", "--set", "eval.zero_shot=false", "--set", "train.epochs=1")
    assert code == 0
    out = tmp_path / "influence"
    code, stdout, err = run_cli(capsys, "unlearn", str(run), "--method", "influence", "--out", str(out),
                                "--config", str(ROOT / "configs" / "unlearn" / "tiny.yaml"),
                                "--set", "unlearn.influence.iterations=3", "--set", "unlearn.influence.tol=0")
    assert code == 0, err
    assert "influence cg 1/3: relative residual" in err and "influence cg 3/3" in err  # on stderr, per iteration
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "influence" and m["exact"] is False
    assert len(m["details"]["residuals"]) == 4 and m["details"]["residuals"][-1] < 1.0
    # the Hessian's budget is the retained loss's, not the request's: all retained items of the tiny run (< 128)
    assert m["budget"]["steps"]["influence"] == {"hessian_items": m["n_retain_items"], "hvp_passes": 3}
    manifest = models.load(out)
    assert manifest.kind == "student" and manifest.method == "influence" and manifest.exact is False
    meta = json.loads((out / "adapters" / "default" / "privrec.json").read_text())
    assert meta["exact"] is False and meta["method"] == "influence"
    assert "influence" in stdout


# --- benchmarks/bench_forget.py tune: settings chosen on validation requests -----------------------------------
def test_tune_judges_completeness_under_the_guards():
    bf = benchmark_module("bench_forget")
    originals = [{"jsd_vs_retrain": 0.2, "kl_sym_vs_retrain": 0.4, "retain_auc": 0.9}] * 3
    rows = [{"jsd_vs_retrain": j, "kl_sym_vs_retrain": 2 * j, "retain_auc": a, "retrain_seconds": 100.0,
             "unlearn_seconds": s, "n_forget": 4, "details_steps": 2} for j, a, s in
            ((0.1, 0.9, 5.0), (0.05, 0.88, 2.0), (0.3, 0.895, 20.0))]
    j = bf.judge(rows, originals)
    assert j["completeness_jsd"] == pytest.approx(0.5) and j["completeness_kl"] == pytest.approx(0.5)  # medians
    assert j["retain_auc_drop"] == pytest.approx(0.02) and j["min_speedup"] == pytest.approx(5.0)
    assert j["steps_per_forgotten_sample"] == 0.5
    assert [bf.point_name(p) for p in bf.grid_points({"a.x": [1, 2], "b": [3]})] == ["a.x=1 b=3", "a.x=2 b=3"]


def test_tune_like_draws_validation_users_sized_like_the_measured_request():
    bf = benchmark_module("bench_forget")
    counts = {1: 1, 2: 1, 3: 6, 4: 7, 5: 9, 6: 20, 7: 7, 8: 2}
    rng = lambda: bf.np.random.default_rng(0)  # noqa: E731
    sized = bf.draw_tune_users(counts, {4}, 2, 7, rng())
    assert set(sized) == {3, 7}  # the nearest to 7 samples besides the measured user 4 (7: 0 off, 3: 1 off)
    assert bf.draw_tune_users(counts, {4}, 3, 7, rng()) == [3, 5, 7]  # 0, 1 and 2 off: the three nearest
    anywhere = {u for seed in range(20)
                for u in bf.draw_tune_users(counts, {4}, 2, None, bf.np.random.default_rng(seed))}
    assert 4 not in anywhere and anywhere - {3, 5, 7}  # unsized: any user but the measured one
    assert bf.draw_tune_users(counts, set(counts) - {1}, 3, 7, rng()) == [1]  # fewer candidates than asked


def test_tune_chooses_on_validation_users_apart_from_the_measured_ones(tmp_path, capsys):
    bf = benchmark_module("bench_forget")
    runs = tmp_path / "bf"
    common = ["--config", str(ROOT / "configs" / "apa-tiny.yaml"), "--runs", str(runs), "--unlearn-config",
              str(ROOT / "configs" / "unlearn" / "tiny.yaml"), "--set", "model.precision=fp32", "--no-progress"]
    assert bf.main(["tune", *common, "--tune-requests", "2", "--tune-methods", "neggrad",
                    "--grid", "neggrad:neggrad.train.epochs=1,4", "--grid", "neggrad:neggrad.train.lr=3e-3",
                    "--tune-min-speedup", "0"]) == 0
    table = capsys.readouterr().out
    rec = json.loads((runs / "bench_forget.json").read_text())
    valid = {req: rows for req, rows in rec["tune"].items()}
    assert len(valid) == 2 and all(set(rows) == {"retrain", "original", "neggrad"} for rows in valid.values())
    args = bf.argparse.Namespace(runs=str(runs), config=common[1], set=["model.precision=fp32"], original_set=[])
    measured = {u for users in bf.approx_requests(args, runs / "original").values() for u in users}
    assert not measured & {int(req.split("-u")[1]) for req in valid}  # validation users are not measured ones
    points = ["neggrad.train.epochs=1 neggrad.train.lr=0.003", "neggrad.train.epochs=4 neggrad.train.lr=0.003"]
    for rows in valid.values():
        assert set(rows["neggrad"]) == set(points)
        assert all(not any(k.startswith("test_") for k in r) for r in rows["neggrad"].values())  # never test
    chosen = rec["tuned"]["neggrad"]
    judged = {p: bf.judge([valid[r]["neggrad"][p] for r in valid], [valid[r]["original"] for r in valid])
              for p in points}
    ok = [p for p in points if judged[p]["retain_auc_drop"] <= 0.01]
    best = min(ok or points, key=lambda p: judged[p]["completeness_jsd"])
    assert bf.point_name(chosen["values"]) == best and chosen["met_guards"] == bool(ok)
    assert "| neggrad |" in table and "**yes**" in table
    rec_obj = bf.Record(runs / "bench_forget.json")
    assert bf.tuned_overrides(rec_obj, "neggrad") == [f"unlearn.{k}={v}" for k, v in chosen["values"].items()]
    assert bf.tuned_overrides(rec_obj, "e2urec") == []
