"""``data.source: table`` (issue 31): the schema file, ``privrec data check`` and its one-line refusals, the
readers of every format, the MovieLens export's round trip, and the generated books catalogue (prompts over its
keys, references that beat chance, the attribute partition by a user field). No model: fast."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from privrec.cli import main
from privrec.data import augment, build_splits
from privrec.data.export import write_books, write_table
from privrec.data.table import load_table
from privrec.errors import DataError

SCHEMA = {
    "name": "shop", "noun": "book", "verb": "read",
    "interactions": {"file": "inter.csv", "user_id": "uid", "item_id": "iid", "timestamp": "when",
                     "timestamp_format": "%Y-%m-%d", "rating": "stars"},
    "items": {"file": "items.csv", "id": "iid", "title": "name",
              "fields": ["author", {"column": "tags", "list": True, "separator": "|"}]},
    "users": {"file": "users.csv", "id": "uid", "fields": ["country"]},
}
INTER = "uid,iid,stars,when\n1,1,5,2023-01-01\n1,2,2,2023-01-02\n2,1,4,2023-01-03\n2,3,1,2023-01-04\n"
ITEMS = "iid,name,author,tags\n1,Dune,Herbert,scifi|classic\n2,Emma,Austen,romance\n3,Ulysses,Joyce,\n"
USERS = "uid,country\n1,UK\n2,France\n"


HAVE_PYARROW = importlib.util.find_spec("pyarrow") is not None


def _with(**patch) -> dict:
    return {k: {**v, **patch.get(k, {})} if isinstance(v, dict) else v for k, v in SCHEMA.items()}


def write(folder: Path, schema=None, inter=INTER, items=ITEMS, users=USERS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "schema.yaml").write_text(yaml.safe_dump(schema or SCHEMA))
    for name, text in (("inter.csv", inter), ("items.csv", items), ("users.csv", users)):
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


def test_a_small_table_loads_into_the_dataset_the_prompts_read(tmp_path):
    ds, report = load_table(write(tmp_path / "d"))
    assert ds.name == "shop" and len(ds.inter) == 4
    assert ds.items[1].title == "Dune" and ds.items[1].get("tags") == ("scifi", "classic")
    assert ds.items[3].get("tags") == () and ds.users[2].get("country") == "France"
    assert ds.inter["timestamp"].iloc[0] == pd.Timestamp("2023-01-01", tz="UTC").timestamp()
    assert ds.schema.kv_keys() == ("country", "history", "title", "author", "tags")
    assert ds.schema.kv_names()["author"] == "target book author"
    assert report.repeated == 0 and report.unrated_items == 0


def test_a_label_column_becomes_ratings_the_like_rule_reads_and_repeats_keep_the_latest(tmp_path, capsys):
    schema = {**SCHEMA, "interactions": {**SCHEMA["interactions"], "rating": None, "label": "liked"}}
    inter = "uid,iid,liked,when\n1,1,1,2023-01-01\n1,2,0,2023-01-02\n1,1,0,2023-01-05\n2,3,1,2023-01-04\n"
    ds, report = load_table(write(tmp_path / "d", schema, inter))
    assert report.repeated == 1  # user 1's first reading of item 1 is dropped, the latest (label 0) kept
    got = {(u, i): r for u, i, r in ds.inter[["user_id", "item_id", "rating"]].itertuples(index=False)}
    assert got == {(1, 2): 1.0, (1, 1): 1.0, (2, 3): 5.0}
    assert main(["data", "check", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "like rate 33.3% (label 1)" in out and "1 repeated (user, book) interactions dropped" in out
    assert "warning: no user has more than 10 interactions" in out


def _latin1(folder):
    (folder / "items.csv").write_bytes(ITEMS.replace("Emma", "Émma").encode("latin-1"))


def _schema(**patch):
    def f(folder):
        s = yaml.safe_load((folder / "schema.yaml").read_text())
        for k, v in patch.items():
            s[k] = {**s[k], **v} if isinstance(v, dict) else v
        (folder / "schema.yaml").write_text(yaml.safe_dump(s))
    return f


def _file(name, text):
    def f(folder):
        (folder / name).write_text(text)
    return f


# (case, how to break the good table, what the one line must say)
BROKEN = [
    ("missing column", _file("inter.csv", INTER.replace("stars", "score")), ["inter.csv", "no column 'stars'"]),
    ("duplicate item id", _file("items.csv", ITEMS + "2,Persuasion,Austen,romance\n"),
     ["items.csv line 5", "item id 2 appears again (first at line 3)"]),
    ("duplicate user id", _file("users.csv", USERS + "1,Spain\n"), ["users.csv line 4", "user id 1 appears again"]),
    ("rated item without a record", _file("inter.csv", INTER + "2,99,3,2023-02-01\n"),
     ["inter.csv line 6", "item 99 has no record in items.csv"]),
    ("unparseable timestamp", _file("inter.csv", INTER.replace("2023-01-03", "2023-13-45")),
     ["inter.csv line 4", "'2023-13-45' is not a timestamp", "%Y-%m-%d"]),
    ("empty file", _file("inter.csv", ""), ["inter.csv", "empty file"]),
    ("header only", _file("items.csv", "iid,name,author,tags\n"), ["items.csv", "no rows below the header"]),
    ("wrong separator", _file("items.csv", ITEMS.replace(",", ";")),
     ["items.csv", "separated by ';'", "items.separator"]),
    ("non-UTF-8 text", _latin1, ["items.csv line 3", "not UTF-8", "re-save"]),
    ("label outside 0/1", lambda f: (_schema(interactions={"rating": None, "label": "stars"})(f)),
     ["inter.csv line 2", "label '5' is not 0 or 1"]),
    ("non-integer id", _file("inter.csv", INTER.replace("2,3,1", "2,x3,1")),
     ["inter.csv line 5", "'x3' is not an integer id"]),
    ("rating not a number", _file("inter.csv", INTER.replace("1,2,2,", "1,2,two,")),
     ["line 3", "'two' is not a number"]),
    ("missing file", lambda f: (f / "users.csv").unlink(), ["users.csv", "file not found", "users.file"]),
    ("ragged rows", _file("items.csv", ITEMS + "4,A,B,c,d,e\n"), ["items.csv", "malformed rows", "separator"]),
    ("both rating and label", _schema(interactions={"label": "stars"}),
     ["schema.yaml", "exactly one of interactions.rating and interactions.label"]),
    ("unknown schema key", _schema(items={"titel": "name"}), ["schema.yaml", "items.titel"]),
    ("field named twice", _schema(users={"fields": ["author"]}), ["schema.yaml", "'author' is named twice"]),
    ("no schema", lambda f: (f / "schema.yaml").unlink(), ["no schema file"]),
]


@pytest.mark.parametrize("case,breaks,says", BROKEN, ids=[b[0] for b in BROKEN])
def test_data_check_refuses_each_malformed_input_with_one_line_and_writes_nothing(tmp_path, capsys, case, breaks,
                                                                                    says):
    folder = write(tmp_path / "d")
    breaks(folder)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    assert main(["data", "check", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in says:
        assert fragment in err, (case, err)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before


def test_every_format_reads_to_the_same_dataset(tmp_path):
    base = write(tmp_path / "csv")
    want, _ = load_table(base)
    frames = {n: pd.read_csv(base / n, dtype=str, keep_default_na=False) for n in ("inter.csv", "items.csv",
                                                                                     "users.csv")}
    writers = {"tsv": lambda df, p: df.to_csv(p, sep="\t", index=False),
               "jsonl": lambda df, p: df.to_json(p, orient="records", lines=True)}
    if HAVE_PYARROW:
        writers["parquet"] = lambda df, p: df.to_parquet(p, index=False)
    for fmt, w in writers.items():
        folder = tmp_path / fmt
        folder.mkdir()
        schema = yaml.safe_load((base / "schema.yaml").read_text())
        for section, name in (("interactions", "inter.csv"), ("items", "items.csv"), ("users", "users.csv")):
            new = name.replace(".csv", f".{fmt}")
            w(frames[name], folder / new)
            schema[section]["file"] = new
        (folder / "schema.yaml").write_text(yaml.safe_dump(schema))
        got, _ = load_table(folder / "schema.yaml")
        pd.testing.assert_frame_equal(got.inter, want.inter)
        assert (got.items, got.users, got.schema) == (want.items, want.users, want.schema), fmt


@pytest.mark.skipif(HAVE_PYARROW, reason="pyarrow is installed: Parquet is read (the test above)")
def test_parquet_without_pyarrow_is_one_line_saying_so(tmp_path):
    folder = write(tmp_path / "d", _with(items={"file": "items.parquet"}))
    (folder / "items.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"items.parquet: reading Parquet needs pyarrow \(pip install pyarrow"):
        load_table(folder)


def test_the_movielens_export_reads_back_as_the_embedded_dataset(ml100k, tmp_path, capsys):
    assert main(["data", "export", "ml-100k", str(tmp_path / "ml")]) == 0
    ds, report = load_table(tmp_path / "ml")
    pd.testing.assert_frame_equal(ds.inter, ml100k.inter)
    assert ds.items == ml100k.items and ds.users == ml100k.users and ds.schema == ml100k.schema
    assert ds.name == ml100k.name and report.repeated == 0
    assert main(["data", "export", "ml-100k", str(tmp_path / "ml")]) == 2  # never over an existing folder
    assert "not empty" in capsys.readouterr().err


@pytest.fixture(scope="module")
def books_dir(tmp_path_factory):
    return write_books(tmp_path_factory.mktemp("books") / "books").parent


@pytest.fixture(scope="module")
def books(books_dir):
    return load_table(books_dir)[0]


def test_the_books_example_is_deterministic_and_data_check_summarises_it(books_dir, tmp_path, capsys):
    again = write_books(tmp_path / "again").parent
    for name in ("schema.yaml", "interactions.csv", "books.csv", "readers.csv"):
        assert (again / name).read_bytes() == (books_dir / name).read_bytes(), name
    assert main(["data", "check", str(books_dir)]) == 0
    out = capsys.readouterr().out
    for fragment in ("300 users", "240 of 240 books rated", "like rate", "time span 2023-", "item subjects",
                     "list", "user age_band ('age')", "left out:", "ok: use it with data.source=table"):
        assert fragment in out, fragment


def test_books_prompts_show_every_key_with_the_noun_and_shuffle_and_mask_over_them(books):
    from privrec.config import parse_config
    from privrec.prompts import PromptBuilder

    cfg = parse_config({"prompt": {"template": "kv"}, "data": {"n_train": 20, "n_test": 5, "n_valid": 5}})
    sp = build_splits(books, cfg.data, 0)
    pb = PromptBuilder(books, cfg.prompt)
    s = sp.train[0]
    head, tail = pb.kv_input_parts(s)
    it, user = books.items[s.item_id], books.users[s.user_id]
    assert f"user country: {user.get('country')}\nuser age: {user.get('age_band')}\nuser history: " in head
    assert f'target book title: "{it.title}"\ntarget book author: {it.get("author")}\n' in tail
    assert f"target book price: {it.get('price_band')}\n" in tail
    assert tail.endswith("Will the user like the target book?")
    assert "movie" not in head + tail
    keys = books.schema.kv_keys()
    copies = augment(sp.train[:5], True, 3, 2, 0, keys)
    for c in copies:
        if c.view.order is None:
            continue
        assert sorted(c.view.order) == sorted(keys) and len(c.view.dropped) == 3 and "history" not in c.view.dropped
        text = "".join(pb.kv_input_parts(c))
        for k in c.view.dropped:
            assert f"{books.schema.kv_names()[k]}:" not in text
    tallrec = PromptBuilder(books, parse_config({"prompt": {"template": "tallrec"}}).prompt)
    assert tallrec.parts(s)[0].endswith('whether the user will like the target book by answering "Yes." or "No.".')
    assert "Which candidate book will the user read next?" in tallrec.next_item_input(s.user_id, s.history, [1, 2])


def test_the_references_learn_the_planted_preferences_of_the_books(books):
    from privrec.baselines import references
    from privrec.config import parse_config

    cfg = parse_config({"data": {"protocol": "all-users"}})
    sp = build_splits(books, cfg.data, 0)
    m = references(books, sp.train, sp.test, 3.0, 0, sp.valid)
    assert m["lr-onehot"]["auc"] > 0.65 and m["mf"]["auc"] > 0.65, {k: v["auc"] for k, v in m.items()}


def test_the_attribute_partition_groups_by_any_user_field(books):
    from privrec.errors import ConfigError
    from privrec.federated.partition import attribute_partition

    users = sorted(books.users)
    parts = attribute_partition(books, users, 3, "country")
    by_country: dict[str, set] = {}
    for u, c in parts.items():
        by_country.setdefault(books.users[u].get("country"), set()).add(c)
    assert all(len(cs) == 1 for cs in by_country.values()) and set(parts.values()) == {0, 1, 2}
    with pytest.raises(ConfigError, match="not a user field of books"):
        attribute_partition(books, users, 3, "occupation")


def test_write_table_round_trips_a_table_source(books, tmp_path):
    ds, _ = load_table(write_table(books, tmp_path / "copy"))
    pd.testing.assert_frame_equal(ds.inter, books.inter)
    assert (ds.items, ds.users, ds.schema) == (books.items, books.users, books.schema)
    with pytest.raises(DataError):
        load_table(tmp_path / "nowhere")
    shutil.rmtree(tmp_path / "copy")
    assert np.isfinite(books.inter["timestamp"]).all()


def test_federate_split_data_writes_each_clients_rows_of_a_table_source_in_the_table_format(books_dir, books,
                                                                                           tmp_path):
    from privrec.config import load_config
    from privrec.federated.client_data import load_client_data, split_data
    from privrec.federated.config import FederatedConfig

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "pplr-tiny.yaml"),
                      ["data.source=table", f"data.path={books_dir}", "federated.partition=by-attribute",
                       "federated.attribute=country"], cls=FederatedConfig)
    content = split_data(cfg, tmp_path / "fed")  # it rebuilds every client's samples from its folder and compares
    for c, folder in content["folders"].items():
        ds, _ = load_table(tmp_path / "fed" / folder)
        mine = {int(u) for u, cc in content["assignment"].items() if cc == int(c)}
        assert set(ds.inter["user_id"]) <= mine and set(ds.users) <= mine and ds.items == books.items
        others = {int(u) for u, cc in content["assignment"].items() if cc != int(c)}
        country = {u: r.get("country") for u, r in books.users.items()}
        assert {country[u] for u in mine} & {country[u] for u in others} == set()  # grouped by country
        assert load_client_data(tmp_path / "fed" / folder, cfg).client == int(c)
