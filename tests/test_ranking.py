"""Next-item ranking (METHODS §1): candidate protocol, prompt cut, shared-prefix scoring, train/recommend/federate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, randomise_lora, run_cli

from privrec.config import load_config, parse_config
from privrec.data import augment, build_ranking_splits, like_splits
from privrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RANK_TINY = ROOT / "configs" / "rank-tiny.yaml"


def rank_config(*overrides: str):
    return load_config(RANK_TINY, list(overrides))


@pytest.fixture(scope="module")
def rank_cfg():
    return rank_config()


@pytest.fixture(scope="module")
def rsplits(ml100k, rank_cfg):
    return build_ranking_splits(ml100k, rank_cfg.data, 10, candidate_seed=0, seed=0)


# --- the candidate protocol -----------------------------------------------------------------------------
def test_candidates_hold_the_true_item_once_and_nothing_the_user_rated(ml100k, rsplits):
    inter = ml100k.inter
    for part, offset in ((rsplits.train, 2), (rsplits.valid, 2), (rsplits.test, 1)):
        assert part
        for r in part:
            rows = inter[inter["user_id"] == r.user_id]
            rated = set(rows["item_id"].tolist())
            items = rows["item_id"].tolist()
            assert r.candidates.count(r.target) == 1 and len(set(r.candidates)) == 10
            assert not (set(r.negatives()) & rated)  # never rated anywhere in the dataset
            assert r.target == items[-offset]  # last item test, second-to-last train/valid
            assert [i for i, _ in r.history] == items[-offset - 10: -offset]
    assert {r.user_id for r in rsplits.train}.isdisjoint({r.user_id for r in rsplits.valid})
    assert len({r.true_index for r in rsplits.test}) > 3  # the true item has no fixed slot


def test_same_seed_same_candidates_different_seed_different(ml100k, rank_cfg, rsplits):
    again = build_ranking_splits(ml100k, rank_cfg.data, 10, candidate_seed=0, seed=0)
    assert [r.candidates for r in again.test] == [r.candidates for r in rsplits.test]
    other = build_ranking_splits(ml100k, rank_cfg.data, 10, candidate_seed=1, seed=0)
    assert [r.user_id for r in other.test] == [r.user_id for r in rsplits.test]  # same users, new candidates
    assert sum(set(a.candidates) != set(b.candidates) for a, b in zip(other.test, rsplits.test)) == len(other.test)
    # a user's candidates do not depend on which other users a run draws
    more = build_ranking_splits(ml100k, rank_config("data.n_test=40").data, 10, candidate_seed=0, seed=0)
    by_user = {r.user_id: r.candidates for r in more.test}
    assert all(by_user[r.user_id] == r.candidates for r in rsplits.test if r.user_id in by_user)
    # a user's training and test negatives never overlap (no sample id is both trained on and tested)
    test_neg = {r.user_id: set(r.negatives()) for r in more.test}
    assert all(not (set(r.negatives()) & test_neg.get(r.user_id, set())) for r in more.train + more.valid)


def test_like_samples_and_augmentation_keep_labels(rsplits):
    tr, va, te = like_splits(rsplits, 3)
    assert len(tr) == 4 * len(rsplits.train) and len(te) == 10 * len(rsplits.test)
    assert [s.label for s in tr[:4]] == [1, 0, 0, 0] and tr[0].item_id == rsplits.train[0].target
    assert sum(s.label for s in te) == len(rsplits.test)
    aug = augment(tr, shuffle=True, mask=2, copies=2, seed=0)
    originals = {s.sample_id: s for s in tr}
    copies = [s for s in aug if s.sample_id != s.source_id]
    assert len(copies) == 2 * len(tr)
    for c in copies:
        o = originals[c.source_id]
        assert (c.label, c.item_id, c.user_id, c.history) == (o.label, o.item_id, o.user_id, o.history)
    assert len({c.view.order for c in copies}) > 1


def test_config_validation():
    assert rank_config().task == "ranking" and parse_config({}).task == "like-prediction"
    with pytest.raises(ConfigError, match="task"):
        parse_config({"task": "rank"})
    with pytest.raises(ConfigError, match="negatives"):
        parse_config({"task": "ranking", "ranking": {"n_candidates": 4, "negatives": 4}})
    with pytest.raises(ConfigError, match="scorer"):
        parse_config({"task": "ranking", "ranking": {"scorer": "bleu"}})
    with pytest.raises(ConfigError, match="protocol"):
        parse_config({"task": "ranking", "data": {"protocol": "all-users"}})


# --- the prompt cut and shared-prefix scoring ----------------------------------------------------------------
def test_prompt_cut_keeps_token_ids_and_shares_the_prefix(ml100k, rank_cfg, rsplits):
    from privrec.model.backbone import load_backbone
    from privrec.prompts import PromptBuilder

    _, tok = load_backbone("tiny-random")
    for template in ("kv", "tallrec"):
        b = PromptBuilder(ml100k, rank_cfg.prompt.model_copy(update={"template": template}))
        for r in rsplits.test[:4]:
            samples = r.like_samples()
            if template == "kv":  # shuffled / masked views move the cut (a view may start with a target field)
                samples = augment(samples[:3], shuffle=True, mask=2, copies=3, seed=1)
            for s in samples:
                prefix, suffix = b.split(s, tok)
                ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
                assert ids(prefix) + ids(suffix) == ids(prefix + suffix)  # the cut never changes the tokens
                if "title" not in s.view.dropped:
                    assert b.ds.items[s.item_id].title in suffix  # the target's fields come after the cut
            heads = {b.split(s, tok)[0] for s in r.like_samples()}
            assert len(heads) == 1  # every candidate of a user shares the prefix


def _hf_title_logprob(m, prefix, suffix):
    """Independent reference: the plain HF forward's full-vocabulary logits, log-softmax, summed."""
    with torch.no_grad():
        logits = m.model(input_ids=torch.tensor([prefix + suffix])).logits[0].double()  # (T, V)
    lp = torch.log_softmax(logits, -1)
    return sum(lp[len(prefix) - 1 + t, tok].item() for t, tok in enumerate(suffix))


