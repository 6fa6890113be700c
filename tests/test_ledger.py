"""The deletion ledger (SQLite) and the tombstone rule, without a model."""

from __future__ import annotations

import re
import sqlite3

import pytest

from privrec.data import Sample
from privrec.errors import RunError
from privrec.rundir import run_lock
from privrec.unlearning.exact.ledger import (
    DONE,
    PENDING,
    RETRAINED,
    Ledger,
    excluded_ids,
    shows_tombstoned,
)


def _shards():
    return [
        {"shard": 0, "retrain": True, "before_sha256": "aa", "n_before": 3},
        {"shard": 1, "retrain": False, "before_sha256": "bb", "n_before": 2},
    ]


def _removed(sid="u1-i10"):
    return [{"sample_id": sid, "user_id": 1, "item_id": 10, "timestamp": 5, "split": "train", "shard": 0}]


def test_request_is_recorded_durably_with_its_tombstones(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    rid = led.record_request("users", {"users": [1]}, [(1, 10, 5), (1, 11, 6)], _removed(), _shards())
    assert re.fullmatch(r"r-[0-9a-f]{16}", rid)
    led.close()
    again = Ledger(tmp_path / "ledger.sqlite", create=False)  # a new connection, as after a crash
    req = again.unfinished()
    assert req["id"] == rid and req["status"] == PENDING
    assert again.tombstones() == {(1, 10), (1, 11)}
    assert again.removed(rid)[0]["sample_id"] == "u1-i10"
    assert [s["retrain"] for s in again.request_shards(rid)] == [1, 0]
    again.advance(rid, RETRAINED, retrain_seconds=1.5)
    again.advance(rid, DONE, certificate_sha256="cc", adapters_seq=0)
    assert again.unfinished() is None
    assert [e["status"] for e in again.events(rid)] == [PENDING, RETRAINED, DONE]
    assert again.request(rid)["retrain_seconds"] == 1.5
    second = again.record_request("samples", {}, [(2, 3, 4)], [], [])
    assert second != rid and [r["id"] for r in again.requests()] == [rid, second]


def test_a_failed_request_leaves_no_trace(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    rid = led.record_request("users", {"users": [1]}, [(1, 10, 5)], _removed(), _shards())
    led.advance(rid, DONE)
    with pytest.raises(sqlite3.IntegrityError):  # (1, 10) is tombstoned already: the whole request rolls back
        led.record_request("users", {"users": [1, 2]}, [(2, 20, 7), (1, 10, 5)], [], _shards())
    assert led.tombstones() == {(1, 10)}
    assert [r["id"] for r in led.requests()] == [rid] and led.unfinished() is None


def test_tombstones_rule_out_the_target_and_every_prompt_that_shows_it():
    def s(user, item, hist):
        return Sample(f"u{user}-i{item}", user, item, 0, 4.0, 1, tuple((h, 4.0) for h in hist))

    tomb = {(1, 10)}
    target, shows, clean, other_user = s(1, 10, [1, 2]), s(1, 30, [10, 2]), s(1, 31, [2, 3]), s(2, 40, [10])
    assert shows_tombstoned(target, tomb) and shows_tombstoned(shows, tomb)
    assert not shows_tombstoned(clean, tomb)
    assert not shows_tombstoned(other_user, tomb)  # user 2's rating of item 10 was not deleted
    assert excluded_ids([target, shows, clean, other_user], tomb) == {"u1-i10", "u1-i30"}


def test_adapter_records_and_data_source_binding(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    led.bind_source("ml-100k", None)
    led.bind_source("ml-100k", None)  # same source: fine
    with pytest.raises(RunError, match="data source"):
        led.bind_source("ml-1m", "/data/ml-1m")
    led.record_adapter(0, "h0", "l0", 3, "shard-train:1")
    led.record_adapter(1, "h1", "l1", 3, "shard-train:1")
    seq = led.adapters_seq()
    led.record_adapter(0, "h0b", "l0b", 2, "r0001")
    assert (
        led.latest_adapters()[0]["tensors_sha256"] == "h0b"
        and led.latest_adapters()[1]["origin"] == "shard-train:1"
    )
    assert led.installed_after(0, seq) and not led.installed_after(1, seq)
    assert led.next_origin("shard-train") == "shard-train:2"


def test_not_a_ledger_and_busy_run_are_user_errors(tmp_path):
    with pytest.raises(RunError, match="no deletion ledger"):
        Ledger(tmp_path / "missing.sqlite", create=False)
    (tmp_path / "junk.sqlite").write_text("not a database, just text " * 40)
    with pytest.raises(RunError, match="not a readable ledger"):
        Ledger(tmp_path / "junk.sqlite")
    with run_lock(tmp_path / "run"), pytest.raises(RunError, match="another privrec command"):
        with run_lock(tmp_path / "run"):
            pass
    with run_lock(tmp_path / "run"):  # released after use
        pass
