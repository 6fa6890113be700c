"""What the collaborative signal costs (METHODS §12): training and scoring throughput of the text-only model and
of the same model with the CF vectors injected at the cut (``collab.inject``), measured in the same process.

Same backbone, prompts, LoRA (the demo's: r 8 on q/v of the top 8 layers over the cached bottom 22), batch
size and frozen-layer cache (filled once, before timing: both variants read the same cached states, so the
ratio is what the injection adds: the projector's MLP and the index_put at each prompt's last token). Each
variant is timed ``--rounds`` times, alternating, and the median is kept, so that a load that comes and goes on
the machine hits both alike. The CF features (the MF fit and its cross-fitting folds) are fit once per run, not
per step; their fit time is reported apart.

    python benchmarks/bench_collab.py --out docs/benchmarks.md          # ~6 min on one AVX512-BF16 core
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_core import time_score, time_train
from mdsection import publish

from privrec.config import load_config
from privrec.prepare import build_model, collab_features, item_stats, labelled_pool, machine, setup_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--n", type=int, default=256, help="prompts timed per round (training and scoring)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg = load_config(args.config, ["collab.inject=true"])
    splits = setup_data(cfg)
    t0 = time.perf_counter()
    collab = collab_features(cfg, splits)
    fit_seconds = time.perf_counter() - t0
    stats = item_stats(cfg, splits)
    plain_cfg = cfg.model_copy(update={"collab": cfg.collab.model_copy(update={"inject": False})})
    models = {"text only": build_model(plain_cfg, splits.dataset, stats=stats, collab=collab),
              "+ CF vectors at the cut": build_model(cfg, splits.dataset, stats=stats, collab=collab)}
    samples = splits.train[: args.n]
    items = {k: m.encode(samples) for k, m in models.items()}
    for k, m in models.items():
        m.prepare(items[k], progress=False)  # the cache is shared on disk: filled once, read by both
    train, score = {k: [] for k in models}, {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            train[k].append(time_train(m, items[k], args.batch, naive=False))
            score[k].append(time_score(m, items[k], 16, naive=False))
    base = next(iter(models))
    rows = ["| model | training samples/s | ratio | scoring prompts/s | ratio |", "|---|---|---|---|---|"]
    for k in models:
        tr, sc = statistics.median(train[k]), statistics.median(score[k])
        rows.append(f"| {k} | {tr:.2f} | {tr / statistics.median(train[base]):.3f} | {sc:.2f} | "
                    f"{sc / statistics.median(score[base]):.3f} |")
    body = "\n".join([
        f"Machine: {machine()}; torch threads {torch.get_num_threads()}. Config: {args.config} (LoRA r "
        f"{cfg.lora.r} on {', '.join(cfg.lora.target_modules)} of the top {cfg.lora.top_layers} layers, bottom "
        f"layers cached), {args.n} training prompts, batch {args.batch}; median of {args.rounds} alternating "
        f"rounds. Command: `python benchmarks/bench_collab.py --out docs/benchmarks.md`.",
        "",
        *rows,
        "",
        f"The CF features (MF dim {cfg.collab.dim}, {cfg.collab.epochs} epochs, {cfg.collab.folds} cross-fitting "
        f"folds over {len(labelled_pool(cfg, splits)):,} labelled samples) were fit once in {fit_seconds:.1f} s.",
    ])
    publish(args.out, "bench_collab", body)


if __name__ == "__main__":
    main()
