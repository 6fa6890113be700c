"""The unlearning comparison table of METHODS §5 on the real model: original, retrain, E2URec, NegGrad,
Bad-Teacher, forgetting 20% of the training users, every measure of privrec.unlearning.measures, and the
speed of each method against retraining measured in the same run.

1. trains the original run (``configs/unlearn-ml100k-original.yaml``) unless RUNS/trained has metrics;
2. runs ``retrain`` first (the reference), then the other methods with ``--retrained RUNS/retrain``, all with
   ``configs/unlearn/ml100k.yaml`` and the same forget users; a method whose RUNS/<method>/metrics.json
   exists is reused (delete it to re-run);
3. prints the table and the goal checks, and with ``--results`` / ``--benchmarks`` rewrites the marked
   sections of those files.

    python benchmarks/bench_unlearn.py --results docs/results.md --benchmarks docs/benchmarks.md

Measured: ~50 minutes on one pinned core at the default sizes (docs/unlearning.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mdsection

from privrec.commands.unlearn import load_unlearn_config, run_unlearn
from privrec.config import load_config
from privrec.rundir import METRICS_FILE, read_json
from privrec.unlearning.measures import render_table

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["original", "retrain", "e2urec", "neggrad", "bad-teacher"]


def goals(m: dict[str, dict]) -> list[str]:
    """The issue's goals for E2URec, each with its numbers and met / not met."""
    e, r, o = m.get("e2urec"), m.get("retrain"), m.get("original")
    if not (e and r and o):
        return []

    def line(name, value, ok):
        return f"- {name}: {value} -> **{'met' if ok else 'not met'}**"

    out = [line(">= 10x faster than retrain", f"{e['speedup_vs_retrain']:.2f}x", e["speedup_vs_retrain"] >= 10)]
    d = abs(e["forget_auc"] - r["forget_auc"])
    out.append(line("forget-set AUC within 0.02 of retrain", f"{e['forget_auc']:.4f} vs {r['forget_auc']:.4f} "
                    f"(|diff| {d:.4f})", d <= 0.02))
    d = abs(e["test_auc"] - o["test_auc"])
    out.append(line("test AUC within 0.01 of the original", f"{e['test_auc']:.4f} vs {o['test_auc']:.4f} "
                    f"(|diff| {d:.4f})", d <= 0.01))
    for attack in ("loss", "logistic"):
        k = f"mia_{attack}_accuracy"
        d = abs(e[k] - r[k])
        out.append(line(f"MIA ({attack}) accuracy on forgotten samples within 0.03 of retrain's",
                        f"{e[k]:.3f} vs {r[k]:.3f} (|diff| {d:.3f})", d <= 0.03))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original-config", default=str(ROOT / "configs" / "unlearn-ml100k-original.yaml"))
    ap.add_argument("--unlearn-config", default=str(ROOT / "configs" / "unlearn" / "ml100k.yaml"))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "unlearn-ml100k"))
    ap.add_argument("--forget-fraction", type=float, default=0.2)
    ap.add_argument("--methods", nargs="+", default=ORDER, choices=ORDER)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override the original run's config (e.g. model.name=tiny-random for a smoke run)")
    ap.add_argument("--results", default=None, help="rewrite the bench_unlearn section of this file (the table)")
    ap.add_argument("--benchmarks", default=None, help="rewrite the bench_unlearn section of this file (timings)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()

    runs = Path(args.runs)
    original = runs / "trained"  # the trained run; runs/original is the "original" method measured
    t_start = time.perf_counter()
    if not (original / METRICS_FILE).is_file():
        from privrec.commands.train import run_train

        cfg = load_config(args.original_config, args.overrides)
        run_train(cfg, original, progress=args.progress)
    trained = read_json(original / METRICS_FILE)

    metrics: dict[str, dict] = {}
    wall: dict[str, float] = {}
    for method in sorted(args.methods, key=lambda m: m != "retrain"):  # the reference first
        out = runs / method
        if not (out / METRICS_FILE).is_file():
            t0 = time.perf_counter()
            cfg = load_unlearn_config(original, args.unlearn_config, method=method,
                                      forget_fraction=args.forget_fraction)
            ref = runs / "retrain" if method != "retrain" and (runs / "retrain" / METRICS_FILE).is_file() else None
            run_unlearn(cfg, original, out, retrained=ref, progress=args.progress)
            wall[method] = time.perf_counter() - t0
        metrics[method] = read_json(out / METRICS_FILE)
    total = time.perf_counter() - t_start

    rows = [(m, metrics[m]) for m in ORDER if m in metrics]
    any_m = rows[0][1]
    ucfg = load_unlearn_config(original, args.unlearn_config, method="e2urec", forget_fraction=args.forget_fraction)
    u = ucfg.unlearn
    sizes = (
        f"Model `{any_m['model']}`, protocol `{any_m['protocol']}`: original run on {any_m['n_train']} training "
        f"samples of {any_m['n_users_train']} users ({trained.get('epochs_run')} epochs, LoRA r={ucfg.lora.r} on "
        f"{', '.join(ucfg.lora.target_modules)}, top {ucfg.lora.top_layers} layers, frozen bottom cached), "
        f"test AUC {trained['auc']:.4f} on {trained['n_test']} test samples. Forgetting {any_m['n_forget_users']} "
        f"users ({args.forget_fraction:.0%}): {any_m['n_forget']} samples "
        f"({any_m['forget_sample_fraction']:.1%} of the training samples); approximate methods see "
        f"{any_m['n_retain_pool']} retained samples. E2URec: alpha {u.e2urec.alpha}, beta {u.e2urec.beta}, "
        f"augmented {u.e2urec.augment.epochs} epoch(s) at lr {u.e2urec.augment.lr:g}, "
        f"student r={u.e2urec.lora.r} for {u.e2urec.train.epochs} "
        f"epochs ({u.e2urec.forget_only_epochs} forget-only), lr {u.e2urec.train.lr:g}; NegGrad lambda "
        f"{u.neggrad.lam}, {u.neggrad.train.epochs} epochs; Bad-Teacher ({u.bad_teacher.teacher} teacher), "
        f"{u.bad_teacher.train.epochs} epochs. Attack sets: {any_m['mia_n_members_fit']} retained members, "
        f"{any_m['mia_n_unseen_fit']} + {any_m['mia_n_unseen_eval']} never-seen samples "
        f"({any_m['mia_unseen_source']}, {any_m['mia_unseen_eval_users']}).\n"
        f"Machine: {any_m['machine']}. Command: `python benchmarks/bench_unlearn.py`.")
    table = render_table(rows, markdown=True)
    checks = goals(metrics)
    results = "\n\n".join([sizes, table] + (["Goals for E2URec:\n" + "\n".join(checks)] if checks else []))
    header = "| method | unlearning s | x retrain speed | cache s (shared) | scoring s | wall s of the command |"
    timing_lines = [header, "|---|---|---|---|---|---|"]
    for m, r in rows:
        sp = r.get("speedup_vs_retrain")
        took = f"{wall[m]:.0f}" if m in wall else "(reused)"
        timing_lines.append(f"| {m} | {r['unlearn_seconds']:.1f} | {f'{sp:.2f}x' if sp else '-'} | "
                            f"{r['cache_seconds']:.1f} | {r['score_seconds']:.1f} | {took} |")
    intro = (f"Unlearning on `{any_m['model']}`, original run trained in {trained['train_seconds']:.0f}s "
             f"(cache {trained['cache_seconds']:.0f}s); this benchmark took {total:.0f}s. {any_m['machine']}.")
    timings = "\n".join([intro, "", *timing_lines])
    mdsection.publish(args.results, "bench_unlearn", results)
    print()
    mdsection.publish(args.benchmarks, "bench_unlearn", timings)


if __name__ == "__main__":
    main()
