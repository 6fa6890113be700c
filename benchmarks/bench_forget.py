"""Forget one person in seconds (issue 17; METHODS §8, §9): what a single deletion request costs, exactly and
approximately, on one set of training samples.

Steps (``all`` runs them in order; each is resumable: every result goes into ``RUNS/bench_forget.json`` as it
is measured and is skipped when there, every training run is a model directory under ``RUNS`` reused when
finished, an interrupted shard-train continues with ``--resume``):

quality   shard-train runs on the same samples: ``semantic`` K=4 R=1 (today's APA, the reference),
          ``semantic-users`` K=4 R=1 and ``semantic-users`` K=8 R=4 (plus ``--extra`` runs); test AUC of every
          aggregation, the references (like-rate counter, logistic regression) on the same test samples, and
          the single adapter on all data where the record has it (``retrain``).
retrain   one adapter on all training samples, timed on this machine's CPU kind (cached path and cold) and
          scored on the test samples; ``exact`` compares each request with the full retrain of its own CPU
          kind (a second CPU queue can run this step beside ``quality``).
plan      every drawn request on every finished run, read off the shard lineage without training: the
          shards holding the user and the replay's training work as a share of a full retrain's.
exact     >= 20 single-user requests drawn as METHODS §8 says (a third *core*: the most training samples, a
          third *edge*: the fewest, the rest *random*, seeded), each forgotten on a fresh copy of every run with
          ``privrec forget``'s own code: time from request to certificate (wall) and the training seconds in
          it, against the full retrain on the same cached path and cold. Median, p95, max.
approx    a ``privrec train`` original on the same samples (``--original-set``: make it memorise for the
          attack), then single-user (core, edge, random) and 1%-of-users requests: retrain, E2URec, NegGrad,
          Bad-Teacher, influence and the original (doing nothing; ``--methods`` picks), each with ``privrec
          unlearn``'s own code: time
          against retrain, completeness (JSD / symmetric KL from retrain on the forgotten samples, as a
          fraction of the original's), test AUC, the membership attack.
tune      (not part of ``all``) the approximate methods' settings chosen on validation requests: single users
          drawn apart from every measured request's users (``--tune-like REQ``: of about REQ's size), each
          forgotten by retrain once and by every grid point of every method (``--grid``, ``--tune-methods``);
          the chosen point minimises the median completeness (JSD) over them, among the points that keep the
          retained members' AUC within ``--tune-max-auc-drop`` of the original's and are ``--tune-min-speedup``
          x faster than retrain. No test sample is read. ``approx --tuned`` then measures the requests with the
          chosen values (its own record part and run folders), and the record keeps every grid point's numbers
          and the choice.
plot      (reads the record only; not part of ``all``) the timed exact requests' speed-ups and every run's
          planned replay work by the user's training samples, as a PNG (``--plot``, docs/img/forget-requests.png).

    python benchmarks/bench_forget.py all --config configs/apa-ml100k.yaml --runs runs/bench_forget \\
        --unlearn-config configs/unlearn/ml100k.yaml --set data.n_train=4096 --requests 20

Prints markdown tables; ``--out-bench FILE`` also rewrites their marked sections of FILE (docs/benchmarks.md).
Frozen-layer cache entries a forget purges (the forgotten samples') are linked back after each request, so
every request and the full retrain see the same warm cache.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import itertools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import mdsection
import numpy as np
import yaml
from cachekeep import kept_cache

from privrec.commands.forget import run_forget
from privrec.commands.shard_train import run_shard_train
from privrec.commands.train import run_train
from privrec.commands.unlearn import load_unlearn_config, run_unlearn
from privrec.config import load_config
from privrec.metrics import binary_metrics
from privrec.model.adapters import load_adapter_state, read_meta
from privrec.model.recmodel import FrozenCache
from privrec.prepare import cpu_kind, machine
from privrec.rundir import RunDir, atomic_write_json
from privrec.train import train
from privrec.unlearning.exact.shards import ApaConfig, build_model, model_batch, setup_shard_data, shard_folders
from privrec.unlearning.exact.slices import cumulative

RUNS = {  # name -> overrides on top of the config (METHODS §9's runs of issue 17)
    "semantic-k4": ["shards.partition=semantic", "shards.k=4", "shards.slices=1"],
    "users-k4": ["shards.partition=semantic-users", "shards.k=4", "shards.slices=1"],
    "users-k8-r4": ["shards.partition=semantic-users", "shards.k=8", "shards.slices=4"],
}
APPROX = ("retrain", "e2urec", "neggrad", "bad-teacher", "influence", "original")
# the settings `tune` tries per method (unlearn.* keys; steps per forgotten sample = epochs / batch size);
# --grid METHOD:key=v1,v2 replaces one key's values
TUNE_GRIDS: dict[str, dict[str, list]] = {
    "e2urec": {"e2urec.train.epochs": [2, 6], "e2urec.train.lr": [1e-3, 3e-3], "e2urec.alpha": [1.0, 2.0, 4.0],
               "e2urec.beta": [0.4, 0.8]},
    "neggrad": {"neggrad.train.epochs": [2, 6, 20], "neggrad.train.lr": [3e-4, 1e-3, 3e-3]},
    "bad-teacher": {"bad_teacher.train.epochs": [2, 6, 20], "bad_teacher.train.lr": [3e-4, 1e-3, 3e-3]},
    "influence": {"influence.damping": [1e-3, 1e-2, 1e-1], "influence.scale": [1.0, 3.0]},
}
# what a tuning run keeps: no test measure (settings are never chosen on test)
TUNE_KEYS = ("unlearn_seconds", "retrain_seconds", "jsd_vs_retrain", "kl_sym_vs_retrain", "retain_auc",
             "mia_loss_accuracy", "n_forget", "budget")


def log(msg: str) -> None:
    print(f"[bench_forget {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ratio(a: float, b: float) -> str:
    """``a / b`` as ``12.3x``; ``no training`` when b is 0 (a replay that restored a checkpoint and trained nothing)."""
    return f"{a / b:.1f}x" if b > 1e-6 else "no training"


def fmt(v, nd: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


# --- the record (resumable) --------------------------------------------------------------------------------
class Record:
    """The resumable record, shared by CPU queues: every ``put`` re-reads the file under a lock, so two
    processes writing different results into it lose neither."""

    def __init__(self, path: Path):
        self.path = path
        self.data = self._read()

    def _read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, *keys):
        d = self.data = self._read()
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def put(self, value, *keys) -> None:
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            d = self.data = self._read()
            for k in keys[:-1]:
                d = d.setdefault(k, {})
            d[keys[-1]] = value
            atomic_write_json(self.path, self.data)


def runs_of(args, *, only: bool = True) -> dict[str, list[str]]:
    runs = {k: list(v) for k, v in RUNS.items()}
    if args.slice_epochs is not None:
        runs["users-k8-r4"].append(f"shards.slice_epochs={args.slice_epochs}")
    for spec in args.extra:  # NAME:key=v,key=v
        name, _, sets = spec.partition(":")
        runs[name] = [s for s in sets.split(",") if s]
    if only and args.only:
        unknown = set(args.only) - set(runs)
        if unknown:
            raise SystemExit(f"bench_forget: --only names no run: {sorted(unknown)} (runs: {sorted(runs)})")
        runs = {k: v for k, v in runs.items() if k in args.only}
    return runs


def shard_config(args, name: str) -> ApaConfig:
    return load_config(args.config, args.set + runs_of(args, only=False)[name], cls=ApaConfig)


# --- quality -----------------------------------------------------------------------------------------------
def shard_run(args, name: str) -> dict:
    out = Path(args.runs) / name
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    seed = Path(args.runs) / "semantic-k4" / "features.npz"  # same untuned model and prompts: same features
    if name != "semantic-k4" and seed.is_file() and not (out / "features.npz").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(seed, out / "features.npz")
    log(f"{name}: shard-train -> {out}")
    t0 = time.perf_counter()
    m = run_shard_train(shard_config(args, name), out, resume=True, progress=not args.no_progress)
    m["wall_seconds"] = time.perf_counter() - t0
    RunDir(out).write_metrics(m)
    gc.collect()
    return m


def step_quality(args, rec: Record) -> str:
    ms = {name: shard_run(args, name) for name in runs_of(args)}
    ref = ms.get("semantic-k4") or next(iter(ms.values()))
    aggs = ["apa-nd", "apa-d", "uniform", "sisa"]
    lines = [f"Model `{shard_config(args, 'semantic-k4').model.name}`, {ref['n_train']} train / {ref['n_valid']} "
             f"validation / {ref['n_test']} test samples (the same in every run). Machine: {machine()}.", "",
             "| run | partition | K | R | shard sizes | " + " | ".join(aggs) + " | mean single shard |",
             "|---|---|---|---|---|" + "---|" * (len(aggs) + 1)]
    for name, m in ms.items():
        auc = m["auc_by_aggregation"]
        sizes = m["shards"]
        lines.append(f"| {name} | {m['partition']} | {m['k']} | {m.get('slices', 1)} | {min(sizes)}-{max(sizes)} | "
                     + " | ".join(fmt(auc.get(a)) for a in aggs) + f" | {fmt(m['single_shard_mean_auc'])} |")
    for kind, full in sorted((rec.get("full_retrain") or {}).items()):
        if full.get("test_auc") is not None:  # the exact step's full retrain (or `retrain`), on this CPU kind
            lines.append(f"| one adapter on all data ({kind}) | - | 1 | 1 | {full['n_train']} | "
                         f"{fmt(full['test_auc'])} | " + " | ".join("-" for _ in aggs[1:]) + " | - |")
    for rname, r in (ref.get("references") or {}).items():
        lines.append(f"| reference: {rname} | - | - | - | - | {fmt(r.get('auc'))} | "
                     + " | ".join("-" for _ in aggs[1:]) + " | - |")
    for n, m in ms.items():
        rec.put(m["auc_by_aggregation"], "quality", n)
    return "\n".join(lines)


# --- exact: single-user requests -----------------------------------------------------------------------------
def draw_users(args) -> dict[int, str]:
    """user -> draw (core / edge / random), METHODS §8, over the training samples all runs share."""
    cfg = shard_config(args, "semantic-k4")
    train_s = setup_shard_data(cfg, set()).train
    counts: dict[int, int] = {}
    for s in train_s:
        counts[s.user_id] = counts.get(s.user_id, 0) + 1
    ranked = sorted(counts, key=lambda u: (-counts[u], u))
    n = args.requests
    n_core = n_edge = math.ceil(n / 3)
    out = {u: "core" for u in ranked[:n_core]}
    out.update({u: "edge" for u in ranked[::-1][:n_edge] if u not in out})
    rest = [u for u in ranked if u not in out]
    rng = np.random.default_rng([cfg.seed, 8])
    out.update({int(u): "random" for u in rng.choice(rest, size=min(len(rest), n - len(out)), replace=False)})
    return out


def full_retrain(args, rec: Record) -> dict:
    """One adapter on all training samples, timed on this machine's CPU kind (a request is compared with the full
    retrain of the machine it ran on): training on the cached path (the frozen-layer cache built first, timed
    apart) = warm; plus building that cache = cold. Its test AUC is the quality table's "one adapter on all
    data" row (the reference every aggregation is held against)."""
    kind = cpu_kind()
    done = rec.get("full_retrain", kind)
    if done:
        return done
    cfg = shard_config(args, "semantic-k4")
    splits = setup_shard_data(cfg, set())
    model, init = build_model(cfg, splits.dataset)
    load_adapter_state(model.model, init)
    if model.cache is not None:
        model.cache = FrozenCache(model.cache.namespace, None)  # cold: in memory, nothing from disk
    items = model.encode(splits.train)
    log(f"full retrain on {kind}: {len(items)} samples")
    t0 = time.perf_counter()
    model.prepare(items, cfg.train.eval_batch_size, progress=not args.no_progress)
    cache_s = time.perf_counter() - t0
    res = train(model, items, cfg.train, cfg.seed, progress=not args.no_progress)
    probs = model.score(model.encode(splits.test), model_batch(cfg), not args.no_progress)
    test = binary_metrics([x.label for x in splits.test], probs, [x.user_id for x in splits.test])
    out = {"warm_seconds": res.seconds, "cold_seconds": res.seconds + cache_s, "n_train": len(items),
           "test_auc": test["auc"], "machine": machine()}
    del model
    gc.collect()
    rec.put(out, "full_retrain", kind)
    return out