@pytest.mark.parametrize("top_layers", [None, 1])
def test_shared_prefix_scores_equal_full_prompt_scores(ml100k, rank_cfg, rsplits, top_layers):
    from privrec import ranking

    cfg = rank_config(f"lora.top_layers={'null' if top_layers is None else top_layers}", "model.precision=fp32")
    m = make_model(cfg, ml100k)
    randomise_lora(m, 5)
    rankings = rsplits.test[:7]
    # several users per prefix batch, chunks that cut across users and across one user's candidates
    rc = cfg.ranking.model_copy(update={"prefix_batch": 3, "max_suffixes": 7})
    groups = [ranking.yes_group(m, r) for r in rankings]
    assert len({len(g.prefix) for g in groups}) > 2  # prefixes of different lengths: padding is exercised
    for scorer in ("yes", "title"):
        shared = ranking.candidate_scores(m, rankings, scorer, rc, progress=False, shared=True)
        full = ranking.candidate_scores(m, rankings, scorer, rc, progress=False, shared=False)
        for a, b in zip(shared, full):
            np.testing.assert_allclose(a, b, atol=1e-4)
        assert np.std(np.concatenate(shared)) > 1e-3  # not a constant
    # the yes scores are exactly what training and like-prediction scoring see (same token ids, same head)
    z = m.score_logits(m.encode(rankings[0].like_samples()), progress=False)
    np.testing.assert_allclose(shared_yes := ranking.candidate_scores(m, rankings[:1], "yes", rc, progress=False,
                                                                     shared=True)[0], z, atol=1e-4)
    assert shared_yes.shape == (10,)
    # the title scores against the plain HF forward with full-vocabulary logits
    g = ranking.title_group(m, rankings[1])
    title = ranking.candidate_scores(m, rankings[1:2], "title", rc, progress=False, shared=True)[0]
    m.model.eval()
    for j in (0, 5):
        assert title[j] == pytest.approx(_hf_title_logprob(m, list(g.prefix), list(g.suffixes[j])), abs=1e-4)


def test_long_candidate_lists_are_chunked(ml100k, rank_cfg, rsplits):
    from privrec.model.recmodel import PrefixGroup

    m = make_model(rank_config("model.precision=fp32"), ml100k)  # exact equality of two paths
    randomise_lora(m, 6)
    r = rsplits.test[0]
    samples = [r.like_sample(i) for i in range(1, 131) if i not in {i for i, _ in r.history}]
    group = PrefixGroup.of(m.encode(samples))
    [shared] = m.score_groups([group], "yes", shared=True, max_suffixes=32, progress=False)
    [full] = m.score_groups([group], "yes", shared=False, batch_size=32, progress=False)
    assert len(shared) > 100
    np.testing.assert_allclose(shared, full, atol=1e-4)


def test_models_that_need_whole_prompts_fall_back_to_full_prompts(ml100k, rank_cfg, rsplits):
    from privrec import ranking
    from privrec.federated.split import SplitRecLM

    m = make_model(rank_cfg, ml100k)
    assert m.can_share_prefix
    seen = []
    m.batch_hooks.append(lambda batch: seen.append(len(batch.items)))  # e.g. per-sample adapter mixtures
    assert not m.can_share_prefix
    ranking.candidate_scores(m, rsplits.test[:2], "yes", rank_cfg.ranking, progress=False, shared=True)
    assert sum(seen) == 20  # every candidate went through the ordinary forward, hooks included
    m.batch_hooks.clear()
    m.__class__ = SplitRecLM  # its forward crosses to the server: the shared path would bypass the channel
    assert not m.can_share_prefix


