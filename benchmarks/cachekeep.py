"""Benchmarks that forget on copies of a run must not change the frozen-layer cache other runs read.

``privrec forget`` purges the forgotten samples' cache entries (they are derived copies of the data). On a copy
made for a benchmark that purge would reach the cache every other run on this machine shares, and the entries
would be computed again later in other batches, where bf16 arithmetic can round differently: a run trained
after a benchmark's request would no longer reproduce one trained before it. ``kept_cache`` hard-links every
cache file before the block and links back those the block removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from privrec.assets import cache_dir


def cache_files() -> dict[str, Path]:
    root = cache_dir()
    return {str(p.relative_to(root)): p for p in root.rglob("*.pt")} if root.is_dir() else {}


@contextlib.contextmanager
def kept_cache(workdir: Path) -> Iterator[None]:
    """Run the block with every frozen-layer cache file it deletes restored afterwards (links under ``workdir``)."""
    keep = Path(workdir) / ".cache-links"
    shutil.rmtree(keep, ignore_errors=True)
    before = cache_files()
    for rel, p in before.items():  # hard links: the purged files stay readable here
        (keep / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(p, keep / rel)
    try:
        yield
    finally:
        root = cache_dir()
        for rel in before:
            if not (root / rel).exists():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(keep / rel, root / rel)
        shutil.rmtree(keep, ignore_errors=True)
