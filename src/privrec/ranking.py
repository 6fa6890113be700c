"""Next-item ranking (METHODS §1): score each user's candidates, rank them, HR@K / NDCG@K.

Two scorers on the one model (:class:`privrec.model.recmodel.RecLM`), both through its shared-prefix path:

- ``yes``: P(Yes) of the like-prompt of every candidate (the like-prediction prompt family and model, so one
  adapter serves both tasks). The candidates' prompts share the prefix up to the target item's fields.
- ``title``: the log-likelihood (sum over tokens) of the candidate's title after a next-movie prompt that
  lists the candidates in the ranking's order (BIGRec-style). The whole prompt is the shared prefix; each
  candidate's suffix is its title.

Plus the popularity reference (candidates ordered by their interaction count in the training period) and
the expected metrics of a random order, on the same candidates.
"""

from __future__ import annotations

import numpy as np

from privrec.data import RankingSample, RankingSplits
from privrec.data.ranking import training_interactions
from privrec.metrics import random_ranking_metrics, ranking_metrics, ranks_from_scores
from privrec.model.mf import MF, fit_bpr, fit_mf
from privrec.model.recmodel import PrefixGroup, RecLM

SCORERS = ("yes", "title")


def scorers_of(ranking_cfg) -> list[str]:
    """The scorers a config asks for, the primary one first."""
    return list(SCORERS) if ranking_cfg.scorer == "both" else [ranking_cfg.scorer]


def yes_group(model: RecLM, r: RankingSample) -> PrefixGroup:
    """The like-prompts of every candidate, tokenised as ids(prefix) + ids(suffix), as one prefix group."""
    return PrefixGroup.of(model.encode(r.like_samples()))


def title_group(model: RecLM, r: RankingSample) -> PrefixGroup:
    """The next-movie prompt (listing the candidates) as the prefix, each candidate's title as a suffix."""
    b = model.builder
    prompt = model.tokenize(b.next_item_prompt(r.user_id, r.history, r.candidates, model.tokenizer, r.view))
    return PrefixGroup(prompt, tuple(model.tokenize(b.item_answer(c)) for c in r.candidates))


def candidate_scores(model: RecLM, rankings: list[RankingSample], scorer: str, ranking_cfg, batch_size: int = 16,
                     progress: bool = True, shared: bool | None = None) -> list[np.ndarray]:
    """Per ranking, one score per candidate (higher = ranked higher): z_yes - z_no for ``yes`` (monotone in
    P(Yes)), the title's summed log-probability for ``title``."""
    build = {"yes": yes_group, "title": title_group}[scorer]
    groups = [build(model, r) for r in rankings]
    return model.score_groups(groups, scorer, shared=ranking_cfg.shared_prefix if shared is None else shared,
                              prefix_batch=ranking_cfg.prefix_batch, max_suffixes=ranking_cfg.max_suffixes,
                              batch_size=batch_size, progress=progress)


def true_indices(rankings: list[RankingSample]) -> list[int]:
    return [r.true_index for r in rankings]


def summarise_ranks(ranks: np.ndarray) -> dict:
    """``hr@K``, ``ndcg@K``, ``mean_rank`` and ``n`` of one scorer."""
    out = ranking_metrics(ranks)
    out.update({"mean_rank": float(np.mean(ranks)) if len(ranks) else float("nan"), "n": len(ranks)})
    return out


def evaluate_rankings(model: RecLM, rankings: list[RankingSample], ranking_cfg, batch_size: int = 16,
                      progress: bool = True) -> tuple[dict[str, dict], dict[str, list[np.ndarray]]]:
    """({scorer: metrics}, {scorer: per-ranking candidate scores}) for every configured scorer."""
    metrics, scores = {}, {}
    for sc in scorers_of(ranking_cfg):
        scores[sc] = candidate_scores(model, rankings, sc, ranking_cfg, batch_size, progress)
        metrics[sc] = summarise_ranks(ranks_from_scores(scores[sc], true_indices(rankings)))
    return metrics, scores


