"""What `privrec serve` recommends, measured on the ranking protocol (docs/ranking.md, METHODS §1, §11).

Each test user of the model's ranking draw (``data.n_test`` users, ``data.sample_seed``) holds out their last
item; everything before it is the training period, over which popularity and the MF of the candidate stage
are fitted (every user's last item held out, as the ranking protocol's popularity reference). The prompt's
history is the ``history_len`` ratings before the held-out item. Over the user's unseen items (every item
they did not rate in the training period):

- recall@C: the share of users whose held-out item is among the C candidates (popularity + MF);
- two-stage HR@10 / NDCG@10: the C candidates ordered by P(Yes) (``--blend`` values: ordered by
  (1-B) * rank by P(Yes) + B * rank in the candidate list; B = 1 is the candidate stage alone);
- popularity alone: every unseen item by popularity;
- the LLM over all unseen items (``--all-unseen-users`` users only: ~1,600 prompts per user).

HR@10 = share of users whose held-out item ranks in the top 10; NDCG@10 = mean of 1 / log2(rank + 1) over
users whose item ranks <= 10 (0 otherwise), rank 1-based.

    python benchmarks/serve_quality.py runs/mine                         # SmolLM2 model directory
    python benchmarks/serve_quality.py runs/tiny --users 20 --candidates 10,50 --all-unseen-users 3   # smoke
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from privrec.candidates import CandidateGenerator
from privrec.data import build_ranking_splits
from privrec.recommender import Recommender, blended_order


def rank_of(order: list[int], target: int) -> int | None:
    """1-based rank of ``target`` in ``order`` (None when absent)."""
    try:
        return order.index(target) + 1
    except ValueError:
        return None


def hr_ndcg(ranks: list[int | None], k: int = 10) -> dict:
    hits = [r for r in ranks if r is not None and r <= k]
    n = max(len(ranks), 1)
    return {f"hr@{k}": len(hits) / n, f"ndcg@{k}": sum(1.0 / np.log2(r + 1) for r in hits) / n, "n": len(ranks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model directory (privrec train, shard-train, federate)")
    ap.add_argument("--users", type=int, default=None, help="at most this many test users (default: the draw's)")
    ap.add_argument("--candidates", default="20,50,100", help="values of C, comma-separated")
    ap.add_argument("--sources", default="mix", help="candidate sources, comma-separated (mix, popularity, mf)")
    ap.add_argument("--blend", default="0,0.25,0.5,0.75,1", help="values of B, comma-separated")
    ap.add_argument("--all-unseen-users", type=int, default=10,
                    help="users for the LLM over all unseen items (its cost: ~1,600 prompts per user)")
    ap.add_argument("--valid-users", type=int, default=0,
                    help="choose C and the blend on this many users outside the test draw (0: do not choose)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    cs = [int(c) for c in args.candidates.split(",")]
    srcs = args.sources.split(",")
    blends = [float(b) for b in args.blend.split(",")]

    t0 = time.perf_counter()
    rec = Recommender(args.model)
    cfg, ds = rec.cfg, rec.ds
    test = build_ranking_splits(ds, cfg.data, cfg.ranking.n_candidates, cfg.ranking.candidate_seed, cfg.seed).test
    test = test[: args.users] if args.users else test
    held = {(r.user_id, r.target) for r in test}
    last = ds.inter.groupby("user_id").tail(1)  # every user's last interaction: out of the training period
    train_period = ds.inter.drop(index=last.index)
    gen = CandidateGenerator(train_period, ds.items, cfg.seed)
    seen_of = {int(u): set(rows["item_id"].tolist()) for u, rows in train_period.groupby("user_id")}
    print(f"{len(test)} test users, {len(held)} held-out items; setup {time.perf_counter() - t0:.1f}s")

    train_pairs = {(x.user_id, x.item_id) for x in rec.splits.train}
    out: dict = {"users": len(test), "model": str(args.model), "test_users": [r.user_id for r in test],
                 "held_out_in_training": sum((r.user_id, r.target) in train_pairs for r in test)}
    pop_ranks = [rank_of([i for i in gen.by_popularity if i not in seen_of.get(r.user_id, set())], r.target)
                 for r in test]
    out["popularity"] = hr_ndcg(pop_ranks)

    stages = [(src, c) for src in srcs for c in cs]

    def key(src: str, c: int) -> str:
        return f"C={c}" if src == "mix" else f"C={c},{src}"

    def two_stage(rows) -> dict:
        """{key(source, C): {"recall", "blend=B": hr_ndcg}} over ``rows``; each user's candidates of every
        stage are scored once, together."""
        hits = {st: 0 for st in stages}
        ranks = {(st, b): [] for st in stages for b in blends}
        for r in rows:
            seen = seen_of.get(r.user_id, set())
            cands = {st: gen.candidates(r.user_id, seen, st[1], st[0]) for st in stages}
            union = sorted({i for cs_ in cands.values() for i in cs_})
            p_of = dict(zip(union, rec.p_yes_given(r.user_id, union, r.history, r.timestamp)))
            for st, items in cands.items():
                hits[st] += r.target in items
                probs = np.array([p_of[i] for i in items])
                for b in blends:
                    ranks[st, b].append(rank_of([items[i] for i in blended_order(probs, b)], r.target))
        return {key(*st): {"recall": hits[st] / max(len(rows), 1),
                           **{f"blend={b}": hr_ndcg(ranks[st, b]) for b in blends}} for st in stages}

    if args.valid_users:
        # (C, B) chosen on users outside the test draw, never on the test users
        every = build_ranking_splits(ds, cfg.data.model_copy(update={"n_test": None}), cfg.ranking.n_candidates,
                                     cfg.ranking.candidate_seed, cfg.seed).test
        outside = [r for r in every if r.user_id not in {t.user_id for t in test}]
        pick = np.random.default_rng([cfg.seed, 11]).choice(len(outside), size=min(args.valid_users, len(outside)),
                                                           replace=False)
        valid = [outside[i] for i in sorted(pick)]
        out["valid"] = two_stage(valid)
        out["valid"]["popularity"] = hr_ndcg([rank_of([i for i in gen.by_popularity
                                                        if i not in seen_of.get(r.user_id, set())], r.target)
                                               for r in valid])
        best = max(((st, b) for st in stages for b in blends),
                   key=lambda sb: (out["valid"][key(*sb[0])][f"blend={sb[1]}"]["ndcg@10"], sb[1]))
        (src, c), b = best
        out["chosen_on_valid"] = {"C": c, "source": src, "blend": b, "valid_users": [r.user_id for r in valid]}
        print(f"chosen on {len(valid)} validation users: C={c}, source {src}, blend={b}")
    out.update(two_stage(test))

    some = test[: args.all_unseen_users]
    t = time.perf_counter()
    llm_ranks = []
    for r in some:
        items = [i for i in gen.by_popularity if i not in seen_of.get(r.user_id, set())]
        probs = rec.p_yes_given(r.user_id, items, r.history, r.timestamp)
        llm_ranks.append(rank_of([items[i] for i in np.argsort(-probs, kind="stable")], r.target))
    out["llm_all_unseen"] = {**hr_ndcg(llm_ranks), "seconds": time.perf_counter() - t,
                             "popularity_same_users": hr_ndcg(pop_ranks[: len(some)])}

    print(f"{'':<28} {'recall@C':>9} {'HR@10':>7} {'NDCG@10':>8}   n")
    p = out["popularity"]
    print(f"{'popularity (all unseen)':<28} {'':>9} {p['hr@10']:>7.3f} {p['ndcg@10']:>8.3f} {p['n']:>4}")
    for st in stages:
        for b in blends:
            m = out[key(*st)][f"blend={b}"]
            print(f"{f'{st[0]} C={st[1]} blend={b}':<28} {out[key(*st)]['recall']:>9.3f} {m['hr@10']:>7.3f} "
                  f"{m['ndcg@10']:>8.3f} {m['n']:>4}")
    if "chosen_on_valid" in out:
        ch = out["chosen_on_valid"]
        row = out[key(ch["source"], ch["C"])]
        m = row[f"blend={ch['blend']}"]
        print(f"{'chosen on validation':<28} {row['recall']:>9.3f} {m['hr@10']:>7.3f} "
              f"{m['ndcg@10']:>8.3f} {m['n']:>4}   (C={ch['C']}, {ch['source']}, blend={ch['blend']})")
    print(f"held-out items that were a training sample of the model: {out['held_out_in_training']} of {len(test)}")
    m, q = out["llm_all_unseen"], out["llm_all_unseen"]["popularity_same_users"]
    print(f"{'LLM over all unseen':<28} {'':>9} {m['hr@10']:>7.3f} {m['ndcg@10']:>8.3f} {m['n']:>4}"
          f"   (popularity on the same users: {q['hr@10']:.3f} / {q['ndcg@10']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
