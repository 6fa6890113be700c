"""``data.source: table``: any catalogue, any user fields, one schema file (docs/data.md).

A schema file (YAML, :class:`TableSchema`, every key documented there) names an interactions table, an items
table and an optional users table (CSV, TSV, Parquet or JSON Lines, read with pandas), their id columns, the
timestamp and its format, the rating (or an explicit 0/1 label), the item title and the fields a prompt shows.
:func:`load_table` maps them onto the same :class:`~privrec.data.movielens.Dataset` the MovieLens readers build,
so everything downstream (samples, prompts, references, partitions, forgetting) runs on it unchanged.

Every problem in the input raises one :class:`~privrec.errors.DataError` whose message is one line naming the
file, the line (or row) or column, and what to do. Nothing is written.

Ids must be integers (sample ids, ledgers and ``--users`` name them as such). A user's repeated interactions
with one item keep the latest (sample ids are ``u{user}-i{item}``); :class:`LoadReport` counts what was dropped.
A 0/1 label becomes the rating 5 (liked) or 1 (not liked), so any ``data.like_threshold`` in [1, 5) reads it
back; prompts then say liked/disliked (keep ``prompt.rating_style: liked``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from privrec.data.records import RESERVED_KEYS, FieldInfo, Item, RecordSchema, User
from privrec.errors import DataError

SCHEMA_FILE = "schema.yaml"
FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".txt": "tsv", ".parquet": "parquet", ".pq": "parquet",
           ".jsonl": "jsonl", ".ndjson": "jsonl"}
_SEPARATORS = (",", "\t", ";", "|")
LABEL_RATINGS = {0: 1.0, 1: 5.0}  # an explicit label as a rating the default like rule (rating > 3) reads back


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldSpec(_Strict):
    """One key-value field of an item or a user. Written as a plain column name when the defaults fit."""

    column: str = Field(description="The column holding the value; also the field's key (unique in the schema).")
    name: str | None = Field(None, description="Display name in the prompt ('user {name}', 'target book {name}'); "
                             "default: the column with '_' as spaces.")
    list: bool = Field(False, description="A list-valued field (MovieLens genres): the value is split on "
                       "`separator` and shown joined by ', '.")
    separator: str = Field("|", description="list: the separator inside the value.")
    categorical: bool = Field(True, description="The one-hot references (lr-onehot) read this field (set false "
                              "for free text or near-unique values).")

    @property
    def display(self) -> str:
        return self.name or self.column.replace("_", " ")


def _fields(v):
    return [{"column": f} if isinstance(f, str) else f for f in v or []]


class _TableFile(_Strict):
    file: str = Field(description="Path of the table, relative to the schema file's folder.")
    format: Literal["csv", "tsv", "parquet", "jsonl"] | None = Field(
        None, description="csv, tsv, parquet or jsonl; default: from the file's extension.")
    separator: str | None = Field(None, description="csv/tsv: the field separator (default ',' for csv, tab for "
                                  "tsv). The first line is always the header.")


class InteractionsSpec(_TableFile):
    user_id: str = Field("user_id", description="Column of the user id (integers).")
    item_id: str = Field("item_id", description="Column of the item id (integers, each in the items table).")
    timestamp: str = Field("timestamp", description="Column of the interaction time (orders a user's history).")
    timestamp_format: str = Field(
        "unix", description="unix (seconds since 1970), unix_ms, iso (ISO 8601), or a strftime pattern such as "
        "'%Y-%m-%d %H:%M'. Times without a zone are read as UTC.")
    rating: str | None = Field(None, description="Column of a numeric rating; label = rating > "
                               "data.like_threshold of the config (give exactly one of rating and label).")
    label: str | None = Field(None, description="Column of an explicit 0/1 label (1 = liked); stored as the "
                              "rating 5 or 1.")

    @model_validator(mode="after")
    def _one_target(self) -> InteractionsSpec:
        if (self.rating is None) == (self.label is None):
            raise ValueError("give exactly one of interactions.rating and interactions.label")
        return self


class ItemsSpec(_TableFile):
    id: str = Field("item_id", description="Column of the item id (unique).")
    title: str = Field("title", description="Column of the item's title (what prompts and answers name).")
    title_name: str = Field("title", description="Display name of the title ('target book title').")
    title_suffix: str | None = Field(None, description="A field's column shown in parentheses after the title "
                                     "wherever a title is listed (MovieLens: year).")
    fields: list[FieldSpec] = Field(default_factory=list, description="The item fields a prompt shows, in order "
                                    "(a column name or a mapping of FieldSpec keys).")
    history_fields: list[str] = Field(default_factory=list, description="Columns of `fields` each history entry "
                                      "also shows (MovieLens: genres); prompt.history_genres turns them off.")
    _coerce = field_validator("fields", mode="before")(_fields)


class UsersSpec(_TableFile):
    id: str = Field("user_id", description="Column of the user id (unique).")
    fields: list[FieldSpec] = Field(default_factory=list, description="The user fields a prompt shows, in order.")
    _coerce = field_validator("fields", mode="before")(_fields)


class TableSchema(_Strict):
    """The schema file: what privrec needs to know about three tables."""

    name: str = Field("table", description="The data set's name (in messages and summaries).")
    noun: str = Field("item", description="What an item is called in prompts: movie, book, product, course.")
    plural: str | None = Field(None, description="The noun's plural; default: noun + 's'.")
    verb: str = Field("choose", description="The next-item question's verb: 'which candidate book will the user "
                      "{verb} next?' (MovieLens: watch).")
    rating_scale: float = Field(5.0, gt=0, description="The top rating, shown in 'rated 4/5' "
                                "(prompt.rating_style: rating).")
    interactions: InteractionsSpec
    items: ItemsSpec
    users: UsersSpec | None = Field(None, description="Optional: without it prompts show no user fields.")

    @model_validator(mode="after")
    def _keys(self) -> TableSchema:
        keys = [f.column for f in self.items.fields] + [f.column for f in (self.users.fields if self.users else [])]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"field {dup[0]!r} is named twice (item and user fields share one set of keys: "
                             "rename one column)")
        bad = sorted(set(keys) & RESERVED_KEYS)
        if bad:
            raise ValueError(f"field {bad[0]!r} is a key privrec's prompts use themselves; rename the column")
        item_cols = {f.column for f in self.items.fields}
        for c in self.items.history_fields:
            if c not in item_cols:
                raise ValueError(f"items.history_fields names {c!r}, which is not one of items.fields")
        if self.items.title_suffix is not None and self.items.title_suffix not in item_cols:
            raise ValueError(f"items.title_suffix {self.items.title_suffix!r} is not one of items.fields")
        return self

    def record_schema(self) -> RecordSchema:
        def info(f: FieldSpec) -> FieldInfo:
            return FieldInfo(f.column, f.display, f.list, f.categorical)

        return RecordSchema(
            noun=self.noun, plural=self.plural or f"{self.noun}s", verb=self.verb,
            user_fields=tuple(info(f) for f in (self.users.fields if self.users else [])),
            item_fields=tuple(info(f) for f in self.items.fields), title_name=self.items.title_name,
            title_suffix=self.items.title_suffix, history_fields=tuple(self.items.history_fields),
            rating_scale=self.rating_scale)


# --- reading --------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """A read table: its frame (every cell a string) and how to name a row in a message."""

    path: Path
    section: str
    df: pd.DataFrame
    text: bool  # csv/tsv/jsonl: rows are lines (a header line first for csv/tsv)
    header: bool

    def row(self, i: int) -> str:
        """'line N' (text, the header line counted) or 'row N' (parquet) of the frame's i-th row."""
        return f"line {i + (2 if self.header else 1)}" if self.text else f"row {i + 1}"

    def where(self, i: int) -> str:
        return f"{self.path} {self.row(i)}"

    def column(self, col: str, key: str) -> pd.Series:
        if col not in self.df.columns:
            cols = ", ".join(map(str, self.df.columns[:12]))
            raise DataError(f"{self.path}: no column {col!r} (the schema's {self.section}.{key}); its columns: "
                            f"{cols}; fix the schema or the file's header")
        return self.df[col]


