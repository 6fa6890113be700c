"""Every user's precomputed top-k (``MODEL/serve/recommendations.json``, METHODS §11): written by
``privrec serve MODEL --precompute-only`` or, with ``--precompute``, by the service's worker at start and
after each applied deletion. The recommendations endpoint reads a user's entry when the store is current:
made with the adapters now installed and the same two-stage settings. A user's entry is purged the moment
their deletion request is accepted; an applied deletion changes the adapters, which makes the whole store
stale until it is computed again.
"""

from __future__ import annotations

import threading
from pathlib import Path

from privrec.rundir import atomic_write_json, read_json
from privrec.serve import SERVE_DIR

STORE_FILE = "recommendations.json"


def store_key(digest: str, candidates: int | None, blend: float, source: str = "popularity") -> dict:
    """What a stored list depends on: the installed adapters and the two-stage settings."""
    return {"adapters": digest, "candidates": candidates, "blend": blend, "source": source}


class RecStore:
    """The store file and its in-memory copy (one writer: the service)."""

    def __init__(self, model: str | Path):
        self.path = Path(model) / SERVE_DIR / STORE_FILE
        self._lock = threading.Lock()
        self.key: dict | None = None
        self.k = 0
        self.users: dict[int, list[dict]] = {}
        if self.path.is_file():
            raw = read_json(self.path)
            self.key, self.k = raw.get("key"), int(raw.get("k", 0))
            self.users = {int(u): v for u, v in raw.get("users", {}).items()}

    def get(self, user: int, k: int, key: dict) -> list[dict] | None:
        """The user's stored top-``k``, when the store is current for ``key`` and holds at least ``k``."""
        with self._lock:
            if self.key != key or k > self.k:
                return None
            items = self.users.get(user)
        return None if items is None else items[:k]

    def replace(self, key: dict, k: int, users: dict[int, list[dict]]) -> None:
        with self._lock:
            self.key, self.k, self.users = key, k, dict(users)
            self._write()

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
