"""Rewrite one marked section of a markdown file (benchmarks write their tables into docs/ this way)."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->``, or append the block."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.DOTALL)
    else:
        text += ("\n" if text else "") + block + "\n"
    path.write_text(text)


def publish(path: str | Path | None, name: str, table: str) -> None:
    """Print a benchmark's table, and with ``path`` rewrite its marked section of that markdown file."""
    print(table)
    if path:
        write_section(path, name, table)
        print(f"wrote {path} ({name})", file=sys.stderr)
