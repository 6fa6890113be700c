"""MovieLens readers: one interaction table and key-value records for users and items, whatever the source.

Sources (METHODS §0, §1):
- ``ml-100k``: recbole atomic files (``ml-100k.inter/.item/.user``), the embedded default;
- ``ml-100k-grouplens``: the original GroupLens folder (``u.data``, ``u.item``, ``u.user``);
- ``ml-1m``: ``ratings.dat``, ``movies.dat``, ``users.dat`` (``::``-separated).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from privrec.data.records import MOVIELENS, Item, RecordSchema, User
from privrec.errors import DataError


def movie(title: str, year: str, genres: tuple[str, ...]) -> Item:
    return Item(title, (("genres", genres), ("year", year)))


def ml_user(age: str, gender: str, occupation: str) -> User:
    return User((("gender", gender), ("age", age), ("occupation", occupation)))


@dataclass
class Dataset:
    """``inter`` has columns user_id, item_id, rating, timestamp, sorted by (user, time) with the file's
    row order as the tie-break (many ratings of one user share a timestamp). ``schema``: how the records'
    keys are shown (:mod:`privrec.data.records`)."""

    name: str
    inter: pd.DataFrame
    items: dict[int, Item]
    users: dict[int, User]
    schema: RecordSchema  # required: a copy that dropped it would show another dataset's keys

    def __post_init__(self) -> None:
        self.inter = self.inter.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
        unknown = set(self.inter["item_id"].unique()) - set(self.items)
        if unknown:
            raise DataError(f"{self.name}: {len(unknown)} rated items have no item record "
                            f"(e.g. item {sorted(unknown)[0]})")


_ARTICLE = re.compile(r"^(?P<rest>.+), (?P<art>The|A|An|Les|La|Le|L'|Il|Das|Der|Die|El)$")
_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
_GENDER = {"M": "male", "F": "female"}
_ML1M_AGE = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55",
             "56": "56+"}
_ML1M_OCC = ["other", "academic/educator", "artist", "clerical/admin", "college/grad student",
             "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
             "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
             "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer"]
_ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
                  "Sci-Fi", "Thriller", "War", "Western"]


# Each source's files as (name, field separator, header lines): interactions, users, items. The user id is
# the first field of every interaction and user row (what `privrec federate-split-data` filters by).
SOURCE_FILES: dict[str, tuple[tuple[str, str, int], ...]] = {
    "ml-100k": (("ml-100k.inter", "\t", 1), ("ml-100k.user", "\t", 1), ("ml-100k.item", "\t", 1)),
    "ml-100k-grouplens": (("u.data", "\t", 0), ("u.user", "|", 0), ("u.item", "|", 0)),
    "ml-1m": (("ratings.dat", "::", 0), ("users.dat", "::", 0), ("movies.dat", "::", 0)),
}


def clean_title(raw: str) -> tuple[str, str]:
    """'Usual Suspects, The (1995)' -> ('The Usual Suspects', '1995'); the year is '' when absent."""
    title, year = raw.strip(), ""
    m = _YEAR.match(title)
    if m:
        title, year = m["title"], m["year"]
    m = _ARTICLE.match(title)
    if m:
        art = m["art"]
        title = f"{art}{'' if art.endswith(chr(39)) else ' '}{m['rest']}"
    return title, year


def _require(folder: Path, names: tuple[str, ...]) -> None:
    if not folder.is_dir():
        raise DataError(f"dataset folder not found: {folder}")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}")


def _read_table(path: Path, sep: str, names: list[str], skip_header: bool, encoding: str = "utf-8",
                ) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep=sep, header=None, names=names, skiprows=1 if skip_header else 0,
                           quoting=csv.QUOTE_NONE, dtype=str, engine="python" if len(sep) > 1 else "c",
                           encoding=encoding, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: malformed rows ({str(e).splitlines()[0]})") from None


def _interactions(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    try:
        out = pd.DataFrame({
            "user_id": df["user_id"].astype(np.int64),
            "item_id": df["item_id"].astype(np.int64),
            "rating": df["rating"].astype(np.float64),
            "timestamp": df["timestamp"].astype(float).astype(np.int64),
        })
    except (ValueError, TypeError) as e:
        raise DataError(f"{path}: malformed rows ({e})") from None
    if out.empty:
        raise DataError(f"{path}: no interactions")
    return out


def load_recbole_ml100k(folder: Path) -> Dataset:
    _require(folder, ("ml-100k.inter", "ml-100k.item", "ml-100k.user"))
    inter = _read_table(folder / "ml-100k.inter", "\t", ["user_id", "item_id", "rating", "timestamp"], True)
    items_df = _read_table(folder / "ml-100k.item", "\t", ["item_id", "title", "year", "genres"], True)
    users_df = _read_table(folder / "ml-100k.user", "\t", ["user_id", "age", "gender", "occupation", "zip"], True)
    try:
        items = {int(r.item_id): movie(clean_title(r.title)[0], r.year, tuple(r.genres.split()))
                 for r in items_df.itertuples()}
        users = {int(r.user_id): ml_user(r.age, _GENDER.get(r.gender, r.gender), r.occupation)
                 for r in users_df.itertuples()}
    except ValueError as e:
        raise DataError(f"{folder}: malformed item/user rows ({e})") from None
    return Dataset("ml-100k", _interactions(inter, folder / "ml-100k.inter"), items, users, MOVIELENS)


def load_grouplens_ml100k(folder: Path) -> Dataset:
    _require(folder, ("u.data", "u.item", "u.user"))
    inter = _read_table(folder / "u.data", "\t", ["user_id", "item_id", "rating", "timestamp"], False)
    cols = ["item_id", "title", "date", "video", "url"] + _ML100K_GENRES
    items_df = _read_table(folder / "u.item", "|", cols, False, encoding="latin-1")
    users_df = _read_table(folder / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"], False)
    items = {}
    try:
        for r in items_df.to_dict("records"):
            title, year = clean_title(r["title"])
            year = year or r["date"][-4:]
            items[int(r["item_id"])] = movie(title, year, tuple(g for g in _ML100K_GENRES if r[g] == "1"))
        users = {int(r.user_id): ml_user(r.age, _GENDER.get(r.gender, r.gender), r.occupation)
                 for r in users_df.itertuples()}
    except (ValueError, KeyError) as e:
        raise DataError(f"{folder}: malformed item/user rows ({e})") from None
    return Dataset("ml-100k", _interactions(inter, folder / "u.data"), items, users, MOVIELENS)


def load_ml1m(folder: Path) -> Dataset:
    _require(folder, ("ratings.dat", "movies.dat", "users.dat"))
    inter = _read_table(folder / "ratings.dat", "::", ["user_id", "item_id", "rating", "timestamp"], False)
    items_df = _read_table(folder / "movies.dat", "::", ["item_id", "title", "genres"], False, "latin-1")
    users_df = _read_table(folder / "users.dat", "::", ["user_id", "gender", "age", "occupation", "zip"], False)
    try:
        items = {}
        for r in items_df.itertuples():
            title, year = clean_title(r.title)
            items[int(r.item_id)] = movie(title, year, tuple(r.genres.split("|")))
        users = {int(r.user_id): ml_user(_ML1M_AGE.get(r.age, r.age), _GENDER.get(r.gender, r.gender),
                                         _ML1M_OCC[int(r.occupation)]) for r in users_df.itertuples()}
    except (ValueError, IndexError) as e:
        raise DataError(f"{folder}: malformed item/user rows ({e})") from None
    return Dataset("ml-1m", _interactions(inter, folder / "ratings.dat"), items, users, MOVIELENS)


def load_dataset(source: str, path: str | None) -> Dataset:
    """Load a dataset by source name; ``path`` None means the embedded, fetched copy of ml-100k; ``table``: a
    schema file or its folder (:mod:`privrec.data.table`).

    Raises:
        DataError: the folder or a file is missing, or rows are malformed.
        AssetError: the embedded copy could not be fetched.
    """
    if source == "ml-100k":
        if path is None:
            from privrec.assets import fetch_movielens

            return load_recbole_ml100k(fetch_movielens())
        return load_recbole_ml100k(Path(path).expanduser())
    if source == "ml-100k-grouplens":
        return load_grouplens_ml100k(Path(path).expanduser())
    if source == "ml-1m":
        return load_ml1m(Path(path).expanduser())
    if source == "table":
        from privrec.data.table import load_table

        if path is None:
            raise DataError("data.source=table needs data.path (the schema file or its folder)")
        return load_table(path)[0]
    raise DataError(f"unknown data source {source!r}")
