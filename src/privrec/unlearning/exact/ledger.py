"""The deletion ledger: a durable SQLite record of every deletion request, its tombstones and its progress
(``RUN/ledger.sqlite``; METHODS §4 unlearning, §7 provable exact unlearning). docs/unlearning.md explains
what it guarantees.

Tables
- ``requests``: one row per request (id, sequence number, kind, the request as given, status, timestamps,
  retrain seconds, the sha256 of its certificate's body once done).
- ``events``: every status change of every request, with its time (the audit trail).
- ``tombstones``: every deleted interaction (user, item, timestamp) and the request that deleted it. A
  sample is *tombstoned* when any interaction it shows is: its target, or any item of its history (the
  prompt of a later sample repeats the rating). Tombstones are never removed; every later training from
  the same source in this run skips tombstoned samples.
- ``removed``: the run's samples (train / valid / test) each request removed, with the shard that held it.
- ``request_shards``: per request, every shard's adapter hash before, whether it is retrained, and its
  hash after. A done request also stores its certificate's body hash and the last adapter record at that
  moment (``adapters_seq``), so ``--verify`` knows which shards were re-trained since.
- ``adapters``: every adapter installed in the run (by ``shard-train`` or by a request), latest last:
  what ``--verify`` checks the files against.

Request life: ``pending`` (recorded with its tombstones, in one transaction, before any model work) ->
``retrained`` (new adapters staged) -> ``installed`` (swapped in) -> ``done`` (lineage checked, certificate
written). ``--resume`` continues from the recorded status; a request is never recorded twice.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from privrec.data import Sample
from privrec.errors import RunError
from privrec.prepare import shows_tombstoned
from privrec.rundir import LEDGER_FILE

PENDING, RETRAINED, INSTALLED, DONE = "pending", "retrained", "installed", "done"
STATUSES = (PENDING, RETRAINED, INSTALLED, DONE)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests(
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, kind TEXT NOT NULL, spec TEXT NOT NULL,
    status TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    retrain_seconds REAL, certificate_sha256 TEXT, adapters_seq INTEGER);
CREATE TABLE IF NOT EXISTS events(
    request_id TEXT NOT NULL, status TEXT NOT NULL, at REAL NOT NULL, detail TEXT);
CREATE TABLE IF NOT EXISTS tombstones(
    user_id INTEGER NOT NULL, item_id INTEGER NOT NULL, timestamp INTEGER NOT NULL,
    request_id TEXT NOT NULL, PRIMARY KEY(user_id, item_id));
CREATE TABLE IF NOT EXISTS removed(
    request_id TEXT NOT NULL, sample_id TEXT NOT NULL, user_id INTEGER NOT NULL, item_id INTEGER NOT NULL,
    timestamp INTEGER NOT NULL, split TEXT NOT NULL, shard INTEGER, PRIMARY KEY(request_id, sample_id));
CREATE TABLE IF NOT EXISTS request_shards(
    request_id TEXT NOT NULL, shard INTEGER NOT NULL, retrain INTEGER NOT NULL,
    before_sha256 TEXT NOT NULL, after_sha256 TEXT, n_before INTEGER NOT NULL, n_after INTEGER,
    PRIMARY KEY(request_id, shard));
CREATE TABLE IF NOT EXISTS adapters(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, shard INTEGER NOT NULL, tensors_sha256 TEXT,
    lineage_sha256 TEXT, n_samples INTEGER NOT NULL, origin TEXT NOT NULL, at REAL NOT NULL);
"""


# --- tombstones: which samples a set of deleted interactions rules out (pure) ------------------------------
def excluded_ids(samples: Iterable[Sample], tombstones: set[tuple[int, int]]) -> set[str]:
    """Ids of the samples that show a tombstoned interaction."""
    if not tombstones:
        return set()
    return {s.sample_id for s in samples if shows_tombstoned(s, tombstones)}


