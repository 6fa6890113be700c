"""`privrec unlearn` end to end on the tiny model: every method, the documented metrics.json, the retrained
reference, the saved adapter's lineage, the report table, the config rules, and bad input (exit 2, one line).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli

from privrec.cli import main
from privrec.config import parse_config
from privrec.errors import ConfigError
from privrec.unlearning.approx.task import UnlearnConfig, choose_forget_users, request_budget, student_lora
from privrec.unlearning.measures import jensen_shannon, symmetric_kl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
UNLEARN_TINY = str(ROOT / "configs" / "unlearn" / "tiny.yaml")
FAST = ["--set", "model.threads=1", "--set", "model.precision=fp32"]


@pytest.fixture(scope="module", autouse=True)
def _splits_once():
    """Cutting ML-100K's windows takes ~2 s and every command here cuts the same ones: do it once per config
    (the procedure under test is unchanged; it only gets its splits from a memo)."""
    from privrec import prepare
    from privrec.commands import train, unlearn

    memo, original = {}, prepare.setup_data

    def setup_data(cfg, tombstones=frozenset()):
        key = (cfg.data.model_dump_json(), cfg.seed, tuple(sorted(tombstones)))
        if key not in memo:
            memo[key] = original(cfg, tombstones)
        return memo[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "setup_data", setup_data)
    mp.setattr(unlearn, "setup_data", setup_data)
    yield setup_data
    mp.undo()



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("unlearn") / "tiny"
    assert main(["--no-progress", "train", TINY, "--out", str(out), *FAST, "--set", "eval.zero_shot=false"]) == 0
    return out


@pytest.fixture(scope="module")
def retrained(trained):
    out = trained.parent / "retrain"
    assert main(["--no-progress", "unlearn", str(trained), "--method", "retrain", "--forget-fraction", "0.2",
                 "--out", str(out), "--config", UNLEARN_TINY]) == 0
    return out


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def predictions(path: Path) -> dict[str, float]:
    with open(path, newline="") as f:
        return {r["sample_id"]: float(r["p_yes"]) for r in csv.DictReader(f)}


def documented_keys() -> set[str]:
    text = (ROOT / "docs" / "unlearning.md").read_text()
    text = text[text.index("### `OUT/` and the keys of `metrics.json`"):]
    text = text[: text.index("\n### ", 10)]
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.MULTILINE))


def test_retrain_then_e2urec_write_every_documented_measure(trained, retrained, capsys):
    out = trained.parent / "e2urec"
    code, stdout, _ = run_cli(capsys, "unlearn", str(trained), "--method", "e2urec", "--forget-fraction", "0.2",
                              "--out", str(out), "--config", UNLEARN_TINY, "--retrained", str(retrained))
    assert code == 0 and "e2urec" in stdout
    m, r = metrics(out), metrics(retrained)
    keys = documented_keys()
    assert len(keys) > 40 and set(m) == keys and set(r) == keys  # docs/unlearning.md lists exactly these

    # the same forget users, all their samples, none of anyone else's
    f_e, f_r = (json.loads((d / "forget.json").read_text()) for d in (out, retrained))
    assert f_e == f_r and m["n_forget_users"] == len(f_e["users"]) == round(0.2 * m["n_users_train"])
    assert all(int(sid.split("-")[0][1:]) in f_e["users"] for sid in f_e["sample_ids"])
    assert m["n_forget"] == len(f_e["sample_ids"]) and m["n_forget"] + m["n_retain_items"] == m["n_train"]

    # the divergence is computed from the two runs' forget-set predictions
    p_e, p_r = predictions(out / "predictions_forget.csv"), predictions(retrained / "predictions_forget.csv")
    ids = sorted(p_r)
    assert sorted(p_e) == ids
    # (the CSVs round P(Yes) to 6 decimals)
    assert m["jsd_vs_retrain"] == pytest.approx(jensen_shannon([p_e[i] for i in ids], [p_r[i] for i in ids]),
                                                rel=1e-3)
    assert m["kl_sym_vs_retrain"] == pytest.approx(symmetric_kl([p_e[i] for i in ids], [p_r[i] for i in ids]),
                                                   rel=1e-3)
    assert r["jsd_vs_retrain"] == 0.0 and r["speedup_vs_retrain"] == pytest.approx(1.0)
    assert m["retrain_seconds"] == pytest.approx(r["unlearn_seconds"])
    assert m["speedup_vs_retrain"] == pytest.approx(r["unlearn_seconds"] / m["unlearn_seconds"])
    for key in ("mia_loss_accuracy", "mia_logistic_accuracy", "test_auc", "forget_logloss"):
        assert 0 <= m[key] and (key == "forget_logloss" or m[key] <= 1)
    assert m["mia_unseen_source"] == "unused-train" and m["mia_unseen_eval_users"] == "forget-users"
    assert m["details"]["teacher_mean_p_yes_forget"]["augmented"] is not None

    # the adapters say what they may: retrain is exact and its lineage excludes every forgotten sample
    meta_r = json.loads((retrained / "adapters" / "default" / "privrec.json").read_text())
    meta_e = json.loads((out / "adapters" / "default" / "privrec.json").read_text())
    meta_o = json.loads((trained / "adapters" / "default" / "privrec.json").read_text())
    assert meta_r["exact"] and not meta_e["exact"]
    assert not set(meta_r["sample_ids"]) & set(meta_r["forgotten_sample_ids"])
    assert set(meta_r["sample_ids"]) | set(meta_r["forgotten_sample_ids"]) == set(meta_o["sample_ids"])
    assert meta_e["sample_ids"] == meta_o["sample_ids"]  # approximate: the forgotten samples did train it
    student_config = json.loads((out / "adapters" / "default" / "adapter_config.json").read_text())
    assert student_config["r"] == 4 + 16  # original + student

    code, table, _ = run_cli(capsys, "report", str(retrained), str(out), str(trained), "--markdown")
    assert code == 0
    assert "| retrain | retrain |" in table and "| e2urec | e2urec |" in table and "| tiny: tuned |" in table


@pytest.mark.parametrize("method", ["neggrad", "bad-teacher", "original"])
def test_each_method_forgets_the_listed_users(trained, tmp_path, capsys, method, _splits_once):
    from privrec.rundir import RunDir

    train_samples = _splits_once(RunDir(trained, create=False).load_config()).train
    users = choose_forget_users(train_samples, 0.1, seed=7)
    users_file = tmp_path / "users.txt"
    users_file.write_text("# users who asked to be forgotten\n" + "\n".join(map(str, users)) + "\n")
    out = tmp_path / method
    code, _, _ = run_cli(capsys, "unlearn", str(trained), "--method", method, "--forget-users", str(users_file),
                         "--out", str(out), "--config", UNLEARN_TINY)
    assert code == 0
    m = metrics(out)
    assert m["method"] == method and json.loads((out / "forget.json").read_text())["users"] == users
    assert m["n_forget"] == sum(s.user_id in set(users) for s in train_samples)
    if method == "original":  # the trained model, untouched: the train run's test metrics exactly
        t = metrics(trained)
        assert m["test_auc"] == pytest.approx(t["auc"], abs=1e-9) and m["unlearn_seconds"] == 0.0
    else:
        assert m["details"]["steps"] > 0 and m["unlearn_seconds"] > 0


def test_unlearn_config_rules():
    base = parse_config({"model": {"name": "tiny-random"}, "lora": {"top_layers": 1}}, UnlearnConfig)
    assert base.unlearn.method == "e2urec" and base.unlearn.forget_fraction == 0.2
    assert student_lora(base).top_layers == 1 and student_lora(base).r == 16  # inherits the run's layers
    part = parse_config({"unlearn": {"e2urec": {"train": {"epochs": 5}, "lora": {"r": 8}}}}, UnlearnConfig)
    t = part.unlearn.e2urec.train
    assert (t.epochs, t.lr, t.batch_size, t.schedule) == (5, 1e-3, 16, "constant")  # other defaults kept
    assert part.unlearn.e2urec.lora.alpha == 32
    bad = [
        ({"forget_users": [1, 2]}, "exactly one"),
        ({"forget_fraction": None}, "exactly one"),
        ({"forget_fraction": None, "forget_users": []}, "empty"),
        ({"forget_fraction": 1.5}, "forget_fraction"),
        ({"e2urec": {"train": {"early_stopping": 1}}}, "without validation"),
        ({"e2urec": {"forget_only_epochs": 3}}, "exceeds"),
        ({"method": "sisa"}, "method"),
        ({"e2urec": {"alpah": 2}}, "unknown key"),
    ]
    for unlearn, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            parse_config({"unlearn": unlearn}, UnlearnConfig)


def _argv(case, trained, retrained, tmp_path):
    users = tmp_path / "users.txt"
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("train:\n  epochs: 3\n")
    out = str(tmp_path / "o")
    base = ["unlearn", str(trained), "--out", out]
    if case == "unknown-user":
        users.write_text("99999\n")
        return base + ["--forget-users", str(users)]
    if case == "malformed-users":
        users.write_text("12\nabc\n")
        return base + ["--forget-users", str(users)]
    return {
        "missing-users-file": base + ["--forget-users", str(tmp_path / "none.txt")],
        "change-trained-setting": base + ["--set", "data.n_train=5"],
        "fraction-out-of-range": base + ["--forget-fraction", "1.5"],
        "other-section-in-config": base + ["--config", str(bad_cfg)],
        "reference-not-a-retrain": base + ["--retrained", str(trained)],
        "reference-other-forget-set": base + ["--forget-fraction", "0.3", "--retrained", str(retrained)],
        "not-a-run": ["unlearn", str(tmp_path), "--out", out],
        "unlearning-run-as-input": ["unlearn", str(retrained), "--out", out],
        "bad-method": base + ["--method", "sisa"],
        "both-forget-options": base + ["--forget-fraction", "0.2", "--forget-users", str(users)],
        "early-stopping": base + ["--set", "unlearn.neggrad.train.early_stopping=1"],
    }[case]


@pytest.mark.parametrize("case", [
    "unknown-user", "malformed-users", "missing-users-file", "change-trained-setting", "fraction-out-of-range",
    "other-section-in-config", "reference-not-a-retrain", "reference-other-forget-set", "not-a-run",
    "unlearning-run-as-input", "bad-method", "both-forget-options", "early-stopping",
])
def test_bad_unlearn_input_exits_2_with_one_line(case, trained, retrained, tmp_path, capsys):
    try:
        code, _, err = run_cli(capsys, *_argv(case, trained, retrained, tmp_path))
    except SystemExit as e:  # argparse errors
        code, err = e.code, capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("privrec") and "Traceback" not in err, err
    expected = {"unknown-user": "no training samples", "malformed-users": "expected a user id",
                "change-trained-setting": "cannot change", "reference-not-a-retrain": "method retrain",
                "reference-other-forget-set": "different set", "other-section-in-config": "only the",
                "unlearning-run-as-input": "an unlearning run"}.get(case)
    if expected:
        assert expected in lines[0]
    if case in ("change-trained-setting", "fraction-out-of-range", "not-a-run", "bad-method"):
        assert not (tmp_path / "o").exists()  # refused before anything was written


def test_forget_fraction_draw_is_seeded_and_never_takes_everyone(ml100k, tiny_splits):
    a = choose_forget_users(tiny_splits.train, 0.2, seed=0)
    assert a == choose_forget_users(tiny_splits.train, 0.2, seed=0)
    assert a != choose_forget_users(tiny_splits.train, 0.2, seed=1)
    n_users = len({s.user_id for s in tiny_splits.train})
    assert len(a) == round(0.2 * n_users) and set(a) <= {s.user_id for s in tiny_splits.train}
    from privrec.errors import UserError

    with pytest.raises(UserError, match="none to retain"):
        choose_forget_users(tiny_splits.train, 0.999, seed=0)
    assert np.all(np.diff(a) > 0)  # sorted, no repeats
    # never-seen samples of the training period come from the protocol's undrawn training part
    assert len(tiny_splits.pool) == 8000 and {s.sample_id for s in tiny_splits.train} <= {
        s.sample_id for s in tiny_splits.pool}


@pytest.mark.parametrize("name", ["tiny", "ml100k"])
def test_shipped_unlearn_configs_resolve(name, tmp_path):
    """configs/unlearn/*.yaml (only the `unlearn:` section) on top of the run configs they are meant for."""
    import shutil

    from privrec.commands.unlearn import load_unlearn_config

    original = {"tiny": "tiny.yaml", "ml100k": "unlearn-ml100k-original.yaml"}[name]
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ROOT / "configs" / original, run / "config.yaml")
    cfg = load_unlearn_config(run, ROOT / "configs" / "unlearn" / f"{name}.yaml", method="retrain")
    assert cfg.unlearn.method == "retrain" and cfg.unlearn.forget_fraction == 0.2
    assert student_lora(cfg).top_layers == cfg.lora.top_layers and student_lora(cfg).r == 16
    if name == "ml100k":
        assert cfg.model.name == "smollm2-135m" and cfg.lora.top_layers == 8 and cfg.data.n_train == 1024
        assert cfg.unlearn.e2urec.alpha == 2.0 and cfg.unlearn.e2urec.beta == 0.4


@pytest.mark.parametrize("method", ["e2urec", "neggrad", "bad-teacher"])
def test_approximate_budgets_scale_with_the_request_not_the_training_set(trained, tmp_path, capsys, method,
                                                                         _splits_once):
    """A one-user request sees retain_per_forget retained items per forgotten item and takes steps in
    proportion to its own size (METHODS §8): far fewer than a ten-user request on the same model."""
    from privrec.rundir import RunDir

    train_samples = _splits_once(RunDir(trained, create=False).load_config()).train
    counts = {u: sum(s.user_id == u for s in train_samples) for u in {s.user_id for s in train_samples}}
    by_size = sorted(counts, key=lambda u: (counts[u], u))
    requests = {"one": [by_size[0]], "ten": by_size[1:11]}  # an edge user; ten more (the tiny run has 64 samples)
    seen = {}
    for name, users in requests.items():
        out = tmp_path / name
        code, _, err = run_cli(capsys, "unlearn", str(trained), "--method", method, "--out", str(out),
                               "--config", UNLEARN_TINY, "--set", f"unlearn.forget_users={users}",
                               "--set", "unlearn.forget_fraction=null",
                               "--set", "unlearn.retain_per_forget=2")
        assert code == 0, err
        m = metrics(out)
        b = m["budget"]
        n_forget = sum(counts[u] for u in users)
        assert b["n_forget"] == m["n_forget"] == n_forget
        assert m["n_retain_pool"] == b["retain"] == min(2 * n_forget, 64 - n_forget)  # two per forgotten one
        steps = m["details"]["student_steps"] if method == "e2urec" else m["details"]["steps"]
        planned = b["steps"][method]["student"] if method == "e2urec" else b["steps"][method]
        assert steps == planned  # the methods spend exactly the budget
        seen[name] = (b["retain"], steps)
    # retained items scale at once; steps once the request outgrows a batch (E2URec's student batch is 16)
    assert seen["one"][0] * 5 <= seen["ten"][0] and seen["one"][1] <= seen["ten"][1]
    cfg = parse_config({**yaml.safe_load((trained / "config.yaml").read_text()),
                        **yaml.safe_load(Path(UNLEARN_TINY).read_text())}, UnlearnConfig)
    small, large = request_budget(cfg, 10, 10_000), request_budget(cfg, 100, 10_000)
    assert large["retain"] == 10 * small["retain"]
    assert large["steps"]["neggrad"] >= 5 * small["steps"]["neggrad"]
    assert large["steps"]["e2urec"]["student"] >= 5 * small["steps"]["e2urec"]["student"]
