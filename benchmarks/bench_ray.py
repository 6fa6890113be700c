"""Shard-train past one process (issue 33, docs/scaling.md): the K shards of ``privrec shard-train`` one after
another on one core, one after another on two threads, and as Ray tasks on a local cluster of two single-threaded
workers, on the same samples, in one run; then the store fill of ``privrec serve --precompute-only`` (whole
command, every user) on one core, on two threads and with the Ray workers.

Each variant is its own ``privrec`` process (its own torch threads), writing its own run directory under
``--runs``, all with one frozen-layer cache (PRIVREC_CACHE_DIR under ``--runs``: the first variant fills it, so
its whole-command time includes that). What is compared is the shards phase (``shards_wall_seconds`` in
metrics.json: step 5, the shards' training, with the Ray start-up when there is one). The speed-ups are against
the one-core variant measured in the same run; the script also checks that the Ray run's adapters are bit for
bit the one-core run's (both train each shard with one thread and the shard's own seed).

    python benchmarks/bench_ray.py                                         # SmolLM2, 4,096 samples, K=4
    python benchmarks/bench_ray.py --config configs/apa-tiny.yaml --n-train 64 --runs /tmp/bench-ray   # smoke

The store fill runs each model directory's own config (model.threads 1 or 2; Ray: the one-thread model again,
checked to give the same store). Prints a markdown table and writes the
numbers to ``--record`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def privrec(args: list[str], env: dict) -> float:
    """Run one privrec command in its own process; its wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "privrec.cli", "--no-progress", *args], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"privrec {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


FILL_SOME = """
import sys
from privrec.config import ExecutorConfig
from privrec.serve.service import Service
model, n, candidates, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ex = ExecutorConfig(kind="ray", workers=workers) if workers else None
service = Service(model, candidates=candidates, precompute=True, executor=ex)
try:
    service.precompute_now(service.rec.users()[:n])
finally:
    service.close()
"""


def fill_some(model: str, n: int, candidates: int, workers: int | None, env: dict) -> float:
    """The store fill of the first ``n`` users (``Service.precompute_now``, what ``serve --precompute-only``
    runs for every user) in its own process; its wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", FILL_SOME, model, str(n), str(candidates), str(workers or 0)],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"store fill of {model} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def tensors(run: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(run.glob("adapters/shard-*/adapter_model.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "apa-ml100k.yaml"))
    ap.add_argument("--n-train", type=int, default=4096, help="training samples (K=4 shards of a quarter each)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", default="runs/bench-ray", help="run directories and the shared frozen-layer cache")
    ap.add_argument("--record", default=None, help="write the numbers here (JSON)")
    ap.add_argument("--store-candidates", type=int, default=20, help="serve --precompute-only --candidates")
    ap.add_argument("--no-store", action="store_true", help="skip the store fill")
    ap.add_argument("--store-users", type=int, default=None,
                    help="fill the store for the first N users only (default: every user, the whole command)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every shard-train run (e.g. data.n_test=200: a shorter evaluation)")
    a = ap.parse_args()

    runs = Path(a.runs)
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    env = dict(os.environ, PRIVREC_CACHE_DIR=str(runs / "cache"), TOKENIZERS_PARALLELISM="false")
    common = ["--set", f"data.n_train={a.n_train}", "--set", f"shards.k={a.k}",
              "--set", "shards.full_retrain=false", *[x for kv in a.set for x in ("--set", kv)]]

    variants = {
        "local, 1 thread": ["--set", "model.threads=1"],
        "local, 2 threads": ["--set", "model.threads=2"],
        f"ray, {a.workers} workers x 1 thread": ["--set", "model.threads=1", "--workers", str(a.workers)],
    }
    rows = {}
    for name, extra in variants.items():
        out = runs / name.split(",")[0].replace(" ", "") / name.split(",")[1].strip().replace(" ", "-")
        wall = privrec(["shard-train", a.config, "--out", str(out), *common, *extra], env)
        m = json.loads((out / "metrics.json").read_text())
        rows[name] = {"out": str(out), "wall_seconds": wall, "shards_wall_seconds": m["shards_wall_seconds"],
                      "shard_train_seconds": m["shard_train_seconds"], "auc": m["auc"]}
        print(f"{name}: shards {m['shards_wall_seconds']:.1f}s, command {wall:.1f}s", file=sys.stderr)
    base_name = "local, 1 thread"
    base = rows[base_name]["shards_wall_seconds"]
    ray_name = next(n for n in rows if n.startswith("ray"))
    identical = tensors(Path(rows[ray_name]["out"])) == tensors(Path(rows[base_name]["out"]))

    store, store_identical = {}, None
    if not a.no_store:
        def fill(model: str, workers: int | None = None) -> float:
            if a.store_users is None:  # the whole command: every user
                extra = ["--workers", str(workers)] if workers else []
                return privrec(["serve", model, "--precompute-only", "--candidates", str(a.store_candidates),
                                *extra], env)
            return fill_some(model, a.store_users, a.store_candidates, workers, env)

        for name in ("local, 1 thread", "local, 2 threads"):  # each model serves with its config's model.threads
            store[name] = fill(rows[name]["out"])
        base_model = Path(rows[base_name]["out"])
        filled = (base_model / "serve" / "recommendations.json").read_text()
        shutil.rmtree(base_model / "serve")
        store[ray_name] = fill(str(base_model), a.workers)
        store_identical = (base_model / "serve" / "recommendations.json").read_text() == filled

    from privrec.prepare import machine

    print(f"\nshard-train, {a.n_train} samples, K={a.k} ({Path(a.config).name}); machine: {machine()}\n")
    print("| variant | shards phase (s) | speed-up vs 1 thread | whole command (s) | test AUC |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['shards_wall_seconds']:.1f} | {base / r['shards_wall_seconds']:.2f}x | "
              f"{r['wall_seconds']:.1f} | {r['auc']:.4f} |")
    print(f"\nray adapters bit-identical to the one-thread run: {identical}")
    if store:
        who = "every user" if a.store_users is None else f"the first {a.store_users} users"
        print(f"\n| store fill ({who}, {a.store_candidates} candidates) | seconds | speed-up vs 1 thread |")
        print("|---|---|---|")
        for name, sec in store.items():
            print(f"| {name} | {sec:.1f} | {store[base_name] / sec:.2f}x |")
        print(f"\nray store identical to the one-thread store: {store_identical}")
    if a.record:
        Path(a.record).write_text(json.dumps({"config": a.config, "n_train": a.n_train, "k": a.k, "set": a.set,
                                              "store_users": a.store_users, "store_candidates": a.store_candidates,
                                              "workers": a.workers, "machine": machine(), "shard_train": rows,
                                              "ray_bit_identical": identical, "store_fill": store,
                                              "store_identical": store_identical}, indent=1))


if __name__ == "__main__":
    main()
