"""Bearer tokens of a served model (``MODEL/serve/tokens.json``): ``privrec token create MODEL --user U`` or
``--admin`` prints a token once; only its sha256 is stored. ``privrec token revoke MODEL ID`` marks it
revoked; the running service sees the change on its next request (it re-reads the file when it changes:
every write is a rename, so a new inode), no restart needed.

A token reads ``prv_<id>_<secret>``: ``id`` (8 hex digits) names it in the store and in ``revoke``; the
secret is 32 random bytes (URL-safe base64), so a plain sha256 is enough to store it (no password stretching:
nothing to guess).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from privrec.errors import RunError, UserError
from privrec.rundir import atomic_write_json
from privrec.serve import SERVE_DIR

TOKENS_FILE = "tokens.json"
PREFIX = "prv_"


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: one user, or an admin (``user`` None)."""

    token_id: str
    user: int | None

    @property
    def admin(self) -> bool:
        return self.user is None

    def may_touch(self, user: int) -> bool:
        return self.admin or self.user == user


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_path(model: str | Path) -> Path:
    return Path(model) / SERVE_DIR / TOKENS_FILE


@contextlib.contextmanager
def _locked(model: str | Path) -> Iterator[list[dict]]:
    """The token list, for a read-modify-write under an exclusive lock (two `token create` at once)."""
    path = tokens_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            tokens = _read(path)
            yield tokens
            atomic_write_json(path, {"version": 1, "tokens": tokens})
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
        return list(raw["tokens"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RunError(f"{path} is not a privrec token store; remove it and create the tokens again") from None


def create_token(model: str | Path, user: int | None) -> tuple[str, dict]:
    """A new token for ``user`` (None: admin); returns (the token, its stored record). The token is shown
    once: only its sha256 is kept.

    Raises:
        RunError: ``model`` is not a model directory.
    """
    if not (Path(model) / "model.json").is_file() and not (Path(model) / "config.yaml").is_file():
        raise RunError(f"{model} is not a model directory")
    with _locked(model) as tokens:
        known = {t["id"] for t in tokens}
        tid = secrets.token_hex(4)
        while tid in known:
            tid = secrets.token_hex(4)
        token = f"{PREFIX}{tid}_{secrets.token_urlsafe(32)}"
        record = {"id": tid, "sha256": _digest(token), "user": user, "created": time.time(), "revoked": None}
        tokens.append(record)
    return token, record


def revoke_token(model: str | Path, id_or_prefix: str) -> dict:
    """Revoke the token whose id starts with ``id_or_prefix`` (or the token itself); returns its record.

    Raises:
        UserError: no token, or more than one, matches.
    """
    key = id_or_prefix.strip()
    if key.startswith(PREFIX):
        key = key[len(PREFIX):].split("_", 1)[0]
    if not key:
        raise UserError("give a token id (or its first characters)")
    with _locked(model) as tokens:
        hits = [t for t in tokens if t["id"].startswith(key)]
        if not hits:
            raise UserError(f"no token of {model} has an id starting with {key!r}")
        if len(hits) > 1:
            raise UserError(f"{len(hits)} tokens have an id starting with {key!r}: give more of it")
        hits[0]["revoked"] = hits[0]["revoked"] or time.time()
        return dict(hits[0])


class TokenStore:
    """The service's view of the token file, re-read whenever the file changes (mtime or size)."""

    def __init__(self, model: str | Path):
        self.path = tokens_path(model)
        self._stamp: tuple[int, int, int] | None = None
        self._by_id: dict[str, dict] = {}
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rewrite is a new file (rename)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._by_id = {t["id"]: t for t in _read(self.path)} if stamp else {}
                self._stamp = stamp

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a valid, unrevoked token; None otherwise."""
        if not token.startswith(PREFIX) or "_" not in token[len(PREFIX):]:
            return None
        self._refresh()
        record = self._by_id.get(token[len(PREFIX):].split("_", 1)[0])
        if record is None or record.get("revoked") or not hmac.compare_digest(record["sha256"], _digest(token)):
            return None
        return Principal(record["id"], record["user"])
