"""The candidate stage of the two-stage recommender (METHODS §11): popularity + MF over the remaining data."""

from __future__ import annotations

import numpy as np
import pandas as pd

from privrec.candidates import CandidateGenerator
from privrec.federated.partition import mf_user_embeddings
from privrec.model.mf import fit_mf


def table(rows):
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating"])


def test_popularity_counts_only_the_remaining_interactions_ties_by_item():
    inter = table([(1, 10, 5), (2, 10, 4), (3, 11, 3), (1, 12, 1), (2, 12, 2), (3, 12, 5)])
    gen = CandidateGenerator(inter, [10, 11, 12, 13], seed=0, epochs=5)
    assert gen.by_popularity == [12, 10, 11, 13]
    forgot = CandidateGenerator(inter[inter.user_id != 3], [10, 11, 12, 13], seed=0, epochs=5)
    assert forgot.popularity == {10: 2, 11: 0, 12: 2, 13: 0} and forgot.by_popularity == [10, 12, 11, 13]


def test_candidates_interleave_mf_and_popularity_unseen_only():
    rng = np.random.default_rng(0)
    rows = [(u, i, float(rng.integers(1, 6))) for u in range(1, 30) for i in rng.choice(40, 12, replace=False) + 1]
    gen = CandidateGenerator(table(rows), range(1, 41), seed=0)
    seen = {i for u, i, _ in rows if u == 3}
    c = gen.candidates(3, seen, 10)
    assert len(c) == len(set(c)) == 10 and not set(c) & seen
    mf = [i for i in gen.mf_ranking(3) if i not in seen]
    pop = [i for i in gen.by_popularity if i not in seen]
    assert c[0] == mf[0] and c[1] == (pop[0] if pop[0] != mf[0] else pop[1])
    assert set(gen.candidates(3, seen, None)) == set(range(1, 41)) - seen  # C = all unseen
    assert gen.candidates(3, seen, 1000) == gen.candidates(3, seen, None)
    # one source alone: its own ranking, unseen items only (B = 1 then serves exactly popularity's order)
    assert gen.candidates(3, seen, 10, "popularity") == pop[:10] and gen.candidates(3, seen, 10, "mf") == mf[:10]
    assert gen.candidates(3, seen, 10, "popularity") != c


def test_mf_is_the_partitions_mf_and_scores_its_own_factors():
    u = np.array([1, 1, 2, 2, 3]); i = np.array([5, 6, 5, 7, 6]); r = np.array([5, 1, 4, 2, 3], dtype=np.float32)  # noqa: E702
    mf = fit_mf(u, i, r, dim=3, epochs=20, seed=1)
    emb = mf_user_embeddings(u, i, r, dim=3, epochs=20, seed=1)
    assert all(np.array_equal(emb[k], v) for k, v in mf.user_vectors().items())
    s = mf.scores(2)
    k, j = mf.user_row(2), 0
    assert s[5] == mf.mu + mf.bu[k] + mf.bi[j] + float(mf.P[k] @ mf.Q[j])
    assert mf.user_row(99) is None and set(mf.scores(99)) == {5, 6, 7}


def test_serve_quality_chooses_the_blend_on_users_outside_the_test_draw(served_model, tmp_path):
    """benchmarks/serve_quality.py picks C and the blend on validation users, never on the test users."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "q.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_quality.py"
    r = subprocess.run([sys.executable, str(script), str(served_model), "--users", "4", "--candidates", "3,6",
                        "--blend", "0,1", "--valid-users", "4", "--all-unseen-users", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    q = json.loads(out.read_text())
    chosen = q["chosen_on_valid"]
    assert len(chosen["valid_users"]) == 4 and not set(chosen["valid_users"]) & set(q["test_users"])
    assert (chosen["C"], chosen["blend"]) in {(c, b) for c in (3, 6) for b in (0.0, 1.0)}
    best = max(q["valid"][f"C={c}"][f"blend={b}"]["ndcg@10"] for c in (3, 6) for b in (0.0, 1.0))
    assert q["valid"][f"C={chosen['C']}"][f"blend={chosen['blend']}"]["ndcg@10"] == best
    assert 0 <= q["C=3"]["recall"] <= q["C=6"]["recall"] <= 1  # the C=3 candidates are a prefix of C=6's
    assert q["popularity"]["n"] == 4 and q["llm_all_unseen"]["n"] == 1
