"""The privrec command end to end on the tiny model, and every bad-input case: exit 2, one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from privrec.cli import main
from privrec.config import load_config
from privrec.data import build_splits
from privrec.model.adapters import lineage_of

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    # fp32: evaluate must reproduce train's scores exactly; under bf16 autocast a prompt's score moves by
    # ~1e-6 with the batch it shares (seen on an AVX512-BF16 CPU; test_precision.py covers the bf16 path)
    assert main(["--no-progress", "train", TINY, "--out", str(out), "--set", "train.epochs=1",
                 "--set", "model.precision=fp32"]) == 0
    return out


def test_train_writes_a_run_directory(trained, ml100k):
    assert (trained / "config.yaml").is_file() and (trained / "log.txt").is_file()
    assert (trained / "adapters" / "default" / "adapter_model.safetensors").is_file()
    m = json.loads((trained / "metrics.json").read_text())
    for key in ("auc", "uauc", "logloss", "accuracy", "n_test", "train_seconds", "train_samples_per_second"):
        assert key in m, key
    assert m["n_test"] == 64 and 0 <= m["auc"] <= 1
    assert m["zero_shot"]["n"] == 64
    assert set(m["references"]) >= {"like-rate", "item-mean", "lr-onehot", "lr-onehot+like-rate"}
    assert all("uauc" in r for r in m["references"].values()) and m["references_train"] == m["n_train"]
    assert "valid_uauc" in m["history"][0] and m["valid_auc"] == m["history"][0]["valid_auc"]
    assert [p["samples_seen"] for p in m["curve"]] == [h["samples_seen"] for h in m["history"]]
    meta = json.loads((trained / "adapters" / "default" / "privrec.json").read_text())
    assert len(meta["sample_ids"]) == 64 and meta["base_fingerprint"]
    splits = build_splits(ml100k, load_config(TINY).data, 0)
    assert meta["lineage_sha256"] == lineage_of(splits.train)  # the one lineage hash: ids + content


def test_evaluate_reproduces_train_metrics(trained, capsys):
    code, out, _ = run_cli(capsys, "evaluate", str(trained))
    assert code == 0
    m = json.loads((trained / "metrics.json").read_text())
    again = json.loads((trained / "eval_test.json").read_text())
    assert again["auc"] == pytest.approx(m["auc"], abs=1e-9)
    assert again["logloss"] == pytest.approx(m["logloss"], abs=1e-6)


def test_a_like_prediction_adapter_ranks(trained, capsys):
    code, out, _ = run_cli(capsys, "evaluate", str(trained), "--set", "task=ranking", "--set", "data.n_test=6",
                           "--set", "prompt.max_length=768")
    assert code == 0 and "hr@1" in out
    m = json.loads((trained / "eval_test_ranking.json").read_text())
    assert set(m["scorers"]) == {"yes", "title"} and m["scorers"]["yes"]["n"] == 6


def test_recommend_lists_unseen_items(trained, capsys, ml100k):
    code, out, _ = run_cli(capsys, "recommend", str(trained), "--user", "1", "--top", "5",
                           "--max-candidates", "30")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 5
    seen = {ml100k.items[i].title for i in ml100k.inter[ml100k.inter.user_id == 1].item_id}
    scores = [float(line.split()[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)
    assert not any(line.split(None, 2)[2].rsplit(" (", 1)[0] in seen for line in lines)


def test_baseline_and_report(tmp_path, capsys, trained):
    code, out, _ = run_cli(capsys, "baseline", TINY, "--out", str(tmp_path / "b"))
    assert code == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["method"] == "lr-onehot" and m["auc"] == m["references"]["lr-onehot"]["auc"]
    code, out, _ = run_cli(capsys, "report", str(trained), str(tmp_path / "b"), "--markdown")
    assert code == 0 and "| tiny: tuned |" in out and "zero-shot" in out and "lr-onehot" in out
    tuned = next(line for line in out.splitlines() if line.startswith("| tiny: tuned |"))
    seconds = json.loads((trained / "metrics.json").read_text())["train_seconds"]
    assert tuned.rstrip(" |").rsplit("| ", 1)[1] == f"{seconds:.0f}"  # whole seconds, not 4 decimals


def test_resume_refuses_a_different_config(trained, capsys):
    code, _, err = run_cli(capsys, "train", TINY, "--out", str(trained), "--resume", "--set", "seed=5")
    assert code == 2 and "different config" in err


def _bad_grouplens(tmp_path):
    d = tmp_path / "gl"
    d.mkdir()
    (d / "u.data").write_text("1\tx\t5\n")
    (d / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995||x|" + "|".join(["0"] * 19) + "\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n")
    return d


@pytest.mark.parametrize("case", [
    "missing-config", "unknown-key", "bad-value", "bad-set", "wrong-data-path", "malformed-rows",
    "unknown-model-path", "unknown-hub-model", "not-a-run", "unknown-flag", "bad-yaml",
])
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data: [unclosed\n")
    argv = {
        "missing-config": ["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")],
        "unknown-key": ["train", TINY, "--out", str(tmp_path / "o"), "--set", "train.epoch=3"],
        "bad-value": ["train", TINY, "--out", str(tmp_path / "o"), "--set", "train.lr=-1"],
        "bad-set": ["train", TINY, "--out", str(tmp_path / "o"), "--set", "train.lr"],
        "wrong-data-path": ["train", TINY, "--out", str(tmp_path / "o"), "--set", "data.source=ml-1m",
                            "--set", f"data.path={tmp_path / 'missing'}"],
        "malformed-rows": ["baseline", TINY, "--out", str(tmp_path / "o"), "--set", "data.source=ml-100k-grouplens",
                           "--set", f"data.path={_bad_grouplens(tmp_path)}"],
        "unknown-model-path": ["train", TINY, "--out", str(tmp_path / "o"), "--set", "model.name=./no-such-model"],
        "unknown-hub-model": ["train", TINY, "--out", str(tmp_path / "o"), "--set",
                              "model.name=no-such-org/no-such-model"],
        "not-a-run": ["evaluate", str(tmp_path)],
        "unknown-flag": ["train", TINY, "--bogus"],
        "bad-yaml": ["train", str(bad_yaml), "--out", str(tmp_path / "o")],
    }[case]
    try:
        code, out, err = run_cli(capsys, *argv)
    except SystemExit as e:  # argparse errors
        code = e.code
        err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("privrec") and "Traceback" not in err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
