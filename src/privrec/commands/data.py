"""``privrec data check | export | example``: bring your own key-value data (docs/data.md).

- ``check DATA``: load a table source (the schema file or its folder) exactly as training would, and summarise
  it; any malformed input is one line (DataError) and nothing is written;
- ``export ml-100k OUT``: the embedded MovieLens copy in the table format (a run on it equals the embedded run);
- ``example books OUT``: the generated books catalogue (a planted preference structure; tests and docs).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from privrec.data.records import fmt
from privrec.errors import UserError


def _field_line(who: str, key: str, name: str, values: list) -> str:
    if values and isinstance(values[0], tuple):
        distinct = {v for vs in values for v in vs}
        kind = "list"
    else:
        distinct = set(values)
        nonempty = [v for v in values if v != ""]
        kind = "number" if nonempty and pd.to_numeric(pd.Series(nonempty), errors="coerce").notna().all() else "text"
    empty = sum(1 for v in values if v in ("", ()))
    shown = f"{who} {key}" + (f" ('{name}')" if name != key else "")
    line = f"    {shown:<32} {kind:<6} {len(distinct):>6} distinct values"
    return line + (f", {empty} empty" if empty else "")


def check(data: str, like_threshold: float = 3.0, history_len: int = 10) -> list[str]:
    """The summary lines of ``privrec data check``.

    Raises:
        DataError: the first problem of the input, one line (file, line or column, what to do).
    """
    from privrec.data.table import load_table, schema_path

    ds, report = load_table(data)
    sch = ds.schema
    inter = ds.inter
    counts = inter.groupby("user_id").size()
    liked = float((inter["rating"] > like_threshold).mean())
    t0, t1 = (pd.Timestamp(int(x), unit="s", tz="UTC") for x in (inter["timestamp"].min(), inter["timestamp"].max()))
    files = {k: p.name for k, p in report.files.items()}
    lines = [
        f"{ds.name}: {schema_path(data)}",
        f"  {len(inter)} interactions ({files['interactions']}), {inter['user_id'].nunique()} users, "
        f"{inter['item_id'].nunique()} of {len(ds.items)} {sch.plural} rated ({files['items']})"
        + (f", {len(ds.users)} user records ({files['users']})" if "users" in files else ", no users table"),
        (f"  like rate {100 * liked:.1f}% (label 1)" if report.label else
         f"  like rate {100 * liked:.1f}% (rating > {like_threshold:g}); ratings {inter['rating'].min():g} to "
         f"{inter['rating'].max():g}") + f"; per user {counts.min()} to {counts.max()} (median {counts.median():g})",
        f"  time span {t0:%Y-%m-%d %H:%M} to {t1:%Y-%m-%d %H:%M} UTC ({(t1 - t0).days} days)",
        "  fields (the kv prompt shows each as 'user NAME' or 'target " + sch.noun + " NAME'):",
        _field_line("item", "title", sch.title_name, [it.title for it in ds.items.values()]),
    ]
    lines += [_field_line("item", f.key, f.name, [it.get(f.key, () if f.is_list else "")
                                                  for it in ds.items.values()]) for f in sch.item_fields]
    lines += [_field_line("user", f.key, f.name, [u.get(f.key, () if f.is_list else "") for u in ds.users.values()])
              for f in sch.user_fields]
    short = counts[counts <= history_len]
    lines += [
        "  left out:",
        f"    {report.repeated} repeated (user, {sch.noun}) interactions dropped (the latest of each kept)",
        f"    {len(short)} users with {history_len} or fewer interactions give no sample (data.history_len "
        f"{history_len}: a sample needs {history_len} earlier interactions); {int(short.sum())} interactions",
    ]
    if "users" in files:
        lines.append(f"    {report.users_without_record} users without a record in {files['users']} (their prompts "
                     f"show no user fields); {report.users_without_interactions} user records without interactions")
    lines.append(f"    {report.unrated_items} {sch.plural} never rated (kept: recommend may propose them)")
    ex = next(iter(ds.items.values()))
    lines.append(f"  e.g. {sch.noun} {next(iter(ds.items))}: \"{ex.title}\""
                 + "".join(f"; {f.name}: {fmt(ex.get(f.key))}" for f in sch.item_fields))
    if len(short) == len(counts):
        lines.append(f"warning: no user has more than {history_len} interactions, so no sample can be made; lower "
                     "data.history_len or bring more interactions")
    lines.append(f"ok: use it with data.source=table data.path={schema_path(data)}")
    return lines


def export(source: str, out: str) -> Path:
    """Write a MovieLens source in the table format; returns the schema file's path."""
    from privrec.data import load_dataset
    from privrec.data.export import write_table

    if source != "ml-100k":
        raise UserError(f"privrec data export knows ml-100k (the embedded copy), not {source!r}")
    return write_table(load_dataset("ml-100k", None), out)


def example(name: str, out: str, seed: int = 0) -> Path:
    from privrec.data.export import write_books

    if name != "books":
        raise UserError(f"privrec data example knows books, not {name!r}")
    return write_books(out, seed)


def status(run: str) -> list[str]:
    """``privrec data status MODEL``: the model's source now against the files it was trained on (its manifest's
    ``data_files``), and rows of users it forgot that are in the source now.

    Raises:
        RunError: not a model directory, or one written before manifests recorded the source.
    """
    from privrec.data import load_dataset
    from privrec.data.digest import compare
    from privrec.errors import RunError
    from privrec.recommender import open_model
    from privrec.unlearning.exact.ledger import deletion_record

    md = open_model(run, pending_ok=True)
    record = md.manifest.data_files
    if record is None:
        raise RunError(f"{run} was written before model manifests recorded their data source's files; "
                       "nothing to compare with")
    d = md.cfg.data
    lines = [f"{run}: trained on {d.source}" + (f" at {d.path}" if d.path else " (the embedded copy)")]
    states = compare(record, d.source, d.path)
    for name, state, rows in states:
        what = f"{rows} rows appended since training" if state == "appended" else state
        lines.append(f"  {name} ({record[name]['file']}): {what}")
    if all(s == "unchanged" for _, s, _ in states):
        lines.append("the source is the one the model was trained on")
    else:
        appended = [n for n, s, _ in states if s == "appended"]
        lines.append("the model has not seen the new data: its adapters hold only the samples its manifest lists "
                     f"(forget and verify read those); to take the new data in, train a new model: privrec train "
                     f"{run}/config.yaml --out NEW" + ("" if appended and len(appended) == sum(
                         s != "unchanged" for _, s, _ in states) else "; rows were changed or removed, not only "
                         "appended: lineage checks of the existing samples may now fail (privrec forget --verify)"))
    rows = deletion_record(run) if md.tombstones else []
    if rows:
        deleted = {r["user_id"] for r in rows} & set(md.deleted_by)
        inter = load_dataset(d.source, d.path).inter
        back = inter[inter["user_id"].isin(deleted)]
        tomb = {(r["user_id"], r["item_id"]) for r in rows}
        new = [(u, i) for u, i in zip(back["user_id"], back["item_id"]) if (u, i) not in tomb]
        if new:
            users = sorted({u for u, _ in new})
            lines.append(f"  dropped: {len(new)} rows of forgotten users {', '.join(map(str, users[:10]))} are in the "
                         "source now; this model never shows or trains on them (recommend, evaluate, serve, unlearn "
                         "and train into it leave them out), but a new model trained on this copy would: remove "
                         "them from it first")
        else:
            lines.append(f"  no rows of the {len(deleted)} forgotten users are in the source beyond those deleted")
    return lines
