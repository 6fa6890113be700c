"""The files a data source reads, their digests, and how a newer copy differs (issue 31: new data over time).

A model's manifest records :func:`source_record` of its config's source when it is trained (``data_files``:
per file its size and sha256). :func:`compare` reads the source as it is now against that record: a file is
unchanged, grew by appended rows (its recorded content is a prefix of the current one, so only new rows were
added), changed otherwise, or is missing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def source_files(source: str, path: str | None) -> dict[str, Path]:
    """name -> file of everything ``source`` reads (the schema file and its tables for ``table``)."""
    if source == "table":
        from privrec.data.table import read_schema, schema_path

        schema, folder = read_schema(path)
        out = {"schema": schema_path(path)}
        for section in ("interactions", "items", "users"):
            spec = getattr(schema, section)
            if spec is not None:
                out[section] = folder / spec.file
        return out
    from privrec.data.movielens import SOURCE_FILES

    if path is None:
        from privrec.assets import fetch_movielens

        folder = fetch_movielens()
    else:
        folder = Path(path).expanduser()
    names = [f for f, _, _ in SOURCE_FILES[source]]
    return dict(zip(("interactions", "users", "items"), (folder / n for n in names)))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_record(source: str, path: str | None) -> dict[str, dict]:
    """{name: {"file", "bytes", "sha256"}} of the source's files as they are now (missing files left out)."""
    out = {}
    for name, p in source_files(source, path).items():
        if p.is_file():
            data = p.read_bytes()
            out[name] = {"file": p.name, "bytes": len(data), "sha256": _sha(data)}
    return out


def compare(record: dict[str, dict], source: str, path: str | None) -> list[tuple[str, str, int]]:
    """Per recorded file: (name, state, new rows) with state ``unchanged``, ``appended`` (the recorded content
    is a prefix of the current file; ``new rows`` counts the lines after it), ``changed`` or ``missing``."""
    files = source_files(source, path)
    out = []
    for name, old in record.items():
        p = files.get(name)
        if p is None or not p.is_file():
            out.append((name, "missing", 0))
            continue
        data = p.read_bytes()
        if len(data) == old["bytes"] and _sha(data) == old["sha256"]:
            out.append((name, "unchanged", 0))
        elif len(data) > old["bytes"] and _sha(data[:old["bytes"]]) == old["sha256"]:
            out.append((name, "appended", sum(1 for line in data[old["bytes"]:].splitlines() if line.strip())))
        else:
            out.append((name, "changed", 0))
    return out