# --- the train / evaluate / recommend procedures ---------------------------------------------------------
@pytest.fixture(scope="module")
def rank_run(tmp_path_factory):
    """`privrec train configs/rank-tiny.yaml` with shuffle/mask augmentation, once for the tests below."""
    from privrec.cli import main

    out = tmp_path_factory.mktemp("rank") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVREC_CACHE_DIR", str(out.parent / "cache"))
        # fp32: test_recommend_same_order_... compares two scoring paths exactly
        code = main(["--no-progress", "train", str(RANK_TINY), "--out", str(out), "--set", "model.precision=fp32",
                     "--set", "augment.shuffle=true",
                     "--set", "augment.mask=2", "--set", "augment.copies=1"])
    assert code == 0
    return out


def test_train_rank_tiny_writes_ranking_metrics(rank_run):
    m = json.loads((rank_run / "metrics.json").read_text())
    keys = ["hr@1", "hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10"]
    assert m["task"] == "ranking" and m["primary_scorer"] == "yes"
    assert all(0 <= m[k] <= 1 for k in keys)
    assert set(m["scorers"]) == {"yes", "title"} and set(m["zero_shot"]) == {"yes", "title"}
    for block in [m["scorers"]["yes"], m["scorers"]["title"], m["zero_shot"]["title"],
                  m["references"]["popularity"], m["references"]["random"]]:
        assert all(k in block for k in keys)
    assert {k: m[k] for k in keys} == {k: m["scorers"]["yes"][k] for k in keys}
    assert m["scorers"]["yes"]["hr@10"] == 1.0  # 10 candidates: the true item is always in the top 10
    assert m["n_test"] == 16 and m["n_train_augmented"] == 2 * m["n_train_samples"] == 2 * 4 * m["n_train"]
    assert m["references"]["random"]["hr@1"] == pytest.approx(0.1)
    assert len((rank_run / "predictions_test.csv").read_text().splitlines()) == 1 + 16 * 10
    assert (rank_run / "adapters" / "default" / "adapter_model.safetensors").is_file()


def test_evaluate_and_report_a_ranking_run(rank_run, capsys):
    from privrec.commands.evaluate import run_evaluate

    m = json.loads((rank_run / "metrics.json").read_text())
    again = run_evaluate(rank_run, "test", progress=False)
    for k in ("hr@1", "ndcg@5"):
        assert again["scorers"]["title"][k] == pytest.approx(m["scorers"]["title"][k])
        assert again[k] == pytest.approx(m[k])
    like = run_evaluate(rank_run, "test", progress=False, overrides=["task=like-prediction", "data.n_test=24"])
    assert 0 <= like["auc"] <= 1 and like["n"] == 24  # the ranking adapter scores like-prediction samples
    assert (rank_run / "eval_test_like-prediction.json").is_file()
    code, out, _ = run_cli(capsys, "report", str(rank_run), "--markdown")
    assert code == 0 and "NDCG@5" in out and "reference: popularity" in out and "zero-shot title" in out


def test_recommend_same_order_via_shared_prefix_and_full_prompts(rank_run):
    from privrec.commands.recommend import run_recommend

    shared = run_recommend(rank_run, user=7, top=150, max_candidates=150, progress=False)
    full = run_recommend(rank_run, user=7, top=150, max_candidates=150, progress=False, shared_prefix=False)
    assert len(shared) == 150  # > ranking.max_suffixes (64): chunked
    assert [r["item_id"] for r in shared] == [r["item_id"] for r in full]
    np.testing.assert_allclose([r["p_yes"] for r in shared], [r["p_yes"] for r in full], atol=1e-5)


# --- federated: hr@k / ndcg@k per client ---------------------------------------------------------------
def test_federated_ranking_reports_hr_per_client(tmp_path):
    from privrec.federated.config import FederatedConfig
    from privrec.federated.runner import run_federate

    raw = {"task": "ranking", "model": {"name": "tiny-random", "threads": 1},
           "data": {"n_train": 12, "n_valid": 3, "n_test": 12}, "prompt": {"template": "kv", "max_length": 768},
           "lora": {"r": 4, "alpha": 8, "top_layers": 1}, "ranking": {"negatives": 2},
           "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "schedule": "constant"},
           "federated": {"clients": 2, "partition": "random", "rounds": 1, "strategy": "fedavg"}}
    m = run_federate(parse_config(raw, FederatedConfig), tmp_path / "fed", progress=False)
    assert sum(c["n_test_users"] for c in m["clients"]) == 12
    assert sum(c["n_test"] for c in m["clients"]) == 120  # every user's 10 candidates on that user's client
    for c in m["clients"]:
        assert all(k in c for k in ("hr@1", "hr@5", "ndcg@10"))
    # the overall HR@K is the user-weighted mean of the clients'
    for k in ("hr@1", "hr@5", "ndcg@5"):
        assert m[k] == pytest.approx(sum(c[k] * c["n_test_users"] for c in m["clients"]) / 12)
    assert m["overall"]["hr@10"] == 1.0 and "ranking_balance" in m and "popularity" in m["references"]