class Ledger:
    """The SQLite ledger of one run. Every write is one transaction with ``synchronous=FULL``."""

    def __init__(self, path: Path, create: bool = True):
        path = Path(path)
        if not create and not path.is_file():
            raise RunError(f"{path} not found: the model has no deletion ledger")
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise RunError(f"{path}: not a readable ledger ({e})") from None

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- run identity -------------------------------------------------------------------------------
    def bind_source(self, source: str, path: str | None) -> None:
        """Tie the ledger to one data source; tombstones only mean something for that source.

        Raises:
            RunError: the run's ledger was created for another data source.
        """
        want = json.dumps({"source": source, "path": path})
        row = self.db.execute("SELECT value FROM meta WHERE key='data_source'").fetchone()
        if row is None:
            with self._tx() as db:
                db.execute("INSERT INTO meta VALUES ('data_source', ?)", (want,))
        elif row["value"] != want:
            raise RunError(f"{self.path} belongs to data source {row['value']}; this config uses {want}")

    # --- tombstones ---------------------------------------------------------------------------------
    def tombstones(self) -> set[tuple[int, int]]:
        return {
            (r["user_id"], r["item_id"]) for r in self.db.execute("SELECT user_id, item_id FROM tombstones")
        }

    def tombstones_upto(self, request_id: str) -> set[tuple[int, int]]:
        """The interactions deleted by ``request_id`` and every request before it (not by those queued after)."""
        seq = {q["id"]: q["seq"] for q in self.requests()}
        return {(t["user_id"], t["item_id"]) for t in self.tombstone_rows() if seq[t["request_id"]] <= seq[request_id]}

    def tombstone_rows(self) -> list[dict]:
        """Every tombstone with the sequence number of the request that deleted it (``request_seq``)."""
        return [dict(r) for r in self.db.execute(
            "SELECT t.*, q.seq AS request_seq FROM tombstones t JOIN requests q ON q.id = t.request_id "
            "ORDER BY t.user_id, t.item_id")]

    # --- requests -----------------------------------------------------------------------------------
    def unfinished(self) -> dict | None:
        row = self.db.execute(
            "SELECT * FROM requests WHERE status != ? ORDER BY seq LIMIT 1", (DONE,)
        ).fetchone()
        return dict(row) if row else None

    def request(self, request_id: str) -> dict:
        row = self.db.execute("SELECT * FROM requests WHERE id=?", (request_id,)).fetchone()
        if row is None:
            raise RunError(f"no request {request_id} in {self.path}")
        return dict(row)

    def requests(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM requests ORDER BY seq")]

    def record_request(
        self,
        kind: str,
        spec: dict,
        interactions: list[tuple[int, int, int]],
        removed: list[dict],
        shards: list[dict],
    ) -> str:
        """Write a request, its tombstones, the samples it removes and the shards' state, atomically.

        Args:
            interactions: (user, item, timestamp) to tombstone.
            removed: {sample_id, user_id, item_id, timestamp, split, shard}.
            shards: {shard, retrain (bool), before_sha256, n_before} for every current shard.
        Returns:
            The request id (``r-`` and 16 random hex digits; ledgers written before hold ``r0001``...),
            status ``pending``.
        """
        now = time.time()
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM requests").fetchone()[0]
            rid = f"r-{secrets.token_hex(8)}"  # unguessable; requests are ordered by seq, never by id
            db.execute(
                "INSERT INTO requests(id, seq, kind, spec, status, created, updated) VALUES (?,?,?,?,?,?,?)",
                (rid, seq, kind, json.dumps(spec, sort_keys=True), PENDING, now, now),
            )
            db.executemany(
                "INSERT INTO tombstones VALUES (?,?,?,?)", [(u, i, t, rid) for u, i, t in interactions]
            )
            db.executemany(
                "INSERT INTO removed VALUES (?,?,?,?,?,?,?)",
                [
                    (rid, r["sample_id"], r["user_id"], r["item_id"], r["timestamp"], r["split"], r["shard"])
                    for r in removed
                ],
            )
            db.executemany(
                "INSERT INTO request_shards(request_id, shard, retrain, before_sha256, n_before) "
                "VALUES (?,?,?,?,?)",
                [(rid, s["shard"], int(s["retrain"]), s["before_sha256"], s["n_before"]) for s in shards],
            )
            db.execute("INSERT INTO events VALUES (?,?,?,?)", (rid, PENDING, now, None))
        return rid

    def advance(self, request_id: str, status: str, detail: str | None = None, **fields) -> None:
        """Move a request to ``status`` (and set columns such as retrain_seconds), logging the event."""
        assert status in STATUSES, status
        now = time.time()
        sets = ", ".join(["status=?", "updated=?"] + [f"{k}=?" for k in fields])
        with self._tx() as db:
            db.execute(f"UPDATE requests SET {sets} WHERE id=?", (status, now, *fields.values(), request_id))
            db.execute("INSERT INTO events VALUES (?,?,?,?)", (request_id, status, now, detail))

    def set_after(self, request_id: str, shard: int, after_sha256: str | None, n_after: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE request_shards SET after_sha256=?, n_after=? WHERE request_id=? AND shard=?",
                (after_sha256, n_after, request_id, shard),
            )

    def set_before(self, request_id: str, shard: int, before_sha256: str | None, n_before: int) -> None:
        """Re-take a pending request's adapter state (an earlier request installed a new one since it was
        recorded); ``before_sha256`` None: the adapter was retired since, so the request no longer has it."""
        with self._tx() as db:
            if before_sha256 is None:
                db.execute("DELETE FROM request_shards WHERE request_id=? AND shard=?", (request_id, shard))
            else:
                db.execute("UPDATE request_shards SET before_sha256=?, n_before=? WHERE request_id=? AND shard=?",
                           (before_sha256, n_before, request_id, shard))

    def removed(self, request_id: str) -> list[dict]:
        return [
            dict(r)
            for r in self.db.execute(
                "SELECT sample_id, user_id, item_id, timestamp, split, shard FROM removed WHERE request_id=? "
                "ORDER BY sample_id",
                (request_id,),
            )
        ]

    def interactions(self, request_id: str) -> list[tuple[int, int, int]]:
        return [
            (r["user_id"], r["item_id"], r["timestamp"])
            for r in self.db.execute(
                "SELECT * FROM tombstones WHERE request_id=? ORDER BY user_id, item_id", (request_id,)
            )
        ]

    def request_shards(self, request_id: str) -> list[dict]:
        return [
            dict(r)
            for r in self.db.execute(
                "SELECT shard, retrain, before_sha256, after_sha256, n_before, n_after FROM request_shards "
                "WHERE request_id=? ORDER BY shard",
                (request_id,),
            )
        ]

    def events(self, request_id: str) -> list[dict]:
        return [
            dict(r)
            for r in self.db.execute(
                "SELECT status, at, detail FROM events WHERE request_id=? ORDER BY rowid", (request_id,)
            )
        ]

    # --- installed adapters -------------------------------------------------------------------------
    def record_adapter(
        self, shard: int, tensors_sha256: str | None, lineage_sha256: str | None, n_samples: int, origin: str
    ) -> None:
        """Record an adapter installed as ``shard`` (tensors_sha256 None: the shard was retired)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO adapters(shard, tensors_sha256, lineage_sha256, n_samples, origin, at) "
                "VALUES (?,?,?,?,?,?)",
                (shard, tensors_sha256, lineage_sha256, n_samples, origin, time.time()),
            )

    def latest_adapters(self) -> dict[int, dict]:
        """The last recorded adapter of every shard ever recorded (a retired shard: tensors_sha256 None)."""
        out: dict[int, dict] = {}
        for r in self.db.execute("SELECT * FROM adapters ORDER BY seq"):
            out[r["shard"]] = dict(r)
        return out

    def adapters_seq(self) -> int:
        """The sequence number of the last adapter recorded (0 when none)."""
        return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM adapters").fetchone()[0])

    def installed_after(self, shard: int, seq: int) -> bool:
        """Whether an adapter was installed as ``shard`` after adapter record ``seq``."""
        return (
            self.db.execute("SELECT 1 FROM adapters WHERE shard=? AND seq>? LIMIT 1", (shard, seq)).fetchone()
            is not None
        )

    def next_origin(self, prefix: str) -> str:
        """A fresh origin label for a training command, e.g. ``shard-train:2``."""
        n = self.db.execute(
            "SELECT COUNT(DISTINCT origin) FROM adapters WHERE origin LIKE ?", (f"{prefix}:%",)
        ).fetchone()[0]
        return f"{prefix}:{n + 1}"


def deletion_record(out: str | Path) -> list[dict]:
    """The tombstone rows (user_id, item_id, timestamp, request_id) of a model directory's deletion ledger
    (none without one): what every later use or training of the model must leave out.

    Raises:
        RunError: a deletion request on it is unfinished (the adapters may still hold what it deletes).
    """
    path = Path(out) / LEDGER_FILE
    if not path.is_file():
        return []
    ledger = Ledger(path, create=False)
    try:
        pending = ledger.unfinished()
        if pending:
            raise RunError(f"deletion request {pending['id']} on {out} is unfinished ({pending['status']}); "
                           f"finish it first: privrec forget {out} --resume")
        return ledger.tombstone_rows()
    finally:
        ledger.close()


def last_request_of(rows: list[dict]) -> dict[int, str]:
    """user -> the last request (by sequence, never by id) that deleted any of their interactions, from
    :meth:`Ledger.tombstone_rows`."""
    out: dict[int, tuple[int, str]] = {}
    for r in rows:
        u = r["user_id"]
        if u not in out or r["request_seq"] > out[u][0]:
            out[u] = (r["request_seq"], r["request_id"])
    return {u: rid for u, (_, rid) in out.items()}


def user_requests(out: str | Path) -> set[int]:
    """The users named by a model directory's whole-user deletion requests (``forget --users``, the service's
    forget): they stay forgotten in any later copy of the source (issue 31)."""
    path = Path(out) / LEDGER_FILE
    if not path.is_file():
        return set()
    ledger = Ledger(path, create=False)
    try:
        return {int(u) for q in ledger.requests() if q["kind"] == "users"
                for u in json.loads(q["spec"]).get("users", [])}
    finally:
        ledger.close()


def deleted_interactions(out: str | Path, data=None) -> set[tuple[int, int]]:
    """The (user, item) interactions a model directory deleted: deleted data stays deleted when the model is
    used, unlearnt from or trained again into the same directory. With ``data`` (the config's ``data`` section),
    also every interaction the source holds now of a user a whole-user request deleted (rows of theirs that
    reappear in a later copy of the source, issue 31)."""
    rows = deletion_record(out)
    out_set = {(r["user_id"], r["item_id"]) for r in rows}
    whole = user_requests(out) & {r["user_id"] for r in rows} if data is not None and rows else set()
    if whole:
        from privrec.data import load_dataset

        inter = load_dataset(data.source, data.path).inter
        back = inter[inter["user_id"].isin(whole)]
        out_set |= set(zip(back["user_id"].tolist(), back["item_id"].tolist()))
    return out_set
