"""Where the time of a fresh-prompt scoring call goes (docs/benchmarks.md, "Scoring fresh prompts on AVX2").

Builds bench_core.py's model and prompts (SmolLM2, LoRA on all layers, shared prefix on) and prints: the
scoring rate at several batch sizes, the operators that take the most time in one call (torch.profiler), and
the plain fp32 matmul (712 x hidden) @ (hidden x intermediate) that the call's biggest GEMMs resemble.

    python benchmarks/profile_scoring.py --emulate-avx2
    python benchmarks/profile_scoring.py --emulate-avx2 --leave MKL_ENABLE_INSTRUCTIONS   # MKL not limited
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_core import build, time_score
from isa import emulate_avx2, emulation_note
from torch.profiler import ProfilerActivity, profile

from privrec.config import parse_config
from privrec.data import build_splits, load_dataset
from privrec.prepare import machine


def matmul_gflops(rows: int, k: int, n: int, seconds: float = 1.0) -> float:
    a, b = torch.randn(rows, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * rows * k * n * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-score", type=int, default=96)
    ap.add_argument("--batch-sizes", default="8,16,32")
    ap.add_argument("--emulate-avx2", action="store_true", help="keep the kernel libraries to AVX2 (isa.py)")
    ap.add_argument("--leave", default="", help="comma-separated isa.AVX2_ENV variables to leave unset")
    args = ap.parse_args()
    if args.emulate_avx2:
        emulate_avx2(tuple(v for v in args.leave.split(",") if v))
    print(f"Machine: {machine()}.{emulation_note()}")
    cfg = parse_config({"model": {"name": "smollm2-135m"}, "data": {"n_train": 8, "n_test": args.n_score,
                                                                    "n_valid": 1}})
    ds = load_dataset("ml-100k", None)
    m = build(cfg, ds, None)
    te = m.encode(build_splits(ds, cfg.data, 0).test)
    m.model.eval()
    m.share_prefix = True
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        print(f"batch {bs}: {time_score(m, te, bs, naive=False):.2f} prompts/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_score(m, te, 8, naive=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    hidden = m._inner().config
    print(f"fp32 matmul (712 x {hidden.hidden_size}) @ ({hidden.hidden_size} x {hidden.intermediate_size}): "
          f"{matmul_gflops(712, hidden.hidden_size, hidden.intermediate_size):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
