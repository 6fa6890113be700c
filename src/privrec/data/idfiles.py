"""Files of ids, one per line (forget requests name users or samples this way)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from privrec.errors import DataError

T = TypeVar("T")
SAMPLE_ID = re.compile(r"^u(\d+)-i(\d+)$")  # a sample id: u{user}-i{item}


def read_id_file(path: str | Path, what: str, parse: Callable[[str], T], example: str) -> list[T]:
    """The sorted distinct ids of a file, one per line; blank lines and ``#`` comments are skipped.

    ``parse`` turns a line into an id and raises ValueError when it is not one.

    Raises:
        DataError: missing file, a line that is not an id (named by file and line), or no ids at all.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} file not found: {p}")
    ids = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append(parse(text))
        except ValueError:
            raise DataError(f"{p}:{n}: expected {example}, got {text!r}") from None
    if not ids:
        raise DataError(f"{p} lists no {what}")
    return sorted(set(ids))


def read_sample_ids(path: str | Path) -> list[str]:
    """Sample ids ``u{user}-i{item}``, one per line (blank lines and ``#`` comments skipped).

    Raises:
        DataError: missing file, malformed id, or no ids."""

    def parse(text: str) -> str:
        if not SAMPLE_ID.match(text):
            raise ValueError(text)
        return text

    return read_id_file(path, "samples", parse, "a sample id like u12-i345")
