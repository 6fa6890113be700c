"""How soon and how close: ``privrec serve --approximate influence``'s answer against the exact replay, per request
(issue 32, Build 2; METHODS §13), on a shards model.

For each drawn user (core: the most training samples; edge: the fewest; random: seeded), on a fresh copy of the
run:
1. the approximate answer as the service computes it: a recommender built on the copy (timed apart), then
   :func:`privrec.serve.approximate.influence_states` (timed: the step itself);
2. the exact request: ``privrec forget``'s own code, request to certificate (timed);
3. P(Yes) of the user's samples in their shard under the original shard adapter, the approximate one and the exact
   one, every prompt rendered under the features that remain after the deletion (what any of them is shown
   then). Completeness = JSD(approximate, exact) / JSD(original, exact) over those samples: 1 is no closer to
   the exact answer than doing nothing, 0 is the exact answer.

    python benchmarks/bench_serve_approximate.py RUN --users 3 --set hessian_samples=32 --set iterations=8 \\
        --out benchmarks/bench_serve_approximate-measured.json

Frozen-layer cache entries the exact requests purge are linked back after each (cachekeep). Prints a markdown
table; ``--out`` also keeps the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from cachekeep import kept_cache

from privrec.commands.forget import run_forget
from privrec.commands.serve import influence_section
from privrec.model.adapters import load_adapter_state, read_adapter, read_meta
from privrec.prepare import cpu_kind, machine, source_data
from privrec.recommender import Recommender
from privrec.serve.approximate import influence_states
from privrec.unlearning.exact.shards import shard_features
from privrec.unlearning.measures import jensen_shannon


def draw(run: Path, n: int, seed: int) -> dict[int, str]:
    """user -> draw: core, edge, then seeded random ones (over the shards' training samples)."""
    counts: dict[int, int] = {}
    for folder in sorted((run / "adapters").iterdir()):
        for i in read_meta(folder)["sample_ids"]:
            u = int(i.split("-")[0][1:])
            counts[u] = counts.get(u, 0) + 1
    ranked = sorted(counts, key=lambda u: (-counts[u], u))
    out = {ranked[0]: "core", ranked[-1]: "edge"}
    rest = [u for u in ranked if u not in out]
    rng = np.random.default_rng([seed, 23])
    out.update({int(u): "random" for u in rng.choice(rest, size=max(0, min(len(rest), n - 2)), replace=False)})
    return dict(list(out.items())[:n])


def shard_of(run: Path, user: int) -> tuple[int, str, list[str]]:
    """(the position of the adapter holding ``user``, its folder, its sample ids)."""
    from privrec import models

    for k, a in enumerate(models.load(run).adapters):
        ids = read_meta(run / a.path)["sample_ids"]
        if any(i.startswith(f"u{user}-") for i in ids):
            return k, a.path, ids
    raise SystemExit(f"user {user} is in no shard of {run}")


def one_request(src: Path, work: Path, user: int, section) -> dict:
    dst = work / "copy"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "staging", "serve"))
    k, path, ids = shard_of(dst, user)
    t0 = time.perf_counter()
    rec = Recommender(dst)
    build_s = time.perf_counter() - t0
    original = dict(rec.scorer.states[k])
    t0 = time.perf_counter()
    states, info = influence_states(rec, {user}, section, log=lambda m: print(m, file=sys.stderr))
    step_s = time.perf_counter() - t0
    with kept_cache(work):
        t0 = time.perf_counter()
        cert = run_forget(dst, users=[user], progress=False)
        exact_s = time.perf_counter() - t0
    exact = read_adapter(dst / path)[0]
    cfg, model = rec.cfg, rec.scorer.model
    universe = source_data(cfg)[1]
    remaining = [universe[i] for i in read_meta(dst / path)["sample_ids"]]
    forgotten = [universe[i] for i in ids if universe[i].user_id == user]
    with model.features_of(shard_features(cfg, sorted(remaining, key=lambda s: s.sample_id))):
        items = model.encode(forgotten)
    probs = {}
    for name, state in (("original", original), ("approximate", states[k]), ("exact", exact)):
        load_adapter_state(model.model, state)
        probs[name] = model.score(items, cfg.train.eval_batch_size, progress=False)
    base = jensen_shannon(probs["original"], probs["exact"])
    shutil.rmtree(dst, ignore_errors=True)
    return {"user": user, "shard": k, "n_forgotten": len(forgotten), "n_shard": len(ids),
            "build_seconds": build_s, "step_seconds": step_s, "exact_seconds": exact_s,
            "exact_retrain_seconds": cert["record"]["retrain_seconds"],
            "slices": next((a.get("slices") for a in cert["body"]["adapters"] if a["shard"] == k), None),
            "jsd_original_exact": base, "jsd_approximate_exact": jensen_shannon(probs["approximate"], probs["exact"]),
            "completeness": jensen_shannon(probs["approximate"], probs["exact"]) / base if base > 0 else None,
            "residual": info[str(k)]["residual"], "iterations": info[str(k)]["iterations"],
            "mean_p_yes": {n: float(np.mean(p)) for n, p in probs.items()},
            "labels_mean": float(np.mean([s.label for s in forgotten]))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a shards model directory (it is not changed: every request runs on a copy)")
    p.add_argument("--users", type=int, default=3, help="requests: core, edge, then random users")
    p.add_argument("--set", action="append", default=[], help="an influence setting, e.g. hessian_samples=32")
    p.add_argument("--work", default=None, help="where the copies go (default: RUN.bench-approximate)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    run = Path(args.run)
    work = Path(args.work or f"{run}.bench-approximate")
    work.mkdir(parents=True, exist_ok=True)
    section = influence_section(args.set)
    rows = []
    for user, kind in draw(run, args.users, 0).items():
        row = dict(one_request(run, work, user, section), draw=kind)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    lines = [f"Model {run}; influence {section.model_dump()}; machine: {machine()}.", "",
             "| user (draw) | samples in shard / forgotten | approximate: step s (+ model build s) | exact: request "
             "to certificate s | exact / step | completeness (JSD to exact, share of doing nothing's) | residual |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['user']} ({r['draw']}) | {r['n_shard']} / {r['n_forgotten']} | {r['step_seconds']:.1f} "
                     f"(+{r['build_seconds']:.1f}) | {r['exact_seconds']:.1f} | "
                     f"{r['exact_seconds'] / r['step_seconds']:.1f}x | "
                     f"{'-' if r['completeness'] is None else format(r['completeness'], '.2f')} | "
                     f"{r['residual']:.2e} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(run), "influence": section.model_dump(), "cpu": cpu_kind(),
                                              "machine": machine(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