def schema_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    return p / SCHEMA_FILE if p.is_dir() else p


def read_schema(path: str | Path) -> tuple[TableSchema, Path]:
    """(the schema, its folder). ``path``: the schema file or the folder holding ``schema.yaml``.

    Raises:
        DataError: no such file, not YAML, or a schema that does not validate (one line: the key and why).
    """
    p = schema_path(path)
    if not p.is_file():
        raise DataError(f"{p}: no schema file (give the schema's path, or a folder with {SCHEMA_FILE})")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not a YAML file ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{p}: expected a mapping of schema keys (interactions, items, users, ...)")
    try:
        return TableSchema.model_validate(raw), p.parent
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "schema"
        msg = err["msg"].removeprefix("Value error, ")
        raise DataError(f"{p}: {loc}: {msg} (see docs/data.md for every key)") from None


def _format(spec: _TableFile, path: Path, section: str) -> str:
    if spec.format:
        return spec.format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the extension {path.suffix!r}; set "
                        f"{section}.format (csv, tsv, parquet or jsonl)")
    return fmt


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); re-save the file as "
                        "UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_table(spec: _TableFile, folder: Path, section: str) -> Table:
    """One table of the schema as strings. Raises DataError (one line) on every way the file can be wrong."""
    path = (folder / spec.file).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found (the schema's {section}.file)")
    fmt = _format(spec, path, section)
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: empty file; it needs a header line and at least one row")
    if fmt == "parquet":
        try:
            df = pd.read_parquet(io.BytesIO(data))
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow, or the "
                            "parquet extra: pip install -e '.[parquet]')") from None
        except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
            raise DataError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
        table = Table(path, section, _as_strings(df), text=False, header=False)
    elif fmt == "jsonl":
        text = _decode(path, data)
        try:
            df = pd.read_json(io.StringIO(text), lines=True, dtype=False, convert_dates=False)
        except ValueError as e:
            raise DataError(f"{path}: not JSON Lines, one object per line ({str(e).splitlines()[0]})") from None
        table = Table(path, section, _as_strings(df), text=True, header=False)
    else:
        text = _decode(path, data)
        sep = spec.separator or ("," if fmt == "csv" else "\t")
        try:
            df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False,
                             engine="python" if len(sep) > 1 else "c")
        except (pd.errors.ParserError, ValueError) as e:
            why = str(e).splitlines()[0].removeprefix("Error tokenizing data. ")
            raise DataError(f"{path}: malformed rows ({why}); "
                            f"check the separator ({sep!r}) and the quoting") from None
        if len(df.columns) == 1:
            head = str(df.columns[0])
            guess = next((s for s in _SEPARATORS if s != sep and s in head), None)
            if guess is not None:
                raise DataError(f"{path}: the header {head[:60]!r} is one column with separator {sep!r}; it looks "
                                f"separated by {guess!r}: set {section}.separator: {guess!r}")
        table = Table(path, section, df, text=True, header=True)
    if table.df.empty and section != "users":  # a users table may be empty (a client folder without records)
        raise DataError(f"{path}: no rows below the header")
    return table