def forget_once(args, name: str, user: int) -> dict:
    """Forget ``user`` on a fresh copy of run ``name``; the cache entries it purges are linked back after."""
    src, dst = Path(args.runs) / name, Path(args.runs) / "copies" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "staging"))
    with kept_cache(Path(args.runs) / "copies"):
        t0 = time.perf_counter()
        cert = run_forget(dst, users=[user], progress=False)
        wall = time.perf_counter() - t0
    shutil.rmtree(dst, ignore_errors=True)
    body = cert["body"]
    return {"wall_seconds": wall, "retrain_seconds": cert["record"]["retrain_seconds"],
            "affected": body["affected_shards"],
            "removed_train": sum(x["split"] == "train" for x in body["removed"]["samples"]),
            "slices": {str(a["shard"]): a["slices"] for a in body["adapters"] if "slices" in a},
            "passed": body["lineage_check"]["passed"], "cpu": cpu_kind()}


def step_exact(args, rec: Record) -> str:
    drawn = draw_users(args)
    if args.report_only:  # what the record holds so far; nothing is run
        if not rec.get("full_retrain"):
            raise SystemExit("bench_forget: --report-only: the record has no full retrain yet")
        done = set.intersection(*[set(rec.get("exact", n) or {}) for n in runs_of(args)])
        users = {u: how for u, how in drawn.items() if str(u) in done}
    else:
        for name in runs_of(args):
            shard_run(args, name)
        full_retrain(args, rec)
        users = drawn
        for name in runs_of(args):
            for u, how in users.items():
                if rec.get("exact", name, str(u)) is None:
                    log(f"{name}: forget user {u} ({how})")
                    rec.put(dict(forget_once(args, name, u), draw=how), "exact", name, str(u))
    fulls = rec.get("full_retrain")
    rows_of = {name: [rec.get("exact", name, str(u)) for u in users] for name in runs_of(args)}
    kinds = sorted({r["cpu"] for rows in rows_of.values() for r in rows})
    missing = [k for k in kinds if k not in fulls]
    if missing:
        raise SystemExit(f"bench_forget: requests ran on {missing} but the record has no full retrain there "
                         "(run the `retrain` step on that machine)")
    partial = (f"**Partial: {len(users)} of the {len(drawn)} drawn requests measured so far** (the same command "
               "without --report-only measures the rest into the same record). ") if len(users) < len(drawn) else ""
    per_kind = "; ".join(f"{k}: {fulls[k]['warm_seconds']:.1f} s cached, {fulls[k]['cold_seconds']:.1f} s cold "
                         f"({sum(r['cpu'] == k for rows in rows_of.values() for r in rows)} requests there)"
                         for k in kinds)
    lines = [partial + f"{len(users)} single-user requests ({sum(v == 'core' for v in users.values())} core, "
             f"{sum(v == 'edge' for v in users.values())} edge, {sum(v == 'random' for v in users.values())} "
             f"random; METHODS §8) on a fresh copy of each run. Full retrain (one adapter on all "
             f"{fulls[kinds[0]]['n_train']} training samples, timed by this benchmark on each CPU kind a request "
             f"ran on; every speed-up is a request's against the full retrain on its own machine): {per_kind}. "
             "Wall = request to certificate in-process (data, model load, purge, retrain or replay, swap, lineage "
             f"check, certificate). This report: {machine()}.", "",
             "| run | shards retrained (mean) | forget wall s: median / p95 / max | retrain s: median / p95 / max "
             "| full retrain (cached) / wall: median / p95 | full retrain (cold) / wall: median | "
             "full retrain (cached) / retrain s: median / p95 | all passed |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in rows_of.items():
        wall = np.array([r["wall_seconds"] for r in rows])
        tr = np.array([r["retrain_seconds"] for r in rows])
        warm = np.array([fulls[r["cpu"]]["warm_seconds"] for r in rows])
        cold = np.array([fulls[r["cpu"]]["cold_seconds"] for r in rows])
        n_aff = np.mean([len(r["affected"]) for r in rows])

        def q(x, p):
            return float(np.percentile(x, p))

        def up(cost, full, p):  # the speed-up at the p-th percentile of a request's cost relative to its retrain
            return ratio(1.0, q(cost / full, p))

        lines.append(
            f"| {name} | {n_aff:.2f} | {q(wall, 50):.1f} / {q(wall, 95):.1f} / {wall.max():.1f} | "
            f"{q(tr, 50):.1f} / {q(tr, 95):.1f} / {tr.max():.1f} | {up(wall, warm, 50)} / {up(wall, warm, 95)} | "
            f"{up(wall, cold, 50)} | {up(tr, warm, 50)} / {up(tr, warm, 95)} | {all(r['passed'] for r in rows)} |")
    return "\n".join(lines)


def plan_of(args, name: str, users: dict[int, str], owner: dict[str, int]) -> list[dict]:
    """What forgetting each drawn user would retrain in run ``name``, read off its shard adapters' lineage (no
    training): the shards holding the user and the training work a replay does, in sample passes (a shard of n
    samples for E epochs: n x E; sliced, stage s of the first affected slice onwards: |slices 1..s| x slice
    epochs), against the full retrain's n_train x epochs."""
    cfg = shard_config(args, name)
    run = RunDir(Path(args.runs) / name, create=False)
    metas = {k: read_meta(f) for k, f in shard_folders(run).items()}
    n_train = sum(len(m["sample_ids"]) for m in metas.values())
    passes = cfg.shards.slice_epochs if cfg.shards.slices > 1 and cfg.shards.slice_epochs else cfg.train.epochs
    out = []
    for u, how in users.items():
        work, shards = 0.0, []
        for k, m in metas.items():
            held = {i for i in m["sample_ids"] if owner.get(i) == u}
            if not held:
                continue
            shards.append(k)
            sl = m.get("slices")
            if not sl:
                work += len(m["sample_ids"]) * cfg.train.epochs
                continue
            s0 = next(j for j, part in enumerate(sl) if held & set(part))
            work += sum(len(cumulative(sl, s + 1)) for s in range(s0, len(sl))) * passes
        out.append({"user": u, "draw": how, "shards": shards, "work": work / (n_train * cfg.train.epochs)})
    return out


def step_plan(args, rec: Record) -> str:
    """Every drawn request on every finished run, planned from the lineage (a work count, not a timing)."""
    drawn = draw_users(args)
    owner = {x.sample_id: x.user_id for x in setup_shard_data(shard_config(args, "semantic-k4"), set()).train}
    lines = [f"{len(drawn)} drawn single-user requests (METHODS §8), planned from each run's shard lineage: the "
             "shards that hold the user, and a replay's training work as a share of a full retrain's (sample "
             "passes; 1/share bounds the speed-up of the training part). Not a timing.", "",
             "| run | shards holding the user: mean / max | work share: median / p95 / max | "
             "1 / work share: median / p95 |", "|---|---|---|---|"]
    for name in runs_of(args):
        if not (Path(args.runs) / name / "metrics.json").is_file():
            continue
        rows = plan_of(args, name, drawn, owner)
        rec.put({str(r["user"]): r for r in rows}, "plan", name)
        n = np.array([len(r["shards"]) for r in rows])
        w = np.array([r["work"] for r in rows])
        lines.append(f"| {name} | {n.mean():.2f} / {n.max()} | {np.median(w):.3f} / {np.percentile(w, 95):.3f} / "
                     f"{w.max():.3f} | {ratio(1.0, float(np.median(w)))} / {ratio(1.0, float(np.percentile(w, 95)))} |")
    return "\n".join(lines)


def step_plot(args, rec: Record) -> str:
    """The record's requests as a picture (reads the record, runs nothing): left, each timed exact request's
    speed-up against the full retrain of its own CPU kind, by the user's training samples; right, every run's
    planned replay work (1 / work share, read off the lineage: not a timing) for the same users."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = draw_users(args)
    counts: dict[int, int] = {}
    for x in setup_shard_data(shard_config(args, "semantic-k4"), set()).train:
        counts[x.user_id] = counts.get(x.user_id, 0) + 1
    fulls, exact, plan = rec.get("full_retrain") or {}, rec.get("exact") or {}, rec.get("plan") or {}
    marks = {"core": "o", "edge": "s", "random": "^"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for rows in exact.values():
        for u, r in rows.items():
            if int(u) in drawn and r["cpu"] in fulls:
                for cost, full, c in ((r["wall_seconds"], fulls[r["cpu"]]["warm_seconds"], "C0"),
                                      (r["wall_seconds"], fulls[r["cpu"]]["cold_seconds"], "C1")):
                    left.scatter(counts[int(u)], full / cost, marker=marks[r["draw"]], color=c, alpha=0.8)
    for i, (name, rows) in enumerate(plan.items()):
        for r in rows.values():
            right.scatter(counts[r["user"]], 1.0 / r["work"], marker=marks[r["draw"]], color=f"C{i + 2}",
                          alpha=0.8, label=name)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(10, color="grey", ls="--", lw=1)
        ax.axhline(5, color="grey", ls=":", lw=1)
        ax.set_xlabel("the user's training samples")
        ax.grid(alpha=0.3, which="both")
    left.set_ylabel("full retrain / forget (x)")
    left.set_title("exact requests, timed (" + ", ".join(exact) + ")", fontsize=10)
    right.set_title("replay work planned from the lineage (not a timing)", fontsize=10)
    from matplotlib.lines import Line2D

    draws = [Line2D([], [], ls="", marker=m, color="k", label=d) for d, m in marks.items()]
    left.legend(handles=[*draws, Line2D([], [], ls="", marker="o", color="C0", label="vs cached retrain"),
                         Line2D([], [], ls="", marker="o", color="C1", label="vs cold retrain"),
                         Line2D([], [], color="grey", ls="--", label="10x (median goal)"),
                         Line2D([], [], color="grey", ls=":", label="5x (p95 goal)")], fontsize=8)
    h, lab = right.get_legend_handles_labels()
    uniq = dict(zip(lab, h, strict=True))
    right.legend(uniq.values(), uniq.keys(), fontsize=8)
    fig.tight_layout()
    out = Path(args.plot)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return f"![exact forget requests: speed-up against a full retrain, by the user's samples]({out.name})"


# --- approximate -------------------------------------------------------------------------------------------
def original_run(args) -> Path:
    """A ``privrec train`` model on the same samples (the config without its shards section)."""
    out = Path(args.runs) / "original"
    if (out / "metrics.json").is_file():
        return out
    raw = yaml.safe_load(Path(args.config).read_text())
    raw.pop("shards", None)
    path = Path(args.runs) / "original.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(path, args.set + args.original_set)
    log(f"original: train -> {out}")
    run_train(cfg, out, resume=True, progress=not args.no_progress)
    gc.collect()
    return out


def training_counts(original: Path) -> tuple[object, dict[int, int]]:
    """(the original run's config, each training user's number of training samples)."""
    from collections import Counter

    from privrec.prepare import setup_data

    cfg = RunDir(original, create=False).load_config()
    return cfg, dict(Counter(s.user_id for s in setup_data(cfg, set()).train))


def approx_requests(args, original: Path) -> dict[str, list[int]]:
    """Single users (core, edge, random) and 1% of the training users (random, rounded up: the TALLRec pool of
    4,096 samples holds 138 users, so 1% is 2 of them), as METHODS §8 draws them."""
    cfg, counts = training_counts(original)
    return measured_requests(cfg.seed, counts)


def measured_requests(seed: int, counts: dict[int, int]) -> dict[str, list[int]]:
    """:func:`approx_requests` from the users' training-sample ``counts``."""
    ranked = sorted(counts, key=lambda u: (-counts[u], u))
    rng = np.random.default_rng([seed, 9])
    n1 = math.ceil(0.01 * len(ranked))
    return {"user-core": [ranked[0]], "user-edge": [ranked[-1]], "user-random": [int(rng.choice(ranked))],
            "users-1pct": sorted(int(u) for u in rng.choice(ranked, size=n1, replace=False))}


def unlearn_once(args, original: Path, users: list[int], method: str, out: Path, ref: Path | None,
                 overrides: list[str] = ()) -> dict:
    """``privrec unlearn``'s own code on one request: ``users`` forgotten by ``method`` into ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_unlearn_config(original, args.unlearn_config,
                              [f"unlearn.forget_users={users}", "unlearn.forget_fraction=null", *args.unlearn_set,
                               *overrides], method=method)
    m = run_unlearn(cfg, original, out, retrained=None if method == "retrain" else ref, progress=not args.no_progress)
    gc.collect()
    return m


def tuned_overrides(rec: Record, method: str) -> list[str]:
    """The ``unlearn.*`` overrides ``tune`` chose for ``method`` ([] when it chose none)."""
    chosen = rec.get("tuned", method)
    return [f"unlearn.{k}={v}" for k, v in (chosen or {}).get("values", {}).items()]


def step_approx(args, rec: Record) -> str:
    original = original_run(args)
    requests = approx_requests(args, original)
    part = "approx-tuned" if args.tuned else "approx"  # the tuned rows keep their own part of the record
    for req, users in requests.items():
        if args.report_only or (args.only and req not in args.only):  # another queue's request
            continue
        ref = Path(args.runs) / "unlearn" / req / "retrain"
        for method in (m for m in APPROX if m in args.methods):
            if rec.get(part, req, method) is not None:
                continue
            untuned = method in ("retrain", "original")  # nothing to tune: the untuned rows serve
            if args.tuned and untuned and rec.get("approx", req, method) is not None:
                rec.put(rec.get("approx", req, method), part, req, method)
                continue
            settings = tuned_overrides(rec, method) if args.tuned else []
            log(f"approx {req}: {method} ({len(users)} users) {' '.join(settings)}")
            folder = "unlearn-tuned" if args.tuned and not untuned else "unlearn"
            m = unlearn_once(args, original, users, method, Path(args.runs) / folder / req / method, ref, settings)
            rec.put({**{k: m.get(k) for k in ("unlearn_seconds", "retrain_seconds", "test_auc", "forget_auc",
                                              "jsd_vs_retrain", "kl_sym_vs_retrain", "mia_loss_accuracy",
                                              "mia_loss_fit_accuracy", "mia_logistic_accuracy", "n_forget",
                                              "n_retain_pool", "budget")}, "settings": settings}, part, req, method)
    om = json.loads((original / "metrics.json").read_text())
    chosen = "; ".join(f"{m}: {' '.join(tuned_overrides(rec, m)) or 'config'}" for m in APPROX
                       if m not in ("retrain", "original"))
    lines = [f"Original: `privrec train` on the same samples (overrides: {' '.join(args.original_set) or 'none'}), "
             f"test AUC {fmt(om.get('auc'))}. Completeness = divergence from retrain on the forgotten samples / "
             "the original's (0 = retrain, 1 = nothing forgotten; METHODS §8). MIA = loss-threshold attack's "
             "balanced accuracy on the forgotten vs never-seen samples (fit accuracy: on its own fit sets)."
             + (f" Settings chosen on validation requests (`tune`): {chosen}." if args.tuned else ""), "",
             "| request | users / samples | method | seconds | retrain / seconds | test AUC | forget AUC | JSD | "
             "completeness (JSD) | completeness (sym. KL) | MIA | MIA fit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for req, users in requests.items():
        o = rec.get(part, req, "original") or rec.get("approx", req, "original")
        for method in APPROX:
            m = rec.get(part, req, method)
            if m is None or o is None:  # not measured yet (another queue's, or a later session's)
                continue
            sec, rs = m["unlearn_seconds"], m["retrain_seconds"]
            comp = [m[k] / o[k] if m[k] is not None and o[k] else None for k in ("jsd_vs_retrain",
                                                                                 "kl_sym_vs_retrain")]
            lines.append(f"| {req} | {len(users)} / {m['n_forget']} | {method} | {fmt(sec, 1)} | "
                         f"{fmt(rs / sec if rs and sec else None, 1)} | {fmt(m['test_auc'])} | {fmt(m['forget_auc'])} "
                         f"| {fmt(m['jsd_vs_retrain'], 5)} | {fmt(comp[0], 2)} | {fmt(comp[1], 2)} | "
                         f"{fmt(m['mia_loss_accuracy'], 3)} | {fmt(m['mia_loss_fit_accuracy'], 3)} |")
    return "\n".join(lines)


# --- tune: settings chosen on validation requests ----------------------------------------------------------
def tune_requests(args, original: Path) -> dict[str, list[int]]:
    """``--tune-requests`` single users drawn (seeded) from the training users that no measured request holds;
    with ``--tune-like REQ``, from those whose training-sample count is nearest the measured request REQ's."""
    cfg, counts = training_counts(original)
    requests = measured_requests(cfg.seed, counts)
    size = None
    if args.tune_like is not None:
        if args.tune_like not in requests:
            raise SystemExit(f"bench_forget: --tune-like {args.tune_like!r}: expected one of {sorted(requests)}")
        size = sum(counts[u] for u in requests[args.tune_like])
    measured = {u for users in requests.values() for u in users}
    drawn = draw_tune_users(counts, measured, args.tune_requests, size, np.random.default_rng([cfg.seed, 12]))
    return {f"valid-u{u}": [u] for u in drawn}


def draw_tune_users(counts: dict[int, int], measured: set[int], n: int, size: int | None,
                    rng: np.random.Generator) -> list[int]:
    """``n`` users of ``counts`` (user -> training samples) outside ``measured``, drawn with ``rng``; with
    ``size``, among the nearest ones: those within the smallest distance |count - size| that holds ``n`` of
    them, so a validation request forgets about as many samples as the measured one it stands in for."""
    pool = sorted(set(counts) - measured)
    if size is not None and len(pool) > n:
        cut = sorted(abs(counts[u] - size) for u in pool)[n - 1]
        pool = [u for u in pool if abs(counts[u] - size) <= cut]
    return sorted(int(u) for u in rng.choice(pool, size=min(n, len(pool)), replace=False))


def tune_grids(args) -> dict[str, dict[str, list]]:
    """TUNE_GRIDS with ``--grid METHOD:key=v1,v2`` applied, for ``--tune-methods``."""
    grids = {m: dict(g) for m, g in TUNE_GRIDS.items()}
    for spec in args.grid:
        method, _, kv = spec.partition(":")
        key, _, values = kv.partition("=")
        if method not in grids or not key or not values:
            raise SystemExit(f"bench_forget: --grid {spec!r}: expected METHOD:key=v1,v2 with METHOD one of "
                             f"{sorted(grids)}")
        grids[method][key] = [number_or_yaml(v) for v in values.split(",")]
    return {m: grids[m] for m in args.tune_methods}


def number_or_yaml(text: str):
    """A grid value: a number where it reads as one (YAML 1.1 reads ``3e-3`` as a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def grid_points(grid: dict[str, list]) -> list[dict]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def point_name(point: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items()) or "config"


def judge(rows: list[dict], originals: list[dict]) -> dict:
    """A grid point over the validation requests: median completeness (JSD and symmetric KL, each request's
    divergence from its retrain over the original's), the largest drop of the retained members' AUC below the
    original's, the smallest speed-up over retrain, median steps per forgotten sample."""
    def share(key):
        vals = [r[key] / o[key] for r, o in zip(rows, originals) if r[key] is not None and o[key]]
        return float(np.median(vals)) if vals else None

    steps = [r["details_steps"] / r["n_forget"] for r in rows if r.get("details_steps") is not None and r["n_forget"]]
    return {"completeness_jsd": share("jsd_vs_retrain"), "completeness_kl": share("kl_sym_vs_retrain"),
            "retain_auc_drop": max(o["retain_auc"] - r["retain_auc"] for r, o in zip(rows, originals)),
            "min_speedup": min(r["retrain_seconds"] / r["unlearn_seconds"] for r in rows),
            "steps_per_forgotten_sample": float(np.median(steps)) if steps else None}


def step_tune(args, rec: Record) -> str:
    original = original_run(args)
    requests = tune_requests(args, original)
    grids = tune_grids(args)
    base = Path(args.runs) / "unlearn-valid"
    for req, users in requests.items():  # retrain (the reference) and the original (doing nothing), once each
        for method in ("retrain", "original"):
            if rec.get("tune", req, method) is None:
                log(f"tune {req}: {method}")
                m = unlearn_once(args, original, users, method, base / req / method, base / req / "retrain")
                rec.put({k: m.get(k) for k in TUNE_KEYS}, "tune", req, method)
    for method, grid in grids.items():
        for point in grid_points(grid):
            name = point_name(point)
            for req, users in requests.items():
                if rec.get("tune", req, method, name) is not None:
                    continue
                log(f"tune {req}: {method} {name}")
                m = unlearn_once(args, original, users, method, base / req / f"grid-{method}", base / req / "retrain",
                                 [f"unlearn.{k}={v}" for k, v in point.items()])
                steps = m["budget"]["steps"].get(method)
                steps = steps["student"] if method == "e2urec" else steps
                rec.put({**{k: m.get(k) for k in TUNE_KEYS},
                         "details_steps": steps if isinstance(steps, int) else None}, "tune", req, method, name)
    originals = [rec.get("tune", req, "original") for req in requests]
    lines = [f"Validation requests (single users apart from the measured ones): {', '.join(requests)}; "
             f"guards: retained members' AUC at most {args.tune_max_auc_drop} below the original's, at least "
             f"{args.tune_min_speedup}x faster than retrain. Completeness: median over the requests. No test sample "
             "is read.", "",
             "| method | setting | steps / forgotten sample | completeness (JSD) | completeness (sym. KL) | "
             "retain AUC drop | min speed-up | chosen |", "|---|---|---|---|---|---|---|---|"]
    for method, grid in grids.items():
        judged = {}
        for point in grid_points(grid):
            name = point_name(point)
            rows = [rec.get("tune", req, method, name) for req in requests]
            judged[name] = (point, judge(rows, originals))
        ok = {n: pj for n, pj in judged.items() if pj[1]["completeness_jsd"] is not None
              and pj[1]["retain_auc_drop"] <= args.tune_max_auc_drop and pj[1]["min_speedup"] >= args.tune_min_speedup}
        pool = ok or {n: pj for n, pj in judged.items() if pj[1]["completeness_jsd"] is not None}
        best = min(pool, key=lambda n: pool[n][1]["completeness_jsd"]) if pool else None
        if best is not None:
            rec.put({"values": pool[best][0], **pool[best][1], "met_guards": bool(ok),
                     "requests": list(requests)}, "tuned", method)
        for name, (_, j) in judged.items():
            lines.append(f"| {method} | {name} | {fmt(j['steps_per_forgotten_sample'], 2)} | "
                         f"{fmt(j['completeness_jsd'], 2)} | {fmt(j['completeness_kl'], 2)} | "
                         f"{fmt(j['retain_auc_drop'], 4)} | {fmt(j['min_speedup'], 1)} | "
                         f"{'**yes**' if name == best else ''} |")
        if best is not None and not ok:
            lines.append(f"| {method} | (no point met the guards: the least incomplete one is chosen) | | | | | | |")
    return "\n".join(lines)


def step_retrain(args, rec: Record) -> str:
    """Only the full retrain on this machine (a second CPU queue can run it beside ``quality``)."""
    full = full_retrain(args, rec)
    return (f"Full retrain on {cpu_kind()}: {full['warm_seconds']:.1f} s cached, {full['cold_seconds']:.1f} s cold, "
            f"test AUC {fmt(full['test_auc'])}. Machine: {full['machine']}.")


STEPS = {"quality": step_quality, "retrain": step_retrain, "plan": step_plan, "exact": step_exact,
         "approx": step_approx}
REPORTS = {"plot": step_plot, "tune": step_tune}  # not part of `all` (plot reads the record only)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=[*STEPS, *REPORTS, "all"])
    p.add_argument("--config", default="configs/apa-ml100k.yaml", help="the shards config all runs share")
    p.add_argument("--runs", default="runs/bench_forget", help="where the runs and bench_forget.json go")
    p.add_argument("--set", action="append", default=[], help="override for every run, e.g. data.n_train=4096")
    p.add_argument("--requests", type=int, default=20, help="single-user requests per run (exact)")
    p.add_argument("--slice-epochs", type=float, default=None, help="shards.slice_epochs of the sliced run")
    p.add_argument("--extra", action="append", default=[], help="another shard run, NAME:key=v,key=v")
    p.add_argument("--only", action="append", default=[], help="run only this run (repeatable; quality and exact "
                   "steps) or this request (approx: user-core, user-edge, user-random, users-1pct): what one CPU "
                   "queue can finish, the rest measured later into the same record")
    p.add_argument("--original-set", action="append", default=[], help="override for the approx original only")
    p.add_argument("--unlearn-config", default="configs/unlearn/ml100k.yaml")
    p.add_argument("--unlearn-set", action="append", default=[], help="override of the unlearn section")
    p.add_argument("--out-bench", default=None, help="also rewrite the tables' sections of this markdown file")
    p.add_argument("--report-only", action="store_true", help="exact, approx: print the table of the requests the "
                   "record holds so far, running nothing (approx: the original must exist)")
    p.add_argument("--section-tag", default=None, help="--out-bench: name the sections bench_forget:STEP:TAG "
                   "(another record's tables beside these, e.g. the memorising original's approx step)")
    p.add_argument("--plot", default="docs/img/forget-requests.png", help="plot: where the picture goes")
    p.add_argument("--methods", nargs="+", default=list(APPROX), choices=APPROX,
                   help="approx: the methods measured (default: all)")
    p.add_argument("--tuned", action="store_true", help="approx: with the settings `tune` chose (record part "
                   "approx-tuned, runs under RUNS/unlearn-tuned)")
    p.add_argument("--tune-requests", type=int, default=4, help="tune: validation requests (single users)")
    p.add_argument("--tune-like", default=None, help="tune: draw the validation users among those whose training "
                   "samples are nearest in number to this measured request's (e.g. user-random), so the settings "
                   "are chosen on requests of the size they are measured on")
    p.add_argument("--tune-methods", nargs="+", default=[m for m in TUNE_GRIDS], choices=list(TUNE_GRIDS),
                   help="tune: the methods to tune")
    p.add_argument("--grid", action="append", default=[], help="tune: METHOD:key=v1,v2 replaces one key's values "
                   "in the method's grid (repeatable), e.g. neggrad:neggrad.train.epochs=2,6")
    p.add_argument("--tune-max-auc-drop", type=float, default=0.01, help="tune: a point may lower the retained "
                   "members' AUC by at most this below the original's")
    p.add_argument("--tune-min-speedup", type=float, default=10.0, help="tune: a point must be this many times "
                   "faster than retrain on every validation request")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    rec = Record(Path(args.runs) / "bench_forget.json")
    cmd = "python benchmarks/bench_forget.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for step in (list(STEPS) if args.step == "all" else [args.step]):
        table = {**STEPS, **REPORTS}[step](args, rec)
        name = f"bench_forget:{step}" + (f":{args.section_tag}" if args.section_tag else "")
        mdsection.publish(args.out_bench, name, f"Command: `{cmd}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
