"""A bounded load test of `privrec serve` on loopback (METHODS §11): a fixed number of concurrent clients for a
fixed time, stopping by itself; then the same while a deletion request is being applied, and for the same time
right after it was applied.

The service runs on a copy of MODEL (the deletion changes it) in its own process; each client loops over
seeded random users: GET /v1/users/{u}/recommendations?k=10, and every fourth request POST /v1/score with 10
(user, item) pairs. Per endpoint: requests, requests/s, p50 / p99 latency, errors (any status but 200). Phase 2
posts one deletion (a user with training samples) and loads the service until the request is done (at least
``--seconds``, at most ``--max-deletion-seconds``).

    python benchmarks/bench_serve.py runs/mine --concurrency 4 --seconds 60       # SmolLM2 model directory
    python benchmarks/bench_serve.py runs/tiny --concurrency 2 --seconds 5         # smoke test (tiny model)
    privrec serve runs/mine --precompute-only --candidates 20                      # the store, then:
    python benchmarks/bench_serve.py runs/mine --precompute --candidates 20 --concurrency 4 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from cachekeep import kept_cache

from privrec.commands.serve import run_token_create
from privrec.model.adapters import read_meta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "privrec.cli", "--no-progress", "serve", str(model), "--port", str(port),
           "--candidates", str(args.candidates)] + (["--precompute"] if args.precompute else []) + (
               ["--swap-at-once"] if args.swap_at_once else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(model / "serve.err", "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("privrec serve exited: " + (model / "serve.err").read_text()[-2000:])
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("privrec serve did not come up")


def load(url: str, token: str, users: list[int], items: list[int], concurrency: int, until, seed: int) -> dict:
    """Run ``concurrency`` clients until ``until()`` is true; {endpoint: [(seconds, status)]}."""
    results: dict[str, list] = {"recommendations": [], "score": []}
    lock = threading.Lock()

    def client(c: int) -> None:
        rng = np.random.default_rng([seed, c])
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
            n = 0
            while not until():
                u = int(rng.choice(users))
                t = time.perf_counter()
                if n % 4 == 3:
                    pairs = [{"user": u, "item": int(i)} for i in rng.choice(items, 10, replace=False)]
                    name, r = "score", http.post("/v1/score", json={"pairs": pairs})
                else:
                    name, r = "recommendations", http.get(f"/v1/users/{u}/recommendations", params={"k": 10})
                took = time.perf_counter() - t
                src = r.json().get("source") if name == "recommendations" and r.status_code == 200 else None
                with lock:
                    results[name].append((took, r.status_code, src))
                n += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summary(results: dict, seconds: float) -> dict:
    out = {}
    for name, rows in results.items():
        lat = np.array([s for s, _, _ in rows]) * 1000 if rows else np.zeros(1)
        out[name] = {"requests": len(rows), "per_second": len(rows) / seconds,
                     "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                     "errors": sum(1 for _, code, _ in rows if code != 200)}
        if name == "recommendations":  # how many were answered from the precomputed store
            out[name]["from_store"] = sum(1 for _, _, src in rows if src == "store")
    return out


def show(title: str, s: dict, seconds: float) -> None:
    print(f"{title} ({seconds:.0f}s)")
    print(f"  {'endpoint':<16} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'from store':>10}")
    for name, m in s.items():
        print(f"  {name:<16} {m['requests']:>8} {m['per_second']:>7.2f} {m['p50_ms']:>8.0f} {m['p99_ms']:>8.0f} "
              f"{m['errors']:>6} {m.get('from_store', '-'):>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-deletion-seconds", type=float, default=3600)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--users", type=int, default=200, help="how many users the clients draw from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-deletion", action="store_true", help="phase 1 only")
    ap.add_argument("--precompute", action="store_true",
                    help="serve with --precompute (the store MODEL/serve/recommendations.json is used when current "
                    "for these --candidates; an applied deletion makes it stale until the worker recomputes it)")
    ap.add_argument("--swap-at-once", action="store_true",
                    help="with --precompute: serve with --swap-at-once (the store is filled after the swap, online "
                    "answers meanwhile) instead of filling it before the swap")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, kept_cache(Path(tmp)):
        model = Path(tmp) / "model"
        shutil.copytree(args.model, model, ignore=shutil.ignore_patterns(".lock", "staging"))
        ids = read_meta(next((model / "adapters").iterdir()))["sample_ids"]
        trained = sorted({int(i.split("-")[0][1:]) for i in ids})
        victim = trained[0]
        token, _ = run_token_create(model, None)
        proc, url = start(model, args)
        try:
            cfg_users = [u for u in range(1, 944) if u != victim]
            rng = np.random.default_rng(args.seed)
            users = sorted(int(u) for u in rng.choice(cfg_users, min(args.users, len(cfg_users)), replace=False))
            items = list(range(1, 1683))
            out = {"concurrency": args.concurrency, "candidates": args.candidates, "precompute": args.precompute,
                   "swap_at_once": args.swap_at_once}
            t0 = time.time()
            res = load(url, token, users, items, args.concurrency, lambda: time.time() - t0 > args.seconds, args.seed)
            took = time.time() - t0
            out["steady"] = summary(res, took)
            show(f"steady: {args.concurrency} clients", out["steady"], took)
            if not args.no_deletion:
                r = httpx.post(f"{url}/v1/users/{victim}/forget", headers={"Authorization": f"Bearer {token}"},
                               timeout=120)
                rid = r.json()["id"]
                state = {"done": False}

                def until() -> bool:
                    el = time.time() - t1
                    if not state["done"] and time.time() - state.get("polled", 0) > 1.0:
                        state["polled"] = time.time()
                        q = httpx.get(f"{url}/v1/requests/{rid}", headers={"Authorization": f"Bearer {token}"},
                                      timeout=120).json()
                        state["done"] = q["status"] == "done"
                        state["applied_s"] = el if state["done"] else None
                    return (state["done"] and el > args.seconds) or el > args.max_deletion_seconds

                t1 = time.time()
                res = load(url, token, users, items, args.concurrency, until, args.seed + 1)
                took = time.time() - t1
                out["during_deletion"] = summary(res, took)
                out["deletion_seconds"] = state.get("applied_s")
                out["deletion_history"] = httpx.get(f"{url}/v1/requests/{rid}", timeout=120,
                                                    headers={"Authorization": f"Bearer {token}"}).json()["history"]
                show(f"while deleting user {victim} ({rid}, applied in {state.get('applied_s') or 0:.0f}s)",
                     out["during_deletion"], took)
                # phase 3: right after the deletion is applied (with --precompute --swap-at-once the store is stale
                # until the worker has computed it again with the new adapters: requests are answered online
                # meanwhile; without --swap-at-once it was filled before the swap)
                t2 = time.time()
                res = load(url, token, users, items, args.concurrency, lambda: time.time() - t2 > args.seconds,
                           args.seed + 2)
                took = time.time() - t2
                out["after_deletion"] = summary(res, took)
                show("after the deletion was applied", out["after_deletion"], took)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