def _as_strings(df: pd.DataFrame) -> pd.DataFrame:
    """Parquet / JSON cells as the strings a CSV reader gives (missing values as ''; 3.0 stays '3.0')."""
    out = df.astype(object).where(df.notna(), "")
    return out.map(lambda v: v if isinstance(v, str) else str(v))


# --- parsing columns ------------------------------------------------------------------------------------------
def _ints(t: Table, col: str, key: str) -> np.ndarray:
    s = t.column(col, key)
    num = pd.to_numeric(s.str.strip(), errors="coerce")
    bad = num.isna() | (num != num.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{t.where(i)}, column {col!r}: {s.iloc[i]!r} is not an integer id ({int(bad.sum())} such "
                        "rows); privrec needs integer ids: map them to integers first")
    return num.astype(np.int64).to_numpy()


def _unique(t: Table, ids: np.ndarray, col: str, what: str) -> None:
    dup = pd.Series(ids).duplicated(keep="first").to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero(ids == ids[i])[0])
        raise DataError(f"{t.where(i)}, column {col!r}: {what} id {ids[i]} appears again (first at {t.row(first)}); "
                        f"ids must be unique: keep one record per {what}")


def _timestamps(t: Table, col: str, fmt: str) -> np.ndarray:
    s = t.column(col, "timestamp").str.strip()
    if fmt in ("unix", "unix_ms"):
        num = pd.to_numeric(s, errors="coerce")
        bad = num.isna()
        secs = num // 1000 if fmt == "unix_ms" else num
    else:
        try:
            dt = pd.to_datetime(s, format="ISO8601" if fmt == "iso" else fmt, errors="coerce", utc=True)
        except ValueError as e:
            raise DataError(f"{t.path}: interactions.timestamp_format {fmt!r} is not a date format ({e})") from None
        bad = dt.isna()
        secs = (dt - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(seconds=1)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{t.where(i)}, column {col!r}: {s.iloc[i]!r} is not a timestamp in the format {fmt!r} "
                        f"({int(bad.sum())} such rows); fix the rows or interactions.timestamp_format")
    return secs.astype(float).astype(np.int64).to_numpy()


