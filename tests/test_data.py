"""Data layer: the protocols' time order, history before target, sources, augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from privrec.config import parse_config
from privrec.data import KV_FIELDS, augment, build_splits, load_dataset, windows
from privrec.data.movielens import clean_title
from privrec.data.samples import all_users_split, tallrec_split
from privrec.errors import DataError


def _positions(ds):
    """(user, item) -> position in the user's time-ordered sequence."""
    pos = {}
    for u, g in ds.inter.groupby("user_id", sort=False):
        for k, i in enumerate(g["item_id"].tolist()):
            pos[(u, i)] = k
    return pos


def test_ml100k_is_the_real_dataset(ml100k):
    assert len(ml100k.inter) == 100_000
    assert len(ml100k.items) == 1682 and len(ml100k.users) == 943
    assert ml100k.items[1].title == "Toy Story"
    assert "The Usual Suspects" in {it.title for it in ml100k.items.values()}


def test_clean_title_moves_article_and_year():
    assert clean_title("Usual Suspects, The (1995)") == ("The Usual Suspects", "1995")
    assert clean_title("Toy Story") == ("Toy Story", "")


def test_history_strictly_before_target(ml100k):
    pos = _positions(ml100k)
    times = {(r.user_id, r.item_id): r.timestamp for r in ml100k.inter.itertuples()}
    tr, va, te = tallrec_split(ml100k)
    for s in tr[::97] + va[::13] + te[::13]:
        assert len(s.history) == 10
        p_target = pos[(s.user_id, s.item_id)]
        hist_pos = [pos[(s.user_id, i)] for i, _ in s.history]
        assert hist_pos == list(range(p_target - 10, p_target))  # the 10 immediately before, in order
        assert all(times[(s.user_id, i)] <= s.timestamp for i, _ in s.history)


def test_tallrec_split_sizes_and_time_order(ml100k):
    tr, va, te = tallrec_split(ml100k)
    assert (len(tr), len(va), len(te)) == (8000, 1000, 1000)
    assert max(s.timestamp for s in tr) <= min(s.timestamp for s in va)
    assert max(s.timestamp for s in va) <= min(s.timestamp for s in te)
    assert all(s.label == int(s.rating > 3) for s in tr + va + te)


def test_all_users_split_matches_published_counts(ml100k):
    tr, va, te = all_users_split(ml100k)
    assert (len(tr), len(va), len(te)) == (84_912, 2_829, 2_829)
    pos = _positions(ml100k)
    last_valid = {}
    for s in va:
        last_valid[s.user_id] = max(last_valid.get(s.user_id, -1), pos[(s.user_id, s.item_id)])
    for s in te[::7]:  # every test target comes after all of the user's validation targets
        assert pos[(s.user_id, s.item_id)] > last_valid[s.user_id]


def test_history_gap_hides_the_other_test_labels(ml100k):
    """data.history_gap=2: each history is the 10 ratings ending 2 before the target, so on all-users no test
    prompt shows another test sample of its user, the test targets stay the same 2,829, and the like-rate of the
    prompt's history no longer counts the neighbours' labels (with 0, every user's 2nd and 3rd test samples
    show the 1st)."""
    pos = _positions(ml100k)
    _, _, plain = all_users_split(ml100k)
    tr, va, te = all_users_split(ml100k, gap=2)
    assert [s.sample_id for s in te] == [s.sample_id for s in plain] and len(va) == 2_829
    assert len(tr) == 84_912 - 2 * 943  # each user's first 2 targets lose their full history
    for s in tr[::101] + te:
        p_target = pos[(s.user_id, s.item_id)]
        assert [pos[(s.user_id, i)] for i, _ in s.history] == list(range(p_target - 12, p_target - 2))
    test_items = {}
    for s in te:
        test_items.setdefault(s.user_id, set()).add(s.item_id)
    assert not any(i in test_items[s.user_id] for s in te for i, _ in s.history)
    assert sum(i in test_items[s.user_id] for s in plain for i, _ in s.history) == 3 * 943
    cfg = parse_config({"data": {"protocol": "all-users", "history_gap": 2, "n_train": 8}}).data
    assert [s.history for s in build_splits(ml100k, cfg, 0).test] == [s.history for s in te]


def test_ranking_refuses_history_gap():
    from privrec.errors import ConfigError

    with pytest.raises(ConfigError, match="history_gap"):
        parse_config({"task": "ranking", "data": {"history_gap": 2}})


def test_subsets_are_seeded_and_test_is_fixed(ml100k):
    cfg = parse_config({"data": {"n_train": 64, "n_valid": 20, "n_test": 50}}).data
    a, b, c = build_splits(ml100k, cfg, 0), build_splits(ml100k, cfg, 0), build_splits(ml100k, cfg, 1)
    ids = lambda xs: [s.sample_id for s in xs]
    assert ids(a.train) == ids(b.train) and ids(a.train) != ids(c.train)
    assert ids(a.test) == ids(c.test)  # the test subset does not move with the training seed
    assert len(a.train) == 64 and len(a.test) == 50


