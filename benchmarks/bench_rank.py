"""Ranking throughput: candidates ranked per second with shared-prefix scoring vs every candidate's full prompt.

shared : RecLM.score_groups(shared=True): each user's prompt prefix runs once (several users per batch), its
         key-value cache is kept, and the candidates' suffixes are scored in batches against it.
full   : RecLM.score_groups(shared=False): every candidate's whole prompt (prefix + suffix) through the
         ordinary forward (the path training uses; with LoRA on the top layers, the frozen bottom layers
         are computed inside the timing: these are fresh prompts).

Both scorers (P(Yes) of the like-prompt; title log-likelihood after the next-movie prompt), at 10 and 100
candidates per user, same model, same process. The full path is timed on at most ``--full-limit``
candidates per setting (its cost is per candidate); the largest score difference between the two paths on
those candidates is printed beside the rates. ``--out FILE`` rewrites the bench_rank section of that file.

    python benchmarks/bench_rank.py --out docs/benchmarks.md      # SmolLM2-135M (the real model)
    python benchmarks/bench_rank.py --tiny                         # smoke test on the tiny random model
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from mdsection import publish

from privrec import ranking
from privrec.config import load_config
from privrec.data import build_ranking_splits, load_dataset
from privrec.model.recmodel import PrefixGroup, RecLM
from privrec.prepare import machine

ROOT = Path(__file__).resolve().parents[1]


def build_model(cfg, ds) -> RecLM:
    m = RecLM.from_config(cfg, ds)
    m.cache_dir = None  # in-memory frozen cache only: every entry the full path needs is computed in the timing
    m.attach_lora(cfg.lora, cfg.seed)
    return m


def truncate(groups: list[PrefixGroup], limit: int) -> list[PrefixGroup]:
    """The first ``limit`` candidates of the groups, in order (whole groups first, then part of one)."""
    out, left = [], limit
    for g in groups:
        if left <= 0:
            break
        out.append(PrefixGroup(g.prefix, g.suffixes[:left]))
        left -= len(out[-1].suffixes)
    return out


def measure(m: RecLM, groups: list[PrefixGroup], scorer: str, rc, full_limit: int, batch_size: int) -> dict:
    n = sum(len(g.suffixes) for g in groups)
    m.score_groups(truncate(groups, 2), scorer, shared=True, progress=False)  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    shared = m.score_groups(groups, scorer, shared=True, prefix_batch=rc.prefix_batch,
                            max_suffixes=rc.max_suffixes, progress=False)
    t_shared = time.perf_counter() - t0
    sub = truncate(groups, full_limit)
    n_full = sum(len(g.suffixes) for g in sub)
    t0 = time.perf_counter()
    full = m.score_groups(sub, scorer, shared=False, batch_size=batch_size, progress=False)
    t_full = time.perf_counter() - t0
    diff = max(float(np.abs(a[: len(b)] - b).max()) for a, b in zip(shared, full))
    return {"n": n, "shared": n / t_shared, "n_full": n_full, "full": n_full / t_full, "diff": diff,
            "prefix": float(np.mean([len(g.prefix) for g in groups])),
            "suffix": float(np.mean([len(s) for g in groups for s in g.suffixes]))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "rank-ml100k.yaml"))
    ap.add_argument("--tiny", action="store_true", help="configs/rank-tiny.yaml (smoke test; never written to docs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--users-10", type=int, default=8, help="users ranked at 10 candidates")
    ap.add_argument("--users-100", type=int, default=2, help="users ranked at 100 candidates")
    ap.add_argument("--full-limit", type=int, default=40, help="candidates timed through full prompts per setting")
    ap.add_argument("--scorers", default="yes,title")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tiny:
        if args.out:
            ap.error("--tiny numbers are not benchmarks: drop --out")
        args.config = str(ROOT / "configs" / "rank-tiny.yaml")

    base = load_config(args.config, args.overrides)
    ds = load_dataset(base.data.source, base.data.path)
    m = build_model(base, ds)
    rows = []
    for n_cand, users in ((10, args.users_10), (100, args.users_100)):
        cfg = load_config(args.config, [*args.overrides, f"ranking.n_candidates={n_cand}", f"data.n_test={users}",
                                        "prompt.max_length=4096"])
        m.max_length = cfg.prompt.max_length
        rankings = build_ranking_splits(ds, cfg.data, n_cand, cfg.ranking.candidate_seed, cfg.seed).test
        for scorer in args.scorers.split(","):
            build = {"yes": ranking.yes_group, "title": ranking.title_group}[scorer]
            groups = [build(m, r) for r in rankings]
            r = measure(m, groups, scorer, cfg.ranking, args.full_limit, cfg.train.eval_batch_size)
            rows.append((n_cand, scorer, len(rankings), r))
            print(f"{n_cand} candidates, {scorer}: shared {r['shared']:.2f}/s, full {r['full']:.2f}/s "
                  f"({r['shared'] / r['full']:.2f}x), max |diff| {r['diff']:.2e}", file=sys.stderr)

    names = {"yes": "P(Yes) of the like-prompt", "title": "title log-likelihood"}
    cmd = "python benchmarks/bench_rank.py" + ("" if args.config.endswith("rank-ml100k.yaml") else
                                               f" --config {args.config}") + "".join(f" --set {o}" for o in
                                                                                    args.overrides)
    lines = [
        f"Model `{base.model.name}`, {base.prompt.template} template, LoRA r={base.lora.r} on the top "
        f"{base.lora.top_layers} layers (fresh adapter), shared-prefix batches of {base.ranking.prefix_batch} users "
        f"and at most {base.ranking.max_suffixes} suffixes per forward; bf16 autocast: "
        f"{'on' if m.bf16 else 'off (not supported here)'}. Full prompts timed on the first {args.full_limit} "
        "candidates of each setting.",
        f"Machine: {machine()} ({platform.processor() or platform.machine()}).",
        f"Command: `{cmd}`",
        "",
        "| candidates per user | scorer | users | prefix / suffix tokens (mean) | shared-prefix candidates/s | "
        "full-prompt candidates/s | speed-up | max abs score difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {names[s]} | {u} | {r['prefix']:.0f} / {r['suffix']:.0f} | {r['shared']:.2f} | "
              f"{r['full']:.2f} | {r['shared'] / r['full']:.2f}x | {r['diff']:.1e} |" for n, s, u, r in rows]
    table = "\n".join(lines)
    publish(args.out, "bench_rank", table)


if __name__ == "__main__":
    main()
