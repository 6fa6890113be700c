"""Why within-user AUC (UAUC) stays low on the all-users protocol (issue 7; docs/results.md, section
``within_user``).

A user's three test samples are consecutive ratings, so the second one's 10-item history ends with the first
one's rating and the third one's with the first two. A history like-rate therefore goes *up* for the sample
after a liked one and *down* after a disliked one: within a user it ranks the samples against their own
labels (METHODS §0 measured UAUC 0.285 for it, well below chance). This script measures that on counters
alone (no model; about a minute), with the like-rate counted over all 10 history items and over all but the
``k`` latest, alone and in a logistic regression with the item mean (the counters a prompt can carry), beside
the user's like-rate over the whole training pool (constant within a user, so UAUC 0.5 by construction).

With ``--run DIR`` (a finished like-prediction run with ``prompt.item_stats`` on; repeatable) it also splits
the run's within-user test pairs with different labels by whether the model orders them as the item line
does, and says who is right in each group.

    python benchmarks/within_user.py --out docs/results.md
    python benchmarks/within_user.py --out docs/results.md --run runs/recipes/allusers-2048-summary-stats-vusers
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from mdsection import publish
from sklearn.linear_model import LogisticRegression

from privrec.baselines import item_mean
from privrec.config import load_config
from privrec.data import ItemStats
from privrec.errors import UserError
from privrec.metrics import auc, uauc
from privrec.prepare import item_stats, setup_data
from privrec.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SECTION = "within_user"
SKIPS = (0, 1, 2, 3, 5)


def recent_like_rate(samples, threshold: float, skip: int) -> np.ndarray:
    """Like-rate over each sample's history without its ``skip`` latest items."""
    return np.array([s.history_like_rate(threshold, skip) for s in samples])


def user_mean(pool, samples) -> np.ndarray:
    """The user's like-rate over the training pool, shrunk to the global rate like the item mean (the same
    estimate, keyed by user; a pool sample's own label left out)."""
    stats = ItemStats.of(pool, key="user_id")
    return np.array([stats.read(s)[0] for s in samples])


def counters_table(config: str) -> str:
    cfg = load_config(ROOT / config, ["data.n_train=null", "data.n_valid=null", "data.n_test=null"])
    sp = setup_data(cfg)
    pool, test, th = sp.pool, sp.test, cfg.data.like_threshold
    y_pool, y = np.array([s.label for s in pool]), [s.label for s in test]
    users = [s.user_id for s in test]
    im_pool, im_test = item_mean(pool, pool), item_mean(pool, test)

    def lr(train_x, test_x):
        return LogisticRegression(max_iter=1000).fit(train_x, y_pool).predict_proba(test_x)[:, 1]

    rows = []
    for skip in SKIPS:
        r_pool, r_test = recent_like_rate(pool, th, skip), recent_like_rate(test, th, skip)
        both = lr(np.c_[r_pool, im_pool], np.c_[r_test, im_test])
        rows.append((f"history like-rate over the {cfg.data.history_len - skip} earliest of 10" if skip else
                     "history like-rate over all 10 (the reference)", r_test, both))
    um_pool, um_test = user_mean(pool, pool), user_mean(pool, test)
    rows.append(("user like-rate over the training pool", um_test,
                 lr(np.c_[um_pool, im_pool], np.c_[um_test, im_test])))
    lines = [f"All-users protocol, all {len(test):,} test samples ({len({u for u in users})} users); counters and "
             f"regressions learn from the {len(pool):,} training samples. Command: `python benchmarks/within_user.py"
             " --out docs/results.md`.", "",
             "| user counter | its AUC | its UAUC | LR(counter, item mean) AUC | LR(counter, item mean) UAUC |",
             "|---|---|---|---|---|"]
    for name, alone, both in rows:
        lines.append(f"| {name} | {auc(y, alone):.4f} | {uauc(users, y, alone):.4f} | {auc(y, both):.4f} | "
                     f"{uauc(users, y, both):.4f} |")
    lines.append(f"| (item mean alone) | {auc(y, im_test):.4f} | {uauc(users, y, im_test):.4f} | - | - |")
    return "\n".join(lines)


def departures_table(run_path: str) -> str:
    """Within-user test pairs with different labels, split by whether the run orders them as its item line."""
    cfg = RunDir(run_path, create=False).load_config()
    if not cfg.prompt.item_stats:
        raise UserError(f"{run_path} was trained without prompt.item_stats: there is no item line to compare with")
    sp = setup_data(cfg)
    stats = item_stats(cfg, sp)
    rate = {s.sample_id: stats.read(s)[0] for s in sp.test}
    liked = {s.sample_id: s.history_like_rate(cfg.data.like_threshold) for s in sp.test}  # the full window
    with open(Path(run_path) / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    by_user: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_user[r["user_id"]].append(r)
    # per group: pairs, model right, item line right, like-rate gaps, [pairs whose windows' like-rates differ,
    # of them ordered by the model as the window's like-rate orders them]
    groups = {True: [0, 0, 0, [], [0, 0]], False: [0, 0, 0, [], [0, 0]]}
    for samples in by_user.values():
        for a, b in itertools.combinations(samples, 2):
            pa, pb, qa, qb = float(a["p_yes"]), float(b["p_yes"]), rate[a["sample_id"]], rate[b["sample_id"]]
            if a["label"] == b["label"] or pa == pb or qa == qb:
                continue
            g = groups[(pa > pb) == (qa > qb)]
            liked_first = a["label"] == "1"
            g[0] += 1
            g[1] += (pa > pb) == liked_first
            g[2] += (qa > qb) == liked_first
            g[3].append(abs(qa - qb))
            la, lb = liked[a["sample_id"]], liked[b["sample_id"]]
            if la != lb:
                g[4][0] += 1
                g[4][1] += (pa > pb) == (la > lb)
    lines = [f"Run `{run_path}`: its within-user test pairs with different labels (ties left out). Command: "
             f"`python benchmarks/within_user.py --out docs/results.md --run {run_path}`.", "",
             "| the model's order | pairs | model right | item line right | median item like-rate gap | "
             "model orders as the window's like-rate (pairs where it differs) |",
             "|---|---|---|---|---|---|"]
    for same, label in ((True, "follows the item line"), (False, "departs from the item line")):
        n, model_right, line_right, gaps, (n_window, as_window) = groups[same]
        if n:
            window = f"{as_window / n_window:.3f} ({n_window})" if n_window else "-"
            lines.append(f"| {label} | {n} | {model_right / n:.3f} | {line_right / n:.3f} | "
                         f"{float(np.median(gaps)):.3f} | {window} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/all-users-ml100k.yaml", help="the all-users protocol's config")
    ap.add_argument("--run", action="append", default=[], help="a finished run with prompt.item_stats: add its "
                    "departures table (repeatable)")
    ap.add_argument("--out", default=None, help="markdown file whose `within_user` section is rewritten")
    args = ap.parse_args(argv)
    try:
        body = counters_table(args.config)
        for run in args.run:
            body += "\n\n" + departures_table(run)
    except UserError as e:
        print(f"within_user: error: {e}", file=sys.stderr)
        return 2
    publish(args.out, SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
