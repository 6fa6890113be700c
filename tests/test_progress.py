"""Long work shows where it stands: bars on a terminal, one plain line a minute elsewhere."""

from __future__ import annotations

from privrec import progress


def test_off_a_terminal_a_line_at_most_every_interval_with_counts_and_time_left(capsys, monkeypatch):
    clock = iter(range(0, 1000, 25))  # each step takes 25 "seconds"
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = list(progress.track(range(8), 8, "caching frozen layers", every_s=60))
    assert out == list(range(8))  # every item, in order
    lines = capsys.readouterr().err.strip().splitlines()
    # steps end at 25, 50, ..., 200 s: a line once 60 s have passed since the last one (at 75 s and 150 s)
    assert lines == ["caching frozen layers: 3/8 batches (38%), 1m15s so far, about 2m05s left",
                     "caching frozen layers: 6/8 batches (75%), 2m30s so far, about 0m50s left"]


def test_disabled_progress_prints_nothing(capsys):
    assert list(progress.track(range(3), 3, "x", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
