"""Progress of long work: a bar when stderr is a terminal, one plain line a minute when it is not.

A run started under nohup, in CI or piped into a file has no terminal to draw a bar on, and a silent
half-hour is indistinguishable from a hung one; so there it prints, at most once a minute, where the work
stands: ``caching frozen layers: 120/203 batches (59%), 4m10s so far, about 2m55s left``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
LINE_EVERY_S = 60.0


def track(iterable: Iterable[T], total: int, desc: str, enabled: bool = True, unit: str = "batch",
          every_s: float = LINE_EVERY_S) -> Iterable[T]:
    """``iterable`` with its progress shown on stderr (nothing when ``enabled`` is False)."""
    if not enabled:
        return iterable
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return _lines(iterable, total, desc, unit, every_s)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _lines(iterable: Iterable[T], total: int, desc: str, unit: str, every_s: float) -> Iterator[T]:
    start = last = time.monotonic()
    for done, x in enumerate(iterable, 1):
        yield x
        now = time.monotonic()
        if now - last >= every_s and done < total:
            last = now
            left = (now - start) / done * (total - done)
            print(f"{desc}: {done}/{total} {unit}es ({100 * done / total:.0f}%), {_clock(now - start)} so far, "
                  f"about {_clock(left)} left", file=sys.stderr, flush=True)
