"""The recommendation-quality options: the counter lines in the prompt (history summary, item statistics from
training labels only), the commands that refuse item statistics, the references' label source, and the recipe
sweep script end to end on the tiny model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import benchmark_module, tiny_config

from privrec import baselines
from privrec.config import load_config, parse_config
from privrec.data import ItemStats, Sample, Splits
from privrec.errors import ConfigError
from privrec.prompts import PromptBuilder

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _sample(ratings, item=50, sid="u7-i50", label=1):
    history = tuple((i + 1, float(r)) for i, r in enumerate(ratings))
    return Sample(sid, 7, item, 0, 5.0, label, history)


# --- history summary -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("template,line", [("tallrec", "The user liked {n} of these 10 movies."),
                                           ("kv", "user history likes: {n} of 10 liked")])
def test_history_summary_counts_likes_exactly(ml100k, template, line):
    s = _sample([5, 4, 3, 2, 1, 4, 4, 5, 3, 3])  # > 3: 5, 4, 4, 4, 5
    on = parse_config({"prompt": {"template": template, "history_summary": True}}).prompt
    assert line.format(n=5) in PromptBuilder(ml100k, on).parts(s)[1]
    assert line.format(n=2) in PromptBuilder(ml100k, on, like_threshold=4.0).parts(s)[1]  # only the 5s
    off = PromptBuilder(ml100k, parse_config({"prompt": {"template": template}}).prompt).parts(s)[1]
    assert "liked 5" not in off and "5 of 10" not in off  # off by default
    head, tail = PromptBuilder(ml100k, on).input_parts(s)[1:]
    assert line.format(n=5) in head  # history-only: in the prefix every candidate of the user shares


@pytest.mark.parametrize("template,line", [("tallrec", "The user liked {n} of the 8 earliest of these movies."),
                                           ("kv", "user history likes: {n} of the earliest 8 liked")])
def test_summary_skip_recent_does_not_count_a_neighbours_label(ml100k, template, line):
    """All-users test samples of one user are consecutive: the second one's history ends with the first one's
    rating. With summary_skip_recent=2 its summary no longer moves with that label (which is what ranked a
    user's own samples against their labels); without it, it does."""
    after_like, after_dislike = _sample([5, 1, 1, 1, 1, 1, 1, 1, 5, 5]), _sample([5, 1, 1, 1, 1, 1, 1, 1, 5, 1])

    def summary(prompt: dict, s: Sample) -> str:
        pb = PromptBuilder(ml100k, parse_config({"prompt": {"template": template, "history_summary": True,
                                                            **prompt}}).prompt)
        return [ln for ln in pb.parts(s)[1].splitlines() if "The user liked" in ln or "history likes" in ln][0]

    assert line.format(n=1) in summary({"summary_skip_recent": 2}, after_like)
    assert summary({"summary_skip_recent": 2}, after_like) == summary({"summary_skip_recent": 2}, after_dislike)
    assert summary({}, after_like) != summary({}, after_dislike)  # the full count moves with the label
    with pytest.raises(ConfigError, match="summary_skip_recent"):
        parse_config({"prompt": {"summary_skip_recent": 10}})


# --- item statistics: the estimate -------------------------------------------------------------------------------
def test_item_stats_are_the_item_mean_reference_left_one_out():
    mk = lambda item, label, u: Sample(f"u{u}-i{item}", u, item, 0, 5.0 if label else 1.0, label, ())
    train = [mk(1, 1, 1), mk(1, 1, 2), mk(1, 0, 3), mk(2, 0, 1)]
    g = 2 / 4
    st = ItemStats.of(train)
    test = [mk(1, 0, 9), mk(2, 1, 9), mk(3, 1, 9)]
    np.testing.assert_allclose([st.read(s)[0] for s in test], baselines.item_mean(train, test))
    assert st.read(test[0]) == (pytest.approx((2 + 5 * g) / 8), 3)
    assert st.read(test[2]) == (pytest.approx(g), 0)
    # a counted sample reads its item without its own label: 1 like of the 2 others
    assert st.read(train[0]) == (pytest.approx((1 + 5 * g) / 7), 2)
    assert st.read(train[2]) == (pytest.approx((2 + 5 * g) / 7), 2)


def test_item_stats_line_in_both_templates(ml100k):
    mk = lambda u, label: Sample(f"u{u}-i50", u, 50, 0, 4.0, label, ())
    st = ItemStats.of([mk(u, int(u % 4 != 0)) for u in range(1, 41)])  # 30 of 40 liked item 50
    s = _sample([4] * 10, item=50, sid="u999-i50")
    pct = round(100 * (30 + 5 * 0.75) / 45)
    for template, text in [("tallrec", f"Other users liked the target movie {pct}% of the time (40 ratings)."),
                           ("kv", f"target movie like rate among other users: {pct}% (40 ratings)")]:
        cfg = parse_config({"prompt": {"template": template, "item_stats": True}}).prompt
        pb = PromptBuilder(ml100k, cfg, item_stats=st)
        _, head, tail = pb.input_parts(s)
        assert text in tail and text not in head  # target-dependent: in the suffix
    cold = PromptBuilder(ml100k, parse_config({"prompt": {"item_stats": True}}).prompt, item_stats=st)
    assert "No other user has rated the target movie yet." in cold.parts(_sample([4] * 10, item=1, sid="u9-i1"))[1]
    with pytest.raises(ValueError, match="item statistics"):
        PromptBuilder(ml100k, parse_config({"prompt": {"item_stats": True}}).prompt)


# --- item statistics: training labels only, through the run's own wiring ------------------------------------------
def _flip(s: Sample) -> Sample:
    return dataclasses.replace(s, label=1 - s.label)


def _replace(splits: Splits, *pairs: tuple[Sample, Sample]) -> Splits:
    new = {old.sample_id: s for old, s in pairs}
    swap = lambda part: [new.get(x.sample_id, x) for x in part]
    return Splits(splits.dataset, swap(splits.train), swap(splits.valid), swap(splits.test), pool=swap(splits.pool))


def test_item_stats_come_only_from_training_labels(ml100k, tiny_splits):
    from privrec.prepare import item_stats, setup_model

    cfg = tiny_config(prompt={"item_stats": True, "history_summary": True, "chat_template": False})
    sp = tiny_splits  # the same data config: the protocol's 8,000 training samples are the pool
    model = setup_model(cfg, sp)
    assert model.builder.item_stats == item_stats(cfg, sp) and len(model.builder.item_stats) == len(sp.pool)
    test_items = {s.item_id for s in sp.test}
    shown = {s.sample_id for s in sp.train + sp.valid + sp.test + [s for s in sp.pool if s.item_id in test_items]}

    def prompts(splits):
        model.builder.item_stats = item_stats(cfg, splits)
        return {s.sample_id: model.builder.text(s, model.tokenizer)
                for s in splits.pool + splits.valid + splits.test if s.sample_id in shown}

    before = prompts(sp)
    for held_out in (sp.test[0], sp.valid[0]):  # a validation or test label never reaches a prompt
        assert prompts(_replace(sp, (held_out, _flip(held_out)))) == before
    # flip a liked and a disliked training label of two items the test split asks about (the global like-rate
    # stays): exactly the prompts of those two items change, and neither flipped sample's own prompt does
    a = next(s for s in sp.pool if s.item_id in test_items and s.label == 1)
    b = next(s for s in sp.pool if s.item_id in test_items - {a.item_id} and s.label == 0)
    after = prompts(_replace(sp, (a, _flip(a)), (b, _flip(b))))
    changed = {k for k in before if after[k] != before[k]}
    everyone = sp.pool + sp.valid + sp.test
    same_items = {s.sample_id for s in everyone if s.item_id in (a.item_id, b.item_id)} - {a.sample_id, b.sample_id}
    assert changed == same_items & shown and changed & {s.sample_id for s in sp.test}
    assert before[a.sample_id] == after[a.sample_id] and before[b.sample_id] == after[b.sample_id]


def test_prompt_options_change_the_frozen_cache_keys(ml100k, tiny_splits):
    from privrec.prepare import setup_model

    keys = {}
    for name, prompt in [("off", {}), ("summary", {"history_summary": True}), ("stats", {"item_stats": True})]:
        cfg = tiny_config(lora={"top_layers": 1}, prompt=prompt)
        model = setup_model(cfg, tiny_splits)
        keys[name] = [e.key for e in model.encode(tiny_splits.test[:4])]
    assert all(a != b for a, b in zip(keys["off"], keys["summary"]))
    assert all(a != b for a, b in zip(keys["off"], keys["stats"]))


# --- refusals -----------------------------------------------------------------------------------------------------
def test_federate_and_shard_train_count_item_stats_apart_and_refuse_the_cf_projector():
    from privrec.federated.config import FederatedConfig
    from privrec.unlearning.exact.shards import ApaConfig

    fed, apa = ROOT / "configs" / "pplr-tiny.yaml", ROOT / "configs" / "apa-tiny.yaml"
    for path, cls in ((fed, FederatedConfig), (apa, ApaConfig)):
        assert load_config(path, ["prompt.history_summary=true"], cls=cls).prompt.history_summary  # own data only
        # clients and shards count the line over their own samples (tests/test_features_lineage*.py) ...
        assert load_config(path, ["prompt.item_stats=true"], cls=cls).prompt.item_stats
        # ... the CF projector not yet
        command = "federate" if cls is FederatedConfig else "shard-train"
        with pytest.raises(ConfigError, match=f"collab.inject cannot be used with {command}") as e:
            load_config(path, ["collab.inject=true"], cls=cls)
        assert "\n" not in str(e.value)


def test_ranking_refuses_item_stats():
    with pytest.raises(ConfigError, match="task ranking"):
        load_config(ROOT / "configs" / "rank-tiny.yaml", ["prompt.item_stats=true"])


# --- references: same label source as the prompts, uauc everywhere --------------------------------------------------
def test_baseline_references_learn_from_the_pool_with_item_stats(tmp_path):
    from privrec.commands.baseline import run_baseline
    from privrec.metrics import auc
    from privrec.prepare import references, setup_data

    sets = ["data.last_n=1000", "data.n_train=64", "data.n_test=100"]
    plain_cfg, pooled_cfg = load_config(TINY, sets), load_config(TINY, [*sets, "prompt.item_stats=true"])
    sp = setup_data(plain_cfg)
    assert len(sp.train) == 64 and len(sp.pool) == 800
    labels = [s.label for s in sp.test]
    for cfg, learnt_from in [(plain_cfg, sp.train), (pooled_cfg, sp.pool)]:
        refs = references(cfg, sp)
        assert refs["item-mean"]["auc"] == pytest.approx(auc(labels, baselines.item_mean(learnt_from, sp.test)))
        assert all(r.get("uauc") is not None for r in refs.values())
    m = run_baseline(pooled_cfg, tmp_path / "pooled")  # the command uses the same source
    assert m["references_train"] == 800 and m["n_train"] == 64
    assert m["references"]["item-mean"]["auc"] == pytest.approx(auc(labels, baselines.item_mean(sp.pool, sp.test)))


def test_all_users_baseline_writes_uauc_for_every_reference(tmp_path):
    from privrec.commands.baseline import run_baseline

    m = run_baseline(load_config(ROOT / "configs" / "all-users-ml100k.yaml", ["data.n_train=256",
                                                                            "prompt.item_stats=false"]), tmp_path / "b")
    assert m["references"].keys() == {"like-rate", "item-mean", "lr-onehot", "lr-onehot+like-rate",
                                      "lr-like-rate+item-mean", "mf"}
    for name, r in m["references"].items():
        assert 0 < r["uauc"] < 1 and 0 < r["auc"] < 1, name
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["n_test"] == 2829 and saved["uauc"] == pytest.approx(m["uauc"])
    # METHODS §0: the history like-rate needs no training data, so it reproduces the measured 0.746 / 0.285
    assert m["references"]["like-rate"]["auc"] == pytest.approx(0.746, abs=5e-4)
    assert m["references"]["like-rate"]["uauc"] == pytest.approx(0.285, abs=5e-4)


# --- the recipe sweep ------------------------------------------------------------------------------------------------
def test_every_shipped_recipe_loads_and_trains_within_an_hour():
    rec = benchmark_module("recipes")
    sweep = rec.load_sweep(rec.DEFAULT_RECIPES)
    assert {r.protocol for r in sweep.recipes} == {"tallrec", "all-users"}
    for r in sweep.recipes:
        cfg = rec.recipe_config(sweep, r)
        assert cfg.model.name == "smollm2-135m" and cfg.train.eval_every, r.name
        assert rec.estimate(cfg)["train"] <= 3600, r.name


def test_tallrec_config_default_is_the_chosen_recipe_and_old_runs_keep_their_configs():
    """docs/results.md says configs/tallrec-ml100k.yaml and all-users-ml100k.yaml train the sweep's choices; its
    plain recipes and the few-shot table pin the plain prompt, so their finished runs still match (a run
    directory is refused when its config's digest changes)."""
    rec = benchmark_module("recipes")
    sweep = rec.load_sweep(rec.DEFAULT_RECIPES)
    by_name = {r.name: rec.recipe_config(sweep, r) for r in sweep.recipes}
    default = load_config(ROOT / "configs" / "tallrec-ml100k.yaml", ["eval.zero_shot=false"])
    assert default.digest() == by_name["tallrec-2048-summary-stats"].digest()
    all_users = load_config(ROOT / "configs" / "all-users-ml100k.yaml", ["eval.zero_shot=false"])
    assert all_users.digest() == by_name["allusers-2048-summary-stats-alllinear-lr1e-3-vusers"].digest()
    plain = by_name["tallrec-2048"]
    assert not plain.prompt.history_summary and not plain.prompt.item_stats
    plain_pins = benchmark_module("results_core").PLAIN
    few_shot = load_config(ROOT / "configs" / "tallrec-ml100k.yaml", [*plain_pins, "data.n_train=64"])
    assert few_shot.data.n_valid == 100 and not few_shot.prompt.item_stats and few_shot.train.eval_every is None


def test_recipes_tiny_runs_end_to_end(tmp_path, capsys):
    rec = benchmark_module("recipes")
    assert rec.main(["--tiny", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tiny = yaml.safe_load((ROOT / "benchmarks" / "recipes.yaml").read_text())["tiny"]["recipes"]
    rows = [line for line in out.splitlines() if line.startswith("| ") and "not run" not in line]
    assert len(rows) == 1 + len(tiny)  # the header and one finished row per tiny recipe
    for name in tiny:
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["curve"] and m["curve"][-1]["samples_seen"] == m["history"][-1]["samples_seen"]
        assert any(line.startswith(f"| {name} |") and f"{m['auc']:.4f}" in line for line in rows)
    png = (tmp_path / rec.plot_name(rec.DEFAULT_RECIPES)).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    stamp = {n: (tmp_path / n / "metrics.json").stat().st_mtime_ns for n in tiny}
    assert rec.main(["--tiny", "--runs", str(tmp_path), "--only", tiny[0]]) == 0  # finished runs are reused
    assert stamp == {n: (tmp_path / n / "metrics.json").stat().st_mtime_ns for n in tiny}
    with pytest.raises(SystemExit):
        rec.main(["--tiny", "--out", str(tmp_path / "results.md")])
    assert not (tmp_path / "results.md").exists()
    # --report trains nothing: the finished runs are listed, a folder without runs lists every recipe "not run"
    assert rec.main(["--tiny", "--runs", str(tmp_path), "--report"]) == 0
    assert stamp == {n: (tmp_path / n / "metrics.json").stat().st_mtime_ns for n in tiny}
    assert sum(line.startswith(f"| {n} |") for n in tiny for line in capsys.readouterr().out.splitlines()) == len(tiny)
    empty = tmp_path / "empty"
    assert rec.main(["--tiny", "--runs", str(empty), "--report"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert len(rows) == len(tiny) and all("not run" in line for line in rows)
    assert not any((empty / n).exists() for n in tiny)


def test_recipe_record_keeps_rows_a_new_machine_has_no_runs_for(tmp_path, capsys):
    """Run directories do not outlive the machine: the committed record carries a finished recipe's row to a
    checkout without its run, and drops it once the recipe's config changes."""
    rec = benchmark_module("recipes")
    record = tmp_path / "record.json"
    name = yaml.safe_load((ROOT / "benchmarks" / "recipes.yaml").read_text())["tiny"]["recipes"][0]
    assert rec.main(["--tiny", "--runs", str(tmp_path / "a"), "--only", name, "--record", str(record)]) == 0
    auc = json.loads((tmp_path / "a" / name / "metrics.json").read_text())["auc"]
    assert set(json.loads(record.read_text())["recipes"]) == {name}
    capsys.readouterr()
    assert rec.main(["--tiny", "--runs", str(tmp_path / "fresh"), "--report", "--record", str(record)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {name} |")]
    assert len(row) == 1 and f"{auc:.4f}" in row[0] and "not run" not in row[0]
    assert not (tmp_path / "fresh" / name).exists()
    data = json.loads(record.read_text())
    data["recipes"][name]["config"]["train"]["lr"] *= 2  # the recipe changed since it was measured
    record.write_text(json.dumps(data))
    assert rec.main(["--tiny", "--runs", str(tmp_path / "fresh"), "--report", "--record", str(record)]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {name} |")]
    assert "not run" in row[0]


@pytest.mark.parametrize("recipes", ["recipes.yaml", "recipes-gpu.yaml"])
def test_shipped_recipe_record_matches_the_recipes(recipes):
    """Every recipe in a shipped record (benchmarks/recipes-measured.json, benchmarks/recipes-gpu-measured.json)
    resolves to the config it was measured with (a changed recipe or config default would silently drop its row
    from docs/results.md)."""
    rec = benchmark_module("recipes")
    sweep = rec.load_sweep(ROOT / "benchmarks" / recipes)
    record = rec.read_record(rec.default_record(recipes))
    by_name = {r.name: r for r in sweep.recipes}
    assert record and set(record) <= set(by_name)
    for name, entry in record.items():
        assert rec.recorded(entry, rec.recipe_config(sweep, by_name[name])) is not None, name


def test_recipes_cache_only_fills_the_cache_and_trains_nothing(tmp_path, monkeypatch):
    rec = benchmark_module("recipes")
    monkeypatch.setenv("PRIVREC_CACHE_DIR", str(tmp_path / "cache"))
    name = yaml.safe_load((ROOT / "benchmarks" / "recipes.yaml").read_text())["tiny"]["recipes"][0]
    assert rec.main(["--tiny", "--runs", str(tmp_path / "runs"), "--only", name, "--cache-only"]) == 0
    assert not (tmp_path / "runs").exists()
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    sweep = rec.load_sweep(rec.DEFAULT_RECIPES)
    cfg = rec.recipe_config(sweep, next(r for r in sweep.recipes if r.name == name), sweep.tiny["set"])
    assert len(cached) >= cfg.data.n_train + cfg.data.n_valid  # a file per distinct prompt (test ones too)


# --- why within-user AUC stays low (benchmarks/within_user.py) ---------------------------------------------------
def test_full_history_like_rate_ranks_a_users_consecutive_samples_against_their_labels(ml100k):
    """docs/results.md's explanation of the all-users UAUC: the last items of a test sample's window are the
    user's earlier test/validation ratings, so the full like-rate is below chance within users, and leaving the
    2 latest out removes that (the counters table of benchmarks/within_user.py)."""
    from privrec.data.samples import all_users_split
    from privrec.metrics import uauc

    wu = benchmark_module("within_user")
    pool, _, test = all_users_split(ml100k)
    y, users = [s.label for s in test], [s.user_id for s in test]
    assert uauc(users, y, wu.recent_like_rate(test, 3.0, 0)) < 0.35
    assert 0.45 < uauc(users, y, wu.recent_like_rate(test, 3.0, 2)) < 0.55
    um = wu.user_mean(pool, test)
    assert all(len({v for v, u in zip(um, users) if u == user}) == 1 for user in set(users[:60]))  # per user
    own_out = wu.user_mean(pool, pool[:1])[0]  # a pool sample's own label is left out
    with_own = wu.user_mean(pool, [dataclasses.replace(pool[0], sample_id="not-in-pool", source_id="not-in-pool")])[0]
    assert own_out != with_own


def test_within_user_departures_say_who_is_right(tmp_path, ml100k):
    """A model that orders every pair as the item line does only has 'follows' pairs, one that reverses it only
    'departs' pairs, and the model is right exactly where the line is wrong."""
    from privrec.prepare import item_stats, setup_data
    from privrec.rundir import RunDir

    wu = benchmark_module("within_user")
    cfg = tiny_config(data={"protocol": "all-users", "n_train": 64, "n_test": 300, "eval_draw": "users"},
                      prompt={"item_stats": True})
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    sp = setup_data(cfg)
    stats = item_stats(cfg, sp)
    for sign, row in ((1, "follows the item line"), (-1, "departs from the item line")):
        with open(tmp_path / "run" / "predictions_test.csv", "w") as f:
            f.write("sample_id,user_id,item_id,label,p_yes\n")
            for s in sp.test:
                f.write(f"{s.sample_id},{s.user_id},{s.item_id},{s.label},{0.5 + sign * stats.read(s)[0] / 3}\n")
        table = [line for line in wu.departures_table(str(tmp_path / "run")).splitlines() if line.startswith("| ")
                 and "pairs" not in line]
        assert len(table) == 1 and table[0].startswith(f"| {row} |")
        n, model_right, line_right = table[0].split(" | ")[1:4]
        assert int(n) > 20 and abs(float(model_right) - (float(line_right) if sign > 0 else 1 - float(line_right))) \
            < 1e-3
