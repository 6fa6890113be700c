"""Write any :class:`~privrec.data.movielens.Dataset` in the table format (a schema file and three TSV tables),
and the generated books catalogue of the docs and tests.

``write_table`` is what ``privrec data export ml-100k OUT`` runs: reading its output back with
:func:`privrec.data.table.load_table` gives the same dataset (interactions in the same order, the same records,
the same :class:`~privrec.data.records.RecordSchema`), so a run on the export equals a run on the source.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from privrec.data.records import RecordSchema
from privrec.data.table import SCHEMA_FILE
from privrec.errors import UserError
from privrec.rundir import written_folder

FILES = {"interactions": "interactions.tsv", "items": "items.tsv", "users": "users.tsv"}
_LIST_SEPARATORS = ("|", ";", "/", "#")


def _list_separator(values) -> str:
    for sep in _LIST_SEPARATORS:
        if not any(sep in v for vs in values for v in vs):
            return sep
    raise ValueError("every list separator occurs inside a value")


def schema_dict(ds, list_seps: dict[str, str]) -> dict:
    """The schema file's content for ``ds`` written by :func:`write_table`."""
    sch: RecordSchema = ds.schema

    def spec(f) -> dict | str:
        d: dict = {"column": f.key}
        if f.name != f.key.replace("_", " "):
            d["name"] = f.name
        if f.is_list:
            d.update(list=True, separator=list_seps[f.key])
        if not f.categorical:
            d["categorical"] = False
        return f.key if len(d) == 1 else d

    items: dict = {"file": FILES["items"], "id": "item_id", "title": "title"}
    if sch.title_name != "title":
        items["title_name"] = sch.title_name
    if sch.title_suffix:
        items["title_suffix"] = sch.title_suffix
    items["fields"] = [spec(f) for f in sch.item_fields]
    if sch.history_fields:
        items["history_fields"] = list(sch.history_fields)
    out = {"name": ds.name, "noun": sch.noun, "plural": sch.plural, "verb": sch.verb,
           "rating_scale": sch.rating_scale,
           "interactions": {"file": FILES["interactions"], "user_id": "user_id", "item_id": "item_id",
                            "timestamp": "timestamp", "timestamp_format": "unix", "rating": "rating"},
           "items": items}
    if sch.user_fields or ds.users:
        out["users"] = {"file": FILES["users"], "id": "user_id", "fields": [spec(f) for f in sch.user_fields]}
    return out


def _frame(ids: list[int], id_col: str, records, keys: list[str], seps: dict[str, str],
           title: list[str] | None = None) -> pd.DataFrame:
    cols: dict = {id_col: ids}
    if title is not None:
        cols["title"] = title
    for k in keys:
        vals = [r.get(k) for r in records]
        cols[k] = [seps[k].join(v) if isinstance(v, tuple) else v for v in vals] if k in seps else vals
    return pd.DataFrame(cols)


