"""Conditions input can reach below the commands are UserErrors (one line, exit 2), not asserts or bare
ValueErrors that end in a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli

from privrec.errors import AggregationError, PartitionError, TrainingError, UserError
from privrec.federated.strategies import weighted_average
from privrec.unlearning.exact.partition import partition

ROOT = Path(__file__).resolve().parents[1]


def test_pieces_raise_user_errors():
    with pytest.raises(PartitionError) as e:
        partition("user", ["u1-i1", "u1-i2", "u2-i3"], 3, 0, users=[1, 1, 2])
    assert isinstance(e.value, UserError) and "at least K=3 users" in str(e.value)
    with pytest.raises(PartitionError, match="K=4"):
        partition("random", ["a", "b"], 4, 0)
    a, b = {"x": torch.zeros(2)}, {"y": torch.zeros(2)}
    with pytest.raises(AggregationError, match="different tensors"):
        weighted_average([a, b], [1, 1])
    with pytest.raises(AggregationError, match="non-negative"):
        weighted_average([a, a], [0, 0])
    with pytest.raises(AggregationError, match="no adapter states"):
        weighted_average([], [])
    from privrec.train import train

    with pytest.raises(TrainingError, match="trainable"):
        train(type("M", (), {"trainable_parameters": lambda self: []})(), [], None, 0)


def test_a_partition_the_data_cannot_give_exits_2_in_one_line(tmp_path, capsys):
    """More shards than users under partition=user: before, a ValueError traceback."""
    code, _, err = run_cli(capsys, "shard-train", str(ROOT / "configs" / "apa-tiny.yaml"), "--out",
                           str(tmp_path / "o"), "--set", "shards.partition=user", "--set", "shards.k=64",
                           "--set", "shards.aggregations=[sisa]", "--set", "shards.primary=sisa")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("privrec: error: user partition needs")
    assert len([line for line in lines if line.startswith("privrec: error")]) == 1
