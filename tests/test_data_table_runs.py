"""Runs on a table source with the tiny random Llama (issue 31): a run on the MovieLens export equals the run on
the embedded copy, and the generated books catalogue lives a model's whole life (train, evaluate, recommend,
forget, verify). The tiny model is no recommender: these tests check plumbing and identity, not quality."""

from __future__ import annotations

import json
from pathlib import Path

from privrec.cli import main
from privrec.data.table import load_table
from privrec.recommender import Recommender, open_model

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
# kv with InstructMK shuffle + mask: the augmented views run over the schema's keys too
KV = ["--set", "train.epochs=1", "--set", "model.precision=fp32", "--set", "eval.zero_shot=false",
      "--set", "prompt.template=kv", "--set", "augment.shuffle=true", "--set", "augment.mask=2",
      "--set", "augment.copies=1"]


def _timeless(x):
    if isinstance(x, dict):
        return {k: _timeless(v) for k, v in x.items() if "second" not in k}
    if isinstance(x, list):
        return [_timeless(v) for v in x]
    return x


def _adapters(run: Path) -> list[dict]:
    return [{k: a[k] for k in ("name", "sample_ids", "lineage_sha256", "tensors_sha256")}
            for a in json.loads((run / "model.json").read_text())["adapters"]]


def test_a_run_on_the_movielens_export_equals_the_run_on_the_embedded_copy(tmp_path):
    export = tmp_path / "ml-export"
    assert main(["data", "export", "ml-100k", str(export)]) == 0
    embedded, table = tmp_path / "embedded", tmp_path / "table"
    assert main(["--no-progress", "train", TINY, "--out", str(embedded), *KV]) == 0
    assert main(["--no-progress", "train", TINY, "--out", str(table), *KV, "--set", "data.source=table",
                 "--set", f"data.path={export}"]) == 0
    a, b = (_timeless(json.loads((r / "metrics.json").read_text())) for r in (embedded, table))
    assert a == b
    assert _adapters(embedded) == _adapters(table)
    assert (embedded / "predictions_test.csv").read_bytes() == (table / "predictions_test.csv").read_bytes()


def test_the_books_catalogue_trains_recommends_and_forgets(tmp_path, capsys):
    books = tmp_path / "books"
    assert main(["data", "example", "books", str(books)]) == 0
    run = tmp_path / "run"
    assert main(["--no-progress", "train", TINY, "--out", str(run), *KV, "--set", "data.source=table",
                 "--set", f"data.path={books}"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_test"] == 64 and {"mf", "lr-onehot"} <= set(metrics["references"])
    assert main(["--no-progress", "evaluate", str(run)]) == 0
    capsys.readouterr()
    assert main(["--no-progress", "recommend", str(run), "--user", "7", "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(maxsplit=2) for line in out.splitlines() if line.strip()]
    titles = {r[2] for r in rows if r[0] in "123"}
    book_titles = {it.title for it in load_table(books)[0].items.values()}
    assert len(titles) == 3 and titles <= book_titles, out  # a book's title, with no empty '()' after it
    ids = _adapters(run)[0]["sample_ids"]
    victim = int(ids[0][1:].split("-")[0])
    assert main(["--no-progress", "forget", str(run), "--users", str(victim)]) == 0
    after = _adapters(run)[0]["sample_ids"]
    assert after and not any(i.startswith(f"u{victim}-") for i in after)
    assert main(["--no-progress", "forget", str(run), "--verify"]) == 0
    assert "verified: all checks passed" in capsys.readouterr().out

    # new data over time: the manifest recorded the source's files; appended rows are detected, and rows of the
    # forgotten user that reappear in the newer copy are left out and reported
    assert set(json.loads((run / "model.json").read_text())["data_files"]) == {"schema", "interactions", "items",
                                                                               "users"}
    assert main(["data", "status", str(run)]) == 0
    assert "the source is the one the model was trained on" in capsys.readouterr().out
    with open(books / "interactions.csv", "a") as f:
        f.write(f"{victim},1,5,2024-02-01 10:00:00\n{victim},2,5,2024-02-02 10:00:00\n1,3,4,2024-02-03 10:00:00\n")
    assert main(["data", "status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "interactions (interactions.csv): 3 rows appended since training" in out
    assert "items (books.csv): unchanged" in out and "train a new model" in out
    assert f"dropped: 2 rows of forgotten users {victim} are in the source now" in out
    assert main(["recommend", str(run), "--user", str(victim)]) == 2
    assert f"user {victim} was forgotten by deletion request" in capsys.readouterr().err
    md = open_model(run)
    assert {(victim, 1), (victim, 2)} <= md.tombstones
    seen = md.seen(md.splits().dataset)  # what recommend and serve read after deletions: still the books' schema
    assert not (seen.inter["user_id"] == victim).any() and seen.schema.noun == "book"
    [row] = Recommender(run).recommend(12, 1)
    assert set(row["fields"]) == {"author", "publisher", "subjects", "language", "price"} and row["year"] == ""
