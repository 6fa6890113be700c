"""What a Hessian-vector product costs against a training step (METHODS §13: "about one training step per batch"):
on a trained run's model and data, the same items through a forward and backward pass (a training step without
the optimizer), the forgotten-loss gradient of ``privrec.unlearning.approx.influence``, and its Hessian-vector
product, timed in the same process (min over ``--reps``).

    python benchmarks/probe_influence_cost.py runs/bench_forget_mia/original --items 32 --set model.threads=1

The adapter's B is set to small seeded noise (a fresh one is zero, which would make the products trivial).
"""

from __future__ import annotations

import argparse
import time

import torch

from privrec.config import load_config
from privrec.model.recmodel import RecLM
from privrec.prepare import machine, setup_data
from privrec.unlearning.approx.influence import _loss_sum, hessian_vector_product, loss_gradient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a trained run directory (its config.yaml is used)")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. model.threads=1")
    args = ap.parse_args()
    cfg = load_config(f"{args.run}/config.yaml", args.set)
    splits = setup_data(cfg, set())
    model = RecLM.from_config(cfg, splits.dataset)
    model.attach_lora(cfg.lora, cfg.seed)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    items = model.encode(splits.train[: args.items])
    model.prepare(items, args.batch_size, False)
    params = model.trainable_parameters()
    x = [torch.randn(p.shape, generator=g) for p in params]
    model.model.eval()
    best = {"step": float("inf"), "gradient": float("inf"), "hvp": float("inf")}
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for i in range(0, len(items), args.batch_size):
            _loss_sum(model, items[i: i + args.batch_size]).backward()
        best["step"] = min(best["step"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        loss_gradient(model, items, args.batch_size)
        best["gradient"] = min(best["gradient"], time.perf_counter() - t0)
        t0 = time.perf_counter()
        hessian_vector_product(model, items, x, args.batch_size)
        best["hvp"] = min(best["hvp"], time.perf_counter() - t0)
    print(f"{cfg.model.name}, LoRA r {cfg.lora.r} on {cfg.lora.target_modules} of the top {cfg.lora.top_layers} "
          f"layers ({sum(p.numel() for p in params)} parameters), bf16 {model.bf16}, {len(items)} items, batch "
          f"{args.batch_size}; {machine()}")
    print(f"forward+backward {best['step']:.2f} s, gradient {best['gradient']:.2f} s, Hessian-vector product "
          f"{best['hvp']:.2f} s: {best['hvp'] / best['step']:.2f}x a training step")


if __name__ == "__main__":
    main()