def write_table(ds, out: str | Path) -> Path:
    """Write ``ds`` under ``out`` (a new or empty folder) as ``schema.yaml`` + three TSV files; atomically
    (a temporary folder renamed into place). Returns the schema file's path.

    Raises:
        UserError: ``out`` exists and is not empty.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; give a new folder")
    sch: RecordSchema = ds.schema
    seps = {f.key: _list_separator([it.get(f.key, ()) for it in ds.items.values()])
            for f in sch.item_fields if f.is_list}
    seps.update({f.key: _list_separator([u.get(f.key, ()) for u in ds.users.values()])
                 for f in sch.user_fields if f.is_list})
    item_ids = sorted(ds.items)
    items = _frame(item_ids, "item_id", [ds.items[i] for i in item_ids], [f.key for f in sch.item_fields], seps,
                   title=[ds.items[i].title for i in item_ids])
    user_ids = sorted(ds.users)
    users = _frame(user_ids, "user_id", [ds.users[u] for u in user_ids], [f.key for f in sch.user_fields], seps)
    inter = ds.inter[["user_id", "item_id", "rating", "timestamp"]]
    with written_folder(out) as tmp:
        inter.to_csv(tmp / FILES["interactions"], sep="\t", index=False)
        items.to_csv(tmp / FILES["items"], sep="\t", index=False)
        has_users = sch.user_fields or ds.users
        if has_users:
            users.to_csv(tmp / FILES["users"], sep="\t", index=False)
        (tmp / SCHEMA_FILE).write_text(yaml.safe_dump(schema_dict(ds, seps), sort_keys=False, allow_unicode=True),
                                       encoding="utf-8")
    return out / SCHEMA_FILE


# --- the generated books catalogue ----------------------------------------------------------------------------
COUNTRIES = {"UK": "English", "US": "English", "France": "French", "Germany": "German", "Spain": "Spanish",
             "Italy": "Italian"}
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55+")
SUBJECTS = ("mystery", "romance", "science fiction", "history", "biography", "fantasy", "travel", "cooking")
PUBLISHERS = ("Harbor House", "Northwind Press", "Quill & Co", "Blue Lantern", "Meridian", "Old Mill Books")
PRICE_BANDS = ("budget", "standard", "premium")
_WORDS_A = ("Silent", "Hidden", "Last", "Golden", "Broken", "Distant", "Winter", "Secret", "Burning", "Quiet",
            "Lost", "Crimson", "Endless", "Paper", "Salt", "Iron")
_WORDS_B = ("River", "Garden", "Letters", "Kingdom", "Harbour", "Map", "Orchard", "Voyage", "Clock", "Island",
            "Kitchen", "Empire", "Lighthouse", "Road", "Archive", "Forest")
_FIRST = ("Anna", "Ben", "Clara", "David", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Luis",
          "Maya", "Nils", "Olga", "Pablo")
_LAST = ("Adler", "Bianchi", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Hughes", "Ito", "Jensen", "Klein",
         "Laurent", "Moreau", "Novak", "Ortiz", "Price")


def books(n_users: int = 300, n_items: int = 240, seed: int = 0, per_user: tuple[int, int] = (20, 50)) -> dict:
    """A generated books catalogue with a planted preference structure, as three frames
    ``{"interactions", "items", "users"}``; deterministic by ``seed``.

    A user likes books in their country's language, on their two favourite subjects, by their favourite
    authors, and priced for their age band (younger readers dislike premium prices); each book has a quality
    bias. Who reads what follows the same affinity (plus popularity), so the ratings carry a collaborative and
    a content signal: the MF and one-hot LR references beat chance (tests/data/test_table_books.py).
    """
    rng = np.random.default_rng([seed, 31])
    languages = sorted(set(COUNTRIES.values()))
    n_authors = max(8, n_items // 6)
    authors = [f"{_FIRST[i % len(_FIRST)]} {_LAST[(i * 7 + i // len(_FIRST)) % len(_LAST)]}" for i in range(n_authors)]
    item_author = rng.integers(0, n_authors, n_items)
    author_lang = rng.choice(languages, n_authors, p=_lang_weights(languages))
    item_subjects = [tuple(sorted(rng.choice(len(SUBJECTS), size=rng.integers(1, 3), replace=False)))
                     for _ in range(n_items)]
    price = rng.integers(0, 3, n_items)
    quality = rng.normal(0, 0.6, n_items)
    titles, used = [], set()
    for _ in range(n_items):
        t = f"The {_WORDS_A[rng.integers(len(_WORDS_A))]} {_WORDS_B[rng.integers(len(_WORDS_B))]}"
        k, base = 2, t
        while t in used:
            t, k = f"{base} {k}", k + 1
        used.add(t)
        titles.append(t)
    items = pd.DataFrame({
        "book_id": np.arange(1, n_items + 1), "title": titles,
        "author": [authors[a] for a in item_author],
        "publisher": rng.choice(PUBLISHERS, n_items),
        "subjects": ["|".join(SUBJECTS[s] for s in subj) for subj in item_subjects],
        "language": [author_lang[a] for a in item_author],
        "price_band": [PRICE_BANDS[p] for p in price],
    })
    countries = list(COUNTRIES)
    user_country = rng.choice(len(countries), n_users)
    user_age = rng.integers(0, len(AGE_BANDS), n_users)
    users = pd.DataFrame({"reader_id": np.arange(1, n_users + 1),
                          "country": [countries[c] for c in user_country],
                          "age_band": [AGE_BANDS[a] for a in user_age]})
    rows = []
    t0 = pd.Timestamp("2023-01-01", tz="UTC")
    lang_of_item = items["language"].to_numpy()
    for u in range(n_users):
        fav = rng.choice(len(SUBJECTS), 2, replace=False)
        fav_authors = set(rng.choice(n_authors, 3, replace=False).tolist())
        lang = COUNTRIES[countries[user_country[u]]]
        affinity = (1.4 * (lang_of_item == lang)
                    + np.array([0.9 * len(set(s) & set(fav.tolist())) for s in item_subjects])
                    + np.array([1.0 if a in fav_authors else 0.0 for a in item_author])
                    - 0.8 * (user_age[u] <= 1) * (price == 2) + quality)  # young readers avoid premium
        p = np.exp(0.9 * affinity)
        n = int(rng.integers(per_user[0], per_user[1] + 1))
        chosen = rng.choice(n_items, size=min(n, n_items), replace=False, p=p / p.sum())
        score = affinity[chosen] + rng.normal(0, 0.7, len(chosen))
        stars = np.clip(np.round(2.2 + 1.1 * score), 1, 5).astype(int)
        times = t0 + pd.to_timedelta(np.sort(rng.integers(0, 365 * 24 * 3600, len(chosen))), unit="s")
        for i, s, t in zip(chosen, stars, times):
            rows.append((u + 1, int(i) + 1, int(s), t.strftime("%Y-%m-%d %H:%M:%S")))
    inter = pd.DataFrame(rows, columns=["reader_id", "book_id", "stars", "read_at"])
    return {"interactions": inter, "items": items, "users": users}


def _lang_weights(languages: list[str]) -> list[float]:
    w = np.array([3.0 if lang == "English" else 1.0 for lang in languages])
    return list(w / w.sum())


BOOKS_SCHEMA = {
    "name": "books",
    "noun": "book",
    "verb": "read",
    "interactions": {"file": "interactions.csv", "user_id": "reader_id", "item_id": "book_id",
                     "timestamp": "read_at", "timestamp_format": "%Y-%m-%d %H:%M:%S", "rating": "stars"},
    "items": {"file": "books.csv", "id": "book_id", "title": "title",
              "fields": ["author", "publisher", {"column": "subjects", "list": True, "separator": "|"},
                         "language", {"column": "price_band", "name": "price"}],
              "history_fields": ["subjects"]},
    "users": {"file": "readers.csv", "id": "reader_id", "fields": ["country", {"column": "age_band", "name": "age"}]},
}


def write_books(out: str | Path, seed: int = 0, n_users: int = 300, n_items: int = 240) -> Path:
    """Write the generated books catalogue (:func:`books`) as three CSV files and ``schema.yaml`` under ``out``
    (a new or empty folder), atomically. Returns the schema file's path.

    Raises:
        UserError: ``out`` exists and is not empty.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; give a new folder")
    frames = books(n_users, n_items, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        frames["interactions"].to_csv(tmp / BOOKS_SCHEMA["interactions"]["file"], index=False)
        frames["items"].to_csv(tmp / BOOKS_SCHEMA["items"]["file"], index=False)
        frames["users"].to_csv(tmp / BOOKS_SCHEMA["users"]["file"], index=False)
        header = "# The generated books catalogue (privrec data example books; docs/data.md explains every key).\n"
        (tmp / SCHEMA_FILE).write_text(header + yaml.safe_dump(BOOKS_SCHEMA, sort_keys=False), encoding="utf-8")
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / SCHEMA_FILE
