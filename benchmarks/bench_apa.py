"""APA exact unlearning on the real model: quality, forgetting time and inference cost (METHODS §4, §6).

Three tables, each a separate step (``all`` runs them in order); every training run is a shard-train run
directory under ``--runs`` and is reused when its metrics.json exists, so an interrupted benchmark picks up
where it stopped (``--fresh`` retrains).

auc        Test AUC on ML-100K (configs/apa-ml100k.yaml: 1024 / 500 / 1000 samples, K=4):
           retrain (one adapter on all 1024), SISA (random shards, output averaging), RecEraser-style (user
           shards, output averaging), APA(D) and APA(ND) (semantic shards), uniform parameter averaging, the
           mean of the single shard adapters, and semantic vs random partition under APA(ND); beside APA's
           published Movie row. Three shard-train runs: semantic (+ full retrain), random, user.
forget     Time to forget one user vs retraining from scratch, on copies of the semantic and the user runs:
           the affected shards' retraining (frozen cache warm: shared with shard-train) against (a) the full
           retrain on the same cached path, (b) the full retrain including building the frozen cache for its
           prompts, (c) the full retrain with no frozen-layer cache (bottom layers run every step).
inference  Scoring cost per test sample with cached bottom layers: one adapter, APA(ND)/APA(D)/uniform
           mixtures (one pass), the neighbour weights, the untuned-model pass APA needs for its neighbour
           search (features=final) or the free cut-layer states (features=cut), and SISA (K passes).

    python benchmarks/bench_apa.py auc       --out-results docs/results.md
    python benchmarks/bench_apa.py forget    --out-bench docs/benchmarks.md
    python benchmarks/bench_apa.py inference --out-bench docs/benchmarks.md

Each step rewrites only its own marked section of the output file.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import mdsection
import numpy as np

from privrec.commands.forget import run_forget
from privrec.commands.shard_train import run_shard_train
from privrec.config import load_config
from privrec.data import Splits
from privrec.model.adapters import load_adapter_state, read_adapter
from privrec.model.mixture import score_mixture
from privrec.model.recmodel import FrozenCache
from privrec.prepare import machine
from privrec.rundir import FEATURES_FILE, LEDGER_FILE, RunDir
from privrec.train import train
from privrec.unlearning.exact.apa import apa_weights, score_each, uniform_weights
from privrec.unlearning.exact.ledger import Ledger
from privrec.unlearning.exact.shards import (
    ApaConfig,
    build_model,
    load_features,
    read_states,
    setup_shard_data,
    shard_folders,
    source_data,
)

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {  # APA (arXiv 2404.10327), Movie, AUC (METHODS §4); LLaMA-7B on other hardware
    "retrain": 0.7428,
    "sisa": 0.7035,
    "receraser": 0.6937,
    "apa-d": 0.7259,
    "apa-nd": 0.7256,
}


def log(msg: str) -> None:
    print(f"[bench_apa {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- runs ------------------------------------------------------------------------------------------------
RUNS = {  # name -> overrides on top of the config
    "semantic": ["shards.partition=semantic", "shards.full_retrain=true"],
    "random": ["shards.partition=random", "shards.aggregations=[apa-nd,sisa]", "shards.primary=sisa"],
    "user": ["shards.partition=user", "shards.aggregations=[sisa]", "shards.primary=sisa"],
}


def shard_run(args, name: str) -> dict:
    out = Path(args.runs) / name
    if (out / "metrics.json").is_file() and not args.fresh:
        log(f"{name}: reusing {out}")
        return json.loads((out / "metrics.json").read_text())
    if args.fresh and out.exists():
        shutil.rmtree(out)
    seed = Path(args.runs) / "semantic" / FEATURES_FILE  # same untuned model, same prompts: same features
    if name != "semantic" and seed.is_file() and not (out / FEATURES_FILE).exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(seed, out / FEATURES_FILE)
    cfg = load_config(args.config, args.set + RUNS[name], cls=ApaConfig)
    log(f"{name}: shard-train -> {out}")
    t0 = time.perf_counter()
    m = run_shard_train(cfg, out, progress=not args.no_progress)
    m["wall_seconds"] = time.perf_counter() - t0
    RunDir(out).write_metrics(m)
    gc.collect()  # the run's model and in-memory frozen cache go before the next run loads its own
    return m


def fmt(v, nd=4) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{nd}f}"


def step_auc(args) -> None:
    t0 = time.perf_counter()
    sem, rnd, usr = (shard_run(args, n) for n in ("semantic", "random", "user"))
    rows = [
        ("Retrain (one adapter, all training samples)", "-", "-", sem["retrain"], PUBLISHED["retrain"]),
        ("SISA", "random", "mean of K outputs", rnd["aggregations"]["sisa"], PUBLISHED["sisa"]),
        ("RecEraser-style", "user", "mean of K outputs", usr["aggregations"]["sisa"], PUBLISHED["receraser"]),
        ("APA(D)", "semantic", "per-sample A, B mixture", sem["aggregations"]["apa-d"], PUBLISHED["apa-d"]),
        (
            "APA(ND)",
            "semantic",
            "per-sample B_k A_k mixture",
            sem["aggregations"]["apa-nd"],
            PUBLISHED["apa-nd"],
        ),
        ("uniform", "semantic", "mean of B_k A_k (tau=0)", sem["aggregations"]["uniform"], None),
        ("SISA on semantic shards", "semantic", "mean of K outputs", sem["aggregations"]["sisa"], None),
        ("mean of single shard adapters", "semantic", "-", {"auc": sem["single_shard_mean_auc"]}, None),
        (
            "APA(ND) on random shards",
            "random",
            "per-sample B_k A_k mixture",
            rnd["aggregations"]["apa-nd"],
            None,
        ),
        ("mean of single shard adapters", "random", "-", {"auc": rnd["single_shard_mean_auc"]}, None),
        ("mean of single shard adapters", "user", "-", {"auc": usr["single_shard_mean_auc"]}, None),
    ]
    cfg = load_config(args.config, args.set, cls=ApaConfig)
    lines = [
        f"Model `{cfg.model.name}`, ML-100K TALLRec protocol: {sem['n_train']} train / {sem['n_valid']} "
        f"validation (APA's neighbour pool) / {sem['n_test']} test samples; K={cfg.shards.k} shards "
        f"(sizes: semantic {sem['shards']}, random {rnd['shards']}, user {usr['shards']}); "
        f"LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)} of the top {cfg.lora.top_layers} "
        f"layers, {cfg.train.epochs} epochs, lr {cfg.train.lr:g}, batch {cfg.train.batch_size}; "
        f"APA n={cfg.shards.neighbours}, tau={cfg.shards.tau:g}, error {cfg.shards.error}, "
        f"features {cfg.shards.features}.",
        f"Machine: {machine()}. Wall time of the three runs: {time.perf_counter() - t0:.0f} s this call "
        f"(runs: semantic {fmt(sem.get('wall_seconds'), 0)} s, random {fmt(rnd.get('wall_seconds'), 0)} s, "
        f"user {fmt(usr.get('wall_seconds'), 0)} s).",
        f"Command: `python benchmarks/bench_apa.py auc {' '.join('--set ' + s for s in args.set)}`".rstrip(),
        "",
        "| method | partition | aggregation | AUC | LogLoss | ACC | APA paper, Movie AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, part, agg, m, pub in rows:
        lines.append(
            f"| {name} | {part} | {agg} | {fmt(m.get('auc'))} | {fmt(m.get('logloss'))} | "
            f"{fmt(m.get('accuracy'))} | {fmt(pub)} |"
        )
    refs = sem.get("references") or {}
    for ref, r in refs.items():
        lines.append(
            f"| reference: {ref} | - | - | {fmt(r.get('auc'))} | {fmt(r.get('logloss'))} | "
            f"{fmt(r.get('accuracy'))} | - |"
        )
    lines += [
        "",
        "Published numbers: LLaMA-7B in the paper; compare trends (APA vs SISA / RecEraser, semantic "
        "vs random), not absolute values. RecEraser-style here averages outputs (RecEraser's learned "
        "attention aggregator is not implemented).",
    ]
    mdsection.publish(args.out_results, "bench_apa:auc", "\n".join(lines))


# --- forget ------------------------------------------------------------------------------------------------
def pick_user(run: Path, universe) -> int:
    """The user with the median number of training samples in the run (ties: smallest id)."""
    counts: dict[int, int] = {}
    for folder in shard_folders(RunDir(run, create=False)).values():
        for sid in read_adapter(folder)[1]["sample_ids"]:
            u = universe[sid].user_id
            counts[u] = counts.get(u, 0) + 1
    ranked = sorted(counts, key=lambda u: (counts[u], u))
    return ranked[len(ranked) // 2]


def forget_on_copy(args, name: str, user: int) -> dict:
    src, dst = Path(args.runs) / name, Path(args.runs) / f"{name}-forget"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    log(f"forget user {user} on a copy of {name}")
    t0 = time.perf_counter()
    cert = run_forget(dst, users=[user], progress=not args.no_progress)
    wall = time.perf_counter() - t0
    body = cert["body"]
    return {
        "run": name,
        "user": user,
        "removed_train": sum(x["split"] == "train" for x in body["removed"]["samples"]),
        "affected": body["affected_shards"],
        "retrain_seconds": cert["record"]["retrain_seconds"],
        "wall_seconds": wall,
        "passed": body["lineage_check"]["passed"],
    }


def full_retrain_seconds(args, cfg: ApaConfig, cache: bool) -> tuple[float, float]:
    """One adapter on all training samples, timed in this process: (frozen-cache seconds, training seconds).

    ``cache``: the top-L path with a cold, in-memory frozen cache (the cache pass for the training prompts is
    timed, then training on the cached states); otherwise no frozen-layer cache at all (bottom layers run
    every step)."""
    overrides = args.set + ([] if cache else ["lora.cache_frozen=false"])
    cfg = load_config(args.config, overrides, cls=ApaConfig)
    splits = setup_shard_data(cfg, set())
    model, init = build_model(cfg, splits.dataset)
    load_adapter_state(model.model, init)
    if model.cache is not None:  # cold: nothing from disk, nothing from earlier runs
        model.cache = FrozenCache(model.cache.namespace, None)
    items = model.encode(splits.train)
    t0 = time.perf_counter()
    model.prepare(items, cfg.train.eval_batch_size, progress=not args.no_progress)
    cache_s = time.perf_counter() - t0
    res = train(model, items, cfg.train, cfg.seed, progress=not args.no_progress)
    del model
    gc.collect()
    return cache_s, res.seconds


def step_forget(args) -> None:
    sem = shard_run(args, "semantic")
    shard_run(args, "user")
    cfg = load_config(args.config, args.set, cls=ApaConfig)
    _, universe, _ = source_data(cfg)
    user = args.user if args.user is not None else pick_user(Path(args.runs) / "semantic", universe)
    results = [forget_on_copy(args, n, user) for n in ("semantic", "user")]
    log("full retrain on the cached path (cold cache), timed in this process")
    cache_train, full_warm = full_retrain_seconds(args, cfg, cache=True)
    full_cold = full_warm + cache_train
    naive = None
    if not args.skip_naive:
        log("full retrain with no frozen-layer cache, timed in this process")
        naive = sum(full_retrain_seconds(args, cfg, cache=False))
    sets = " ".join("--set " + s for s in args.set)
    lines = [
        f"Model `{cfg.model.name}`, {sem['n_train']} training samples in K={cfg.shards.k} shards, "
        f"{cfg.train.epochs} epochs, LoRA on the top {cfg.lora.top_layers} layers. Forgetting user {user} "
        f"(the median user by training samples in the run). Machine: {machine()}.",
        "Retrain = training seconds of the affected shards (the frozen-layer cache is warm: built once by "
        "shard-train and shared); wall = the whole forget in-process (request, data, model load, purge, "
        "retrain, swap, lineage check, certificate; Python start-up not included).",
        f"Full retrain from scratch (one adapter on all {sem['n_train']} training samples, timed in the same "
        f"call right after the forgets): (a) training on the cached path {full_warm:.0f} s; (b) (a) plus "
        f"building the frozen cache for those prompts {full_cold:.0f} s; (c) no frozen-layer cache "
        f"{fmt(naive, 0) + ' s' if naive is not None else 'not measured (--skip-naive)'}.",
        f"Command: `python benchmarks/bench_apa.py forget {sets}{' --skip-naive' if args.skip_naive else ''}`",
        "",
        "| partition | samples removed from training | shards retrained | retrain s | forget wall s | "
        "(a) / retrain | (b) / wall | (c) / wall | lineage check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio_c = "-" if naive is None else f"{naive / r['wall_seconds']:.1f}x"
        lines.append(
            f"| {r['run']} | {r['removed_train']} | {r['affected']} | {r['retrain_seconds']:.0f} | "
            f"{r['wall_seconds']:.0f} | {full_warm / max(r['retrain_seconds'], 1e-9):.1f}x | "
            f"{full_cold / r['wall_seconds']:.1f}x | {ratio_c} | {'passed' if r['passed'] else 'FAILED'} |"
        )
    lines += [
        "",
        "Goal: >= 8x at K=4. A user whose samples sit in one shard retrains 1/K of the data; semantic "
        "shards can spread one user over several shards (the user partition never does).",
    ]
    mdsection.publish(args.out_bench, "bench_apa:forget", "\n".join(lines))


# --- inference --------------------------------------------------------------------------------------------
def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def step_inference(args) -> None:
    shard_run(args, "semantic")
    run = RunDir(Path(args.runs) / "semantic", create=False)
    cfg = run.load_config(cls=ApaConfig)
    tomb = Ledger(run / LEDGER_FILE, create=False).tombstones()
    splits: Splits = setup_shard_data(cfg, tomb)
    model, _ = build_model(cfg, splits.dataset)
    test = splits.test[: args.n]
    te, va = model.encode(test), model.encode(splits.valid)
    bs = cfg.train.eval_batch_size
    model.prepare(te + va, bs, progress=False)  # every method below reads the same cached bottom layers
    _, states = read_states(run)
    K = len(states)
    f_va, f_te = load_features(run, model, cfg, va, False), load_features(run, model, cfg, te, False)
    t0 = time.perf_counter()
    per_va = score_each(model, va, states, bs, progress=False)  # once per adapter set, not per test sample
    t_pool = time.perf_counter() - t0
    y_va = [s.label for s in splits.valid]
    omega = apa_weights(f_te, f_va, per_va, y_va, cfg.shards.neighbours, cfg.shards.tau, cfg.shards.error)
    R = args.repeats
    load_adapter_state(model.model, states[0])
    t_one = best_of(lambda: model.score(te, bs, progress=False), R)
    t = {
        "APA(ND) mixture pass": best_of(lambda: score_mixture(model, te, states, omega, "nd", bs, False), R),
        "APA(D) mixture pass": best_of(lambda: score_mixture(model, te, states, omega, "d", bs, False), R),
        "uniform mixture pass": best_of(
            lambda: score_mixture(model, te, states, uniform_weights(len(te), K), "nd", bs, False), R
        ),
        "neighbour weights": best_of(
            lambda: apa_weights(
                f_te, f_va, per_va, y_va, cfg.shards.neighbours, cfg.shards.tau, cfg.shards.error
            ),
            R,
        ),
    }

    def untuned():
        with model.adapter_disabled():
            model.last_hidden(te, "final", bs, progress=False)

    t["untuned pass (features=final)"] = best_of(untuned, R)
    if model.cut:
        t["cut-layer states (features=cut)"] = best_of(lambda: model.last_hidden(te, "cut", bs, False), R)
    t["SISA (K passes)"] = best_of(lambda: score_each(model, te, states, bs, progress=False), R)
    apa_nd = t["APA(ND) mixture pass"] + t["neighbour weights"]
    rows = (
        [("one adapter (reference)", t_one)]
        + list(t.items())
        + [
            (
                "APA(ND) total, features=final: untuned pass + weights + mixture",
                apa_nd + t["untuned pass (features=final)"],
            ),
        ]
    )
    if "cut-layer states (features=cut)" in t:
        rows.append(
            (
                "APA(ND) total, features=cut: cached states + weights + mixture",
                apa_nd + t["cut-layer states (features=cut)"],
            )
        )
    n = len(te)
    lines = [
        f"Model `{cfg.model.name}`, {n} test prompts, K={K} adapters, LoRA r={cfg.lora.r} on the top "
        f"{cfg.lora.top_layers} layers, the bottom {model.cut} layers read from the frozen cache for every "
        f"method; batch {bs}; best of {R}. Machine: {machine()}.",
        f"One-off per adapter set (after training or a forget): scoring the {len(va)}-sample validation pool "
        f"with every adapter, {t_pool:.0f} s.",
        f"Command: `python benchmarks/bench_apa.py inference --n {args.n}`",
        "",
        "| what | ms / sample | x one adapter |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {1000 * s / n:.1f} | {s / t_one:.2f}x |" for name, s in rows]
    lines += [
        "",
        "Goal: APA aggregation <= 1.15x one adapter. APA's neighbour search needs the untuned model's "
        "state of each test sample: with features=final that is one more pass over the top layers; with "
        "features=cut it is read from the frozen cache.",
    ]
    mdsection.publish(args.out_bench, "bench_apa:inference", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["auc", "forget", "inference", "all"])
    ap.add_argument("--config", default=str(ROOT / "configs" / "apa-ml100k.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench-apa"), help="folder of the run directories")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already exist")
    ap.add_argument("--user", type=int, default=None, help="forget this user (default: the median user)")
    ap.add_argument("--skip-naive", action="store_true", help="forget: skip the no-cache full retrain (c)")
    ap.add_argument("--n", type=int, default=200, help="inference: test prompts to time")
    ap.add_argument("--repeats", type=int, default=2, help="inference: best of N")
    ap.add_argument("--out-results", default=None, help="markdown file for the auc table (docs/results.md)")
    ap.add_argument(
        "--out-bench", default=None, help="markdown file for forget/inference (docs/benchmarks.md)"
    )
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    steps = ["auc", "forget", "inference"] if args.step == "all" else [args.step]
    for step in steps:
        t0 = time.perf_counter()
        {"auc": step_auc, "forget": step_forget, "inference": step_inference}[step](args)
        log(f"{step}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
