"""Every user's precomputed top-k (``MODEL/serve/recommendations.json``, METHODS §11): written by
``privrec serve MODEL --precompute-only`` or, with ``--precompute``, by the service's worker at start and
after each applied deletion. The recommendations endpoint reads a user's entry when the store is current:
made with the adapters now installed and the same two-stage settings (its *key*).

A user's entry is purged the moment their deletion request is accepted. An applied deletion changes the
adapters: the store is begun again under the new key, empty (nothing computed with the old adapters is
served again), and filled user by user: the worker computes the users asked for most recently first, every
answer computed online under the new key is kept too (in memory: the request thread never writes the file), and
the worker writes the file every few seconds, so the window in which a user is answered online closes user by
user and a restarted service continues a half-filled store.

By default (``privrec serve --precompute`` without ``--swap-at-once``) there is no such window: the worker fills
a second store (``recommendations.next.json``) under the new adapters *before* it swaps them in, while the old
adapters and their store keep answering, and the swap adopts it whole (:meth:`RecStore.adopt`). A service
killed during that fill continues it when started again (the file's key is the adapters on disk).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from privrec.rundir import atomic_write_json, read_json
from privrec.serve import SERVE_DIR

STORE_FILE = "recommendations.json"
NEXT_FILE = "recommendations.next.json"  # the store filled under a deletion's new adapters before they are swapped in
WRITE_EVERY_SECONDS = 5.0  # the file is rewritten at most this often while the store fills (and at the end)


def store_key(digest: str, candidates: int | None, blend: float, source: str = "popularity") -> dict:
    """What a stored list depends on: the installed adapters and the two-stage settings."""
    return {"adapters": digest, "candidates": candidates, "blend": blend, "source": source}


class RecStore:
    """The store file and its in-memory copy (one writer: the service)."""

    def __init__(self, model: str | Path, name: str = STORE_FILE):
        self.path = Path(model) / SERVE_DIR / name
        self._lock = threading.Lock()
        self.key: dict | None = None
        self.k = 0
        self.users: dict[int, list[dict]] = {}
        self._written = 0.0
        if self.path.is_file():
            raw = read_json(self.path)
            self.key, self.k = raw.get("key"), int(raw.get("k", 0))
            self.users = {int(u): v for u, v in raw.get("users", {}).items()}

    def current(self, key: dict, k: int) -> bool:
        """Made under ``key`` with ``k`` items per user (it may not hold every user yet)."""
        return self.key == key and self.k == k

    def get(self, user: int, k: int, key: dict) -> list[dict] | None:
        """The user's stored top-``k``, when the store is current for ``key`` and holds at least ``k``."""
        with self._lock:
            if self.key != key or k > self.k:
                return None
            items = self.users.get(user)
        return None if items is None else items[:k]

    def begin(self, key: dict, k: int) -> None:
        """Start again under ``key``, empty (unless it is current already: then it is continued)."""
        with self._lock:
            if self.current(key, k):
                return
            self.key, self.k, self.users = key, k, {}
            self._write()

    def add(self, key: dict, k: int, users: dict[int, list[dict]], refused: Callable[[int], bool],
            flush: bool = False, write: bool = True) -> int:
        """Keep the top-``k`` lists of ``users`` made under ``key`` (dropped when the store has moved on to
        another key); a user for whom ``refused(user)`` holds, checked under the store's lock, is never kept
        (their deletion request was accepted: it sets the refusal before it purges). The file is rewritten
        when ``flush`` or :data:`WRITE_EVERY_SECONDS` have passed, unless ``write`` is False (a request thread:
        kept in memory, stored by the worker's next write or flush). Returns how many were kept."""
        with self._lock:
            if not self.current(key, k):
                return 0
            kept = {u: v[:k] for u, v in users.items() if not refused(u)}
            self.users.update(kept)
            if flush or (write and time.monotonic() - self._written >= WRITE_EVERY_SECONDS):
                self._write()
            return len(kept)

    def flush(self) -> None:
        with self._lock:
            self._write()

    def adopt(self, other: RecStore) -> None:
        """Become ``other`` (a store filled off to the side), whose file replaces this one's atomically."""
        with self._lock, other._lock:
            other._write()
            os.replace(other.path, self.path)
            self.key, self.k, self.users = other.key, other.k, other.users
            other.key, other.k, other.users = None, 0, {}  # emptied: a late purge of it writes nothing
            self._written = time.monotonic()

    def discard(self) -> None:
        """Forget this store and remove its file."""
        with self._lock:
            self.key, self.k, self.users = None, 0, {}
            self.path.unlink(missing_ok=True)

    def purge(self, user: int) -> bool:
        """Drop a user's entry (their deletion request was accepted); True when there was one."""
        with self._lock:
            if self.users.pop(user, None) is None:
                return False
            self._write()
            return True

    def _write(self) -> None:
        atomic_write_json(self.path, {"key": self.key, "k": self.k,
                                      "users": {str(u): v for u, v in sorted(self.users.items())}})
        self._written = time.monotonic()