def popularity_scores(rankings: list[RankingSample], popularity: dict[int, int]) -> list[np.ndarray]:
    return [np.array([popularity.get(c, 0) for c in r.candidates], dtype=np.float64) for r in rankings]


def references(rankings: list[RankingSample], popularity: dict[int, int], n_candidates: int,
               splits: RankingSplits | None = None, seed: int = 0) -> dict[str, dict]:
    """``popularity`` (training-period interaction count; ties pessimistic like every scorer) and ``random``
    (expected values of a uniformly random order) on the same candidates; with ``splits``, the trained CF
    references of :func:`cf_references` too."""
    pop = summarise_ranks(ranks_from_scores(popularity_scores(rankings, popularity), true_indices(rankings)))
    rnd = dict(random_ranking_metrics(n_candidates), mean_rank=(n_candidates + 1) / 2, n=len(rankings))
    out = {"popularity": pop, "random": rnd}
    if splits is not None:
        out.update(cf_references(splits, rankings, seed))
    return out


# (dim, epochs, weight decay) of the BPR-MF reference, chosen per run on the validation users' HR@1
BPR_GRID = ((32, 40, 1e-4), (64, 60, 1e-4), (32, 40, 1e-3))


def _mf_scores(mf: MF, rankings: list[RankingSample]) -> list[np.ndarray]:
    out = []
    for r in rankings:
        by_item = mf.scores(r.user_id)
        out.append(np.array([by_item.get(c, -np.inf) for c in r.candidates]))
    return out


def cf_references(rs: RankingSplits, rankings: list[RankingSample], seed: int = 0, grid=None) -> dict[str, dict]:
    """Trained CF references on the same candidates (METHODS §12), learnt from
    :func:`training_interactions`: ``bpr`` (BPR-MF on the implicit interactions, size chosen on the validation
    rankings' HR@1 among :data:`BPR_GRID`) and ``mf`` (the biased MF of the like-prediction tables on the
    ratings, ranking by predicted rating: a rating model, not a next-item model). An item the fit never saw
    ranks last."""
    grid = grid or BPR_GRID
    users, items, ratings = training_interactions(rs)
    universe = np.array(sorted(rs.dataset.items), dtype=np.int64)

    def hr1(mf: MF, which: list[RankingSample]) -> float:
        return summarise_ranks(ranks_from_scores(_mf_scores(mf, which), true_indices(which)))["hr@1"]

    best = None
    for dim, epochs, wd in grid if rs.valid else grid[:1]:
        mf = fit_bpr(users, items, universe, dim, epochs, seed, wd)
        score = hr1(mf, rs.valid) if rs.valid else float("nan")
        if best is None or score > best[0]:
            best = (score, mf, {"dim": dim, "epochs": epochs, "weight_decay": wd, "valid_hr@1": score})
    _, bpr, chosen = best
    out = {"bpr": dict(summarise_ranks(ranks_from_scores(_mf_scores(bpr, rankings), true_indices(rankings))),
                       chosen=chosen)}
    mf = fit_mf(users, items, ratings, seed=seed)
    out["mf"] = summarise_ranks(ranks_from_scores(_mf_scores(mf, rankings), true_indices(rankings)))
    return out


def predictions_csv(rankings: list[RankingSample], scores: dict[str, list[np.ndarray]]) -> str:
    """One row per (user, candidate): the candidate's slot, whether it is the true item, each scorer's score."""
    names = sorted(scores)
    lines = ["user_id,item_id,slot,is_true," + ",".join(names)]
    for u, r in enumerate(rankings):
        for j, c in enumerate(r.candidates):
            lines.append(f"{r.user_id},{c},{j},{int(c == r.target)},"
                         + ",".join(f"{scores[n][u][j]:.6f}" for n in names))
    return "\n".join(lines) + "\n"