def _ratings(t: Table, spec: InteractionsSpec) -> np.ndarray:
    if spec.rating is not None:
        s = t.column(spec.rating, "rating").str.strip()
        num = pd.to_numeric(s, errors="coerce")
        bad = num.isna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{t.where(i)}, column {spec.rating!r}: {s.iloc[i]!r} is not a number "
                            f"({int(bad.sum())} such rows); fix or remove these rows")
        return num.astype(np.float64).to_numpy()
    s = t.column(spec.label, "label").str.strip()
    num = pd.to_numeric(s, errors="coerce")
    bad = ~num.isin([0, 1])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{t.where(i)}, column {spec.label!r}: label {s.iloc[i]!r} is not 0 or 1 "
                        f"({int(bad.sum())} such rows); a label column holds 0 (not liked) or 1 (liked)")
    return num.map(LABEL_RATINGS).astype(np.float64).to_numpy()


def _records(t: Table, fields: list[FieldSpec]) -> list[tuple[tuple[str, object], ...]]:
    cols = []
    for f in fields:
        s = t.column(f.column, "fields")
        if f.list:
            cols.append([tuple(x.strip() for x in v.split(f.separator) if x.strip()) for v in s.tolist()])
        else:
            cols.append(s.tolist())
    keys = [f.column for f in fields]
    return [tuple(zip(keys, vals)) for vals in zip(*cols)] if cols else [() for _ in range(len(t.df))]


# --- the dataset ----------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What loading left out or found missing (``privrec data check`` prints it)."""

    files: dict[str, Path] = field(default_factory=dict)
    repeated: int = 0  # earlier repeats of a (user, item) interaction, dropped (the latest kept)
    users_without_record: int = 0  # users who interact but have no row in the users table
    unrated_items: int = 0  # items never interacted with (kept in the catalogue: recommend can propose them)
    users_without_interactions: int = 0
    label: bool = False  # the interactions carry a 0/1 label (stored as the ratings 5 / 1), not a rating


def load_table(path: str | Path):
    """``(Dataset, LoadReport)`` of a schema file (or its folder).

    Raises:
        DataError: any malformed input, one line naming the file, line/row or column, and what to do.
    """
    from privrec.data.movielens import Dataset

    schema, folder = read_schema(path)
    report = LoadReport(label=schema.interactions.label is not None)
    it = read_table(schema.items, folder, "items")
    item_ids = _ints(it, schema.items.id, "id")
    _unique(it, item_ids, schema.items.id, "item")
    titles = it.column(schema.items.title, "title").tolist()
    items = {int(i): Item(str(title), rec)
             for i, title, rec in zip(item_ids, titles, _records(it, schema.items.fields))}
    report.files["items"] = it.path

    users: dict[int, User] = {}
    if schema.users is not None:
        ut = read_table(schema.users, folder, "users")
        user_ids = _ints(ut, schema.users.id, "id")
        _unique(ut, user_ids, schema.users.id, "user")
        users = {int(u): User(rec) for u, rec in zip(user_ids, _records(ut, schema.users.fields))}
        report.files["users"] = ut.path

    spec = schema.interactions
    t = read_table(spec, folder, "interactions")
    report.files["interactions"] = t.path
    inter = pd.DataFrame({"user_id": _ints(t, spec.user_id, "user_id"), "item_id": _ints(t, spec.item_id, "item_id"),
                          "rating": _ratings(t, spec), "timestamp": _timestamps(t, spec.timestamp,
                                                                                spec.timestamp_format)})
    unknown = ~inter["item_id"].isin(items.keys()).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        n_items = inter["item_id"][unknown].nunique()
        raise DataError(f"{t.where(i)}: item {inter['item_id'].iloc[i]} has no record in {it.path.name} "
                        f"({int(unknown.sum())} interactions with {n_items} such items); add their records or "
                        "remove these rows")
    # a repeated (user, item): keep the latest (by time, then file order); sample ids are u{user}-i{item}
    order = inter.sort_values("timestamp", kind="stable")
    repeated = order.duplicated(["user_id", "item_id"], keep="last")
    report.repeated = int(repeated.sum())
    if report.repeated:
        inter = inter.drop(index=order.index[repeated.to_numpy()])
    seen_users = set(inter["user_id"].unique().tolist())
    report.users_without_record = len(seen_users - set(users)) if schema.users is not None else 0
    report.users_without_interactions = len(set(users) - seen_users)
    report.unrated_items = len(set(items) - set(inter["item_id"].unique().tolist()))
    return Dataset(schema.name, inter, items, users, schema.record_schema()), report