def test_eval_draw_by_users_takes_whole_users(ml100k):
    """All-users validation drawn by users keeps every user's 3 samples, so within-user AUC has users to rank;
    drawn by samples, 300 of the 2,829 scatter over ~264 users with only a handful ranked."""
    from collections import Counter

    from privrec.metrics import uauc

    def users_with_both(samples):
        labels: dict[int, set[int]] = {}
        for s in samples:
            labels.setdefault(s.user_id, set()).add(s.label)
        return sum(len(v) == 2 for v in labels.values())

    by = {d: build_splits(ml100k, parse_config({"data": {"protocol": "all-users", "n_train": 64, "n_valid": 300,
                                                         "n_test": 30, "eval_draw": d}}).data, 0)
          for d in ("samples", "users")}
    users = by["users"]
    per_user = Counter(s.user_id for s in users.valid)
    assert len(users.valid) == 300 and len(per_user) == 100 and set(per_user.values()) == {3}
    assert users.valid == build_splits(ml100k, parse_config({"data": {
        "protocol": "all-users", "n_train": 8, "n_valid": 300, "eval_draw": "users"}}).data, 1).valid  # sample_seed
    assert len({s.user_id for s in by["samples"].valid}) > 200
    assert users_with_both(users.valid) > 3 * users_with_both(by["samples"].valid)
    scores = np.random.default_rng(0).random(len(users.valid))  # UAUC is defined on these users
    assert not np.isnan(uauc([s.user_id for s in users.valid], [s.label for s in users.valid], scores))
    assert len(users.test) == 30 and len({s.user_id for s in users.test}) == 10  # n_test: whole users too


def test_exclude_removes_samples_before_drawing(ml100k):
    cfg = parse_config({}).data
    full = build_splits(ml100k, cfg, 0)
    gone = {s.sample_id for s in full.train[:10]}
    cut = build_splits(ml100k, cfg, 0, exclude=gone)
    assert not gone & {s.sample_id for s in cut.train}
    assert len(cut.train) == len(full.train) - 10


def test_augmented_copy_keeps_label_history_and_target(tiny_splits):
    base = tiny_splits.train[:20]
    out = augment(base, shuffle=True, mask=3, copies=4, seed=0)
    assert len(out) == 20 * 5
    by_src = {}
    for s in out:
        by_src.setdefault(s.source_id, []).append(s)
    for orig in base:
        copies = [s for s in by_src[orig.sample_id] if s is not orig]
        assert len(copies) == 4
        for c in copies:
            assert (c.label, c.history, c.item_id, c.user_id) == (orig.label, orig.history, orig.item_id,
                                                                  orig.user_id)
            assert sorted(c.view.order) == sorted(KV_FIELDS)
            assert len(c.view.dropped) == 3 and "history" not in c.view.dropped
    assert len({s.view.order for s in out if s.view.order}) > 10  # orders really vary


def test_shuffle_changes_prompt_not_label(ml100k, tiny_splits):
    from privrec.prompts import PromptBuilder

    cfg = parse_config({"prompt": {"template": "kv", "chat_template": False}})
    pb = PromptBuilder(ml100k, cfg.prompt)
    s = tiny_splits.train[0]
    copies = augment([s], shuffle=True, mask=0, copies=4, seed=3)[1:]
    orig_lines = set(pb.text(s, None).splitlines())
    for c in copies:
        assert set(pb.text(c, None).splitlines()) == orig_lines  # same pairs, other order
        assert c.label == s.label
    masked = augment([s], shuffle=False, mask=4, copies=1, seed=3)[1]
    text = pb.text(masked, None)
    assert "user history:" in text
    assert sum(line.split(":")[0] in {"user gender", "user age", "user occupation", "target movie title",
                                      "target movie genres", "target movie year"}
               for line in text.splitlines()) == 2


def test_windows_cover_each_user_once(ml100k):
    per_user = windows(ml100k, 10, 3.0)
    counts = ml100k.inter.groupby("user_id").size().to_numpy()
    assert [len(w) for w in per_user] == list(np.maximum(counts - 10, 0))


def test_grouplens_and_ml1m_folders(tmp_path):
    g = tmp_path / "gl"
    g.mkdir()
    (g / "u.data").write_text("1\t1\t5\t100\n1\t2\t2\t101\n")
    genres = "|".join(["0"] * 5 + ["1"] + ["0"] * 13)
    (g / "u.item").write_text(f"1|Toy Story (1995)|01-Jan-1995||http://x|{genres}\n"
                              f"2|Usual Suspects, The (1995)|14-Aug-1995||http://y|{genres}\n")
    (g / "u.user").write_text("1|24|M|technician|85711\n")
    ds = load_dataset("ml-100k-grouplens", str(g))
    assert ds.items[2].title == "The Usual Suspects" and ds.items[1].genres == ("Comedy",)
    m = tmp_path / "m1"
    m.mkdir()
    (m / "ratings.dat").write_text("1::1::5::978300760\n1::2::3::978300761\n")
    (m / "movies.dat").write_text("1::Toy Story (1995)::Animation|Comedy\n2::Heat (1995)::Action\n")
    (m / "users.dat").write_text("1::F::25::12::48067\n")
    ds = load_dataset("ml-1m", str(m))
    assert ds.users[1].occupation == "programmer" and ds.users[1].age == "25-34"
    assert ds.items[1].genres == ("Animation", "Comedy")


def test_malformed_rows_raise_data_error(tmp_path):
    g = tmp_path / "gl"
    g.mkdir()
    (g / "u.data").write_text("1\tone\t5\t100\n")
    (g / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||x|" + "|".join(["0"] * 19) + "\n")
    (g / "u.user").write_text("1|24|M|technician|85711\n")
    with pytest.raises(DataError, match="malformed"):
        load_dataset("ml-100k-grouplens", str(g))
    with pytest.raises(DataError, match="not found"):
        load_dataset("ml-1m", str(tmp_path / "nope"))


def test_ranking_refuses_eval_draw_by_users():
    from privrec.errors import ConfigError

    with pytest.raises(ConfigError, match="eval_draw"):  # ranking draws users already: say so, don't ignore it
        parse_config({"task": "ranking", "data": {"eval_draw": "users"}})
