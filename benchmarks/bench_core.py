"""Training and scoring throughput of privrec against a naive loop, measured in the same process.

naive   : fp32, the plain HF forward computing full-vocabulary logits at every position, batches in random
          order (padding to the longest prompt of a random batch), LoRA on all layers.
privrec : the RecLM forward (last real token only, two LM-head rows in fp32; bf16 autocast where the
          hardware has it), length-bucketed batches; (a) LoRA on all layers, (b) LoRA on the top L layers
          with the bottom layers computed once and cached.

Same model, same prompts, same LoRA rank, same batch size. Prints a markdown table of samples/s and the
ratio to naive; ``--out FILE`` also rewrites the marked section of that file.

    python benchmarks/bench_core.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from mdsection import publish

from privrec.config import parse_config
from privrec.data import build_splits, load_dataset
from privrec.model.recmodel import RecLM
from privrec.prepare import machine


def naive_batches(items, bs, seed=0):
    order = np.random.default_rng(seed).permutation(len(items))
    return [order[i: i + bs].tolist() for i in range(0, len(items), bs)]


def naive_logits(m: RecLM, batch) -> torch.Tensor:
    out = m.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)  # (B, T, V) fp32
    full = out.logits
    rows = full[torch.arange(full.shape[0]), batch.last]  # (B, V)
    two = rows[:, [m.yes_id, m.no_id]]
    return two[:, 0] - two[:, 1]


def time_train(m: RecLM, items, bs, naive: bool) -> float:
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-4)
    m.model.train()
    batches = naive_batches(items, bs) if naive else m.length_batches(items, bs)
    if not naive:
        np.random.default_rng(0).shuffle(batches)
    t0 = time.perf_counter()
    for idx in batches:
        b = m.collate([items[i] for i in idx])
        z = naive_logits(m, b) if naive else m.logits(b)
        F.binary_cross_entropy_with_logits(z, b.labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return len(items) / (time.perf_counter() - t0)


@torch.no_grad()
def time_score(m: RecLM, items, bs, naive: bool) -> float:
    m.model.eval()
    t0 = time.perf_counter()
    if naive:
        for idx in naive_batches(items, bs):
            naive_logits(m, m.collate([items[i] for i in idx]))
    else:
        m.score_logits(items, bs, progress=False)
    return len(items) / (time.perf_counter() - t0)


def build(cfg, ds, top_layers):
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"top_layers": top_layers})})
    m = RecLM.from_config(cfg, ds)
    m.cache_dir = None  # in-memory cache only: every cache entry is computed inside the timed region
    m.attach_lora(cfg.lora, 0)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-score", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-layers", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3, help="epochs over which the frozen cache is amortised")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg = parse_config({"model": {"name": args.model},
                        "data": {"n_train": args.n_train, "n_test": args.n_score, "n_valid": 1}})
    ds = load_dataset("ml-100k", None)
    sp = build_splits(ds, cfg.data, 0)
    rows = []

    m = build(cfg, ds, None)
    tr, te = m.encode(sp.train), m.encode(sp.test)
    lengths = [len(e) for e in tr + te]
    naive_train = time_train(m, tr, args.batch_size, naive=True)
    naive_score = time_score(m, te, args.batch_size, naive=True)
    rows.append(("naive: fp32, full-vocabulary logits, unsorted batches, LoRA all layers", naive_train,
                 naive_score))
    rows.append(("privrec: last-token Yes/No head, length buckets, LoRA all layers",
                 time_train(m, tr, args.batch_size, naive=False), time_score(m, te, args.batch_size, False)))
    bf16 = m.bf16
    del m

    m = build(cfg, ds, args.top_layers)
    t0 = time.perf_counter()
    m.prepare(tr, args.batch_size, progress=False)
    cache_s = (time.perf_counter() - t0) / len(tr)  # seconds per prompt for the bottom layers
    step_rate = time_train(m, tr, args.batch_size, naive=False)
    per_sample = 1 / step_rate + cache_s / args.epochs
    rows.append((f"privrec: LoRA top {args.top_layers} of {m.n_layers}, frozen bottom cached "
                 f"(train steps only)", step_rate, float("nan")))
    rows.append((f"privrec: same, cache cost amortised over {args.epochs} epochs", 1 / per_sample,
                 float("nan")))
    m.prepare(te, args.batch_size, progress=False)
    rows.append((f"privrec: scoring with cached bottom {m.cut} layers (repeat scoring: zero-shot, "
                 "per-epoch validation, tuned)", float("nan"), time_score(m, te, args.batch_size, False)))
    t0 = time.perf_counter()
    m2 = build(cfg, ds, args.top_layers)
    te2 = m2.encode(sp.test)
    m2.score_logits(te2, args.batch_size, progress=False)
    rows.append(("privrec: scoring fresh prompts through the cached path (cache filled inside the timing)",
                 float("nan"), len(te2) / (time.perf_counter() - t0)))

    def fmt(v, base):
        return "-" if np.isnan(v) else f"{v:.2f} ({v / base:.2f}x)"

    lines = [
        f"Model `{args.model}`, {len(tr)} training / {len(te)} scoring prompts of the TALLRec template "
        f"(tokens: mean {np.mean(lengths):.0f}, min {min(lengths)}, max {max(lengths)}), batch "
        f"{args.batch_size}, LoRA r=8 on q,v; bf16 autocast: {'on' if bf16 else 'off (not supported here)'}.",
        f"Machine: {machine()} ({platform.processor() or platform.machine()}).",
        f"Command: `python benchmarks/bench_core.py --n-train {args.n_train} --n-score {args.n_score}`",
        "",
        "| path | training samples/s (x naive) | scoring samples/s (x naive) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {fmt(t, naive_train)} | {fmt(s, naive_score)} |" for name, t, s in rows]
    table = "\n".join(lines)
    publish(args.out, "bench_core", table)


if __name__ == "__main__":
    main()
