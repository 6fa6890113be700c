"""The ``unlearn`` procedure: take a trained run, forget users with one method, measure, write OUT/.

Its life, top to bottom (torchtune style): resolve the config (the trained run's own + the ``unlearn``
section), rebuild the run's data and model and check they are the ones that trained its adapter, choose the
forget users, read the retrained reference if one is given, draw the membership-inference sets, tokenise and
fill the frozen-layer cache (timed apart), run the method (timed: ``unlearn_seconds``), save its adapter,
score it and write every measure of ``privrec.unlearning.measures`` to OUT/metrics.json (METHODS §5, §7).

OUT holds ``config.yaml`` (resolved UnlearnConfig), ``forget.json`` (users and sample ids forgotten),
``adapters/default/`` (one peft adapter; ``privrec.json`` says whether it is exact), ``metrics.json``,
``predictions_forget.csv``, ``predictions_test.csv`` and ``log.txt``.
"""

from __future__ import annotations

import copy
import csv
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from privrec import models
from privrec.config import apply_overrides, parse_config, read_yaml
from privrec.data import Sample, Splits, augment
from privrec.errors import ConfigError, RunError, UserError
from privrec.model.adapters import install_adapter, originals, read_adapter, save_adapter
from privrec.prepare import (
    adapter_meta,
    features_record,
    machine,
    setup_data,
    setup_model,
    user_interactions,
    write_predictions,
)
from privrec.rundir import (
    ADAPTERS_DIR,
    CERTIFICATES_DIR,
    CONFIG_FILE,
    FEATURES_FILE,
    METRICS_FILE,
    PREDICTIONS_FORGET,
    SINGLE_ADAPTER,
    STAGING_DIR,
    RunDir,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from privrec.unlearning.approx import baselines
from privrec.unlearning.approx.e2urec import e2urec
from privrec.unlearning.approx.influence import hessian_items, influence
from privrec.unlearning.approx.task import (
    METHOD_NAMES,
    UnlearnConfig,
    Unlearned,
    Unlearner,
    UnlearnTask,
    choose_forget_users,
    draw,
    read_user_file,
    request_budget,
    split_by_users,
)
from privrec.unlearning.exact.ledger import deleted_interactions
from privrec.unlearning.exact.shards import ApaConfig
from privrec.unlearning.measures import MiaSets, Outputs, forgetting_measures

METHODS: dict[str, Unlearner] = {"e2urec": e2urec, "neggrad": baselines.neggrad,
                                 "bad-teacher": baselines.bad_teacher, "influence": influence,
                                 "retrain": baselines.retrain, "original": baselines.original}
assert set(METHODS) == set(METHOD_NAMES)

FORGET_FILE = "forget.json"
UNLEARN_FILE = "unlearn.yaml"  # a shards model unlearnt in a copy keeps its own config.yaml beside this
# what an unlearning run may set besides its own section; everything else is the trained run's and fixed
CHANGEABLE = ("unlearn.", "model.threads", "model.precision", "train.eval_batch_size")
MIN_UNSEEN = 8  # fewer never-seen samples of the forget users than this: compare with all users' instead


# --- 0. what kind of model ---------------------------------------------------------------------------------
def unlearnable(run_path: str | Path):
    """The manifest of a model ``privrec unlearn`` can take: one adapter that can be unlearnt approximately, or
    shards (measured with their exact retrain-shards, ``--method retrain``, or as they are, ``original``).

    Raises:
        RunError: not a model directory. UserError: a kind or model that cannot, in one line naming what can.
    """
    m = models.load(run_path)
    if (m.kind == "single" and "approximate" in m.forget) or (m.kind == "shards" and "retrain-shards" in m.forget):
        return m
    if m.kind == "student":
        raise UserError(f"{run_path} is an unlearning run ({m.describe()}, method {m.method}); unlearn from the "
                        f"model it came from: privrec unlearn {m.original} --out DIR")
    if m.kind == "clients":
        raise UserError(f"{run_path} is {m.describe()}: the approximate methods act on one adapter, not on "
                        f"per-client adapters; forget from it exactly with privrec forget {run_path} --users ... "
                        "(docs/federated.md), or unlearn from a privrec train model")
    why = ("it was written before lineage hashes covered sample content" if m.inferred
           else "it is a ranking model")
    raise UserError(f"{run_path} is {m.describe()} that cannot be unlearnt: {why}; train it again with privrec train")


# --- 1. config ---------------------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_unlearn_config(run_path: str | Path, config_file: str | Path | None = None,
                        overrides: list[str] | None = None, method: str | None = None,
                        forget_users_file: str | Path | None = None,
                        forget_fraction: float | None = None) -> UnlearnConfig:
    """The trained run's config.yaml + an ``unlearn:`` YAML + ``--set`` + the command-line choices.

    Raises:
        RunError: RUN is not a trained run directory.
        ConfigError: the unlearn YAML holds other sections, an override changes the trained run's settings,
            or a value is invalid.
        DataError: the forget-users file is missing or malformed.
    """
    run = RunDir(run_path, create=False)
    path = run / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{run.path} has no {CONFIG_FILE}: not a privrec run directory")
    raw = yaml.safe_load(path.read_text()) or {}
    if "unlearn" in raw:
        raise RunError(f"{run.path} is an unlearning run; give the trained run (privrec train --out DIR)")
    trained = _flatten(copy.deepcopy(raw))
    if config_file is not None:
        p = Path(config_file)
        extra = read_yaml(p)
        if not isinstance(extra, dict) or set(extra) - {"unlearn"}:
            raise ConfigError(f"{p}: an unlearning config holds only the `unlearn:` section (the rest is the "
                              "trained run's)")
        raw["unlearn"] = extra.get("unlearn") or {}
    apply_overrides(raw, overrides or [])
    section = raw.setdefault("unlearn", {})
    if not isinstance(section, dict):
        raise ConfigError("unlearn: must be a section")
    if method is not None:
        section["method"] = method
    if forget_users_file is not None:
        section["forget_users"], section["forget_fraction"] = read_user_file(forget_users_file), None
    elif forget_fraction is not None:
        section["forget_fraction"], section["forget_users"] = forget_fraction, None
    for key, value in _flatten({k: v for k, v in raw.items() if k != "unlearn"}).items():
        if trained.get(key, object()) != value and not key.startswith(CHANGEABLE):
            raise ConfigError(f"{key}: an unlearning run cannot change the trained run's settings (only "
                              "unlearn.*, model.threads, model.precision, train.eval_batch_size)")
    return parse_config(raw, ShardUnlearnConfig if "shards" in raw else UnlearnConfig)


class ShardUnlearnConfig(ApaConfig, UnlearnConfig):
    """A shards model's config plus the ``unlearn`` section: ``privrec unlearn`` on a shards model."""


# --- 2. the original run -----------------------------------------------------------------------------------
def load_original(cfg: UnlearnConfig, splits: Splits, run_path: Path, trained: list[Sample],
                  retained: Splits | None = None):
    """(model with the run's adapter as "default", its tensors, its metadata). Prompts that read counted features
    (METHODS §12) show them counted over ``retained`` (the data without the forget users): the unlearning and
    everything after it never read the forgotten labels through a feature.

    Raises:
        RunError: no adapter, different base weights, or the rebuilt training set differs from the one that
            trained the adapter (so the forget set could not be trusted).
    """
    folder = run_path / unlearnable(run_path).adapters[0].path
    state, meta = read_adapter(folder)
    recorded = meta.get("sample_ids")
    if recorded is not None and sorted(recorded) != sorted({s.source_id for s in trained}):
        raise RunError(f"{folder}: the samples recorded as its lineage are not the ones its config yields; "
                       "was the data changed?")
    model = setup_model(cfg, retained or splits)
    install_adapter(model, folder, state, meta, cfg.model.name)
    return model, state, meta


def read_reference(path: str | Path, forget_ids: list[str]) -> tuple[np.ndarray, float, str]:
    """The retrained run's P(Yes) on our forget samples (in our order), its unlearn_seconds, its path.

    Raises:
        RunError: not a retrain run, or a different forget set.
    """
    ref = RunDir(path, create=False)
    m = read_json(ref / METRICS_FILE)
    if m.get("kind") != "unlearning" or m.get("method") not in ("retrain", "retrain-shards"):
        raise RunError(f"--retrained {ref.path}: expected the output of `privrec unlearn --method retrain`")
    theirs = read_json(ref / FORGET_FILE)
    if sorted(theirs.get("sample_ids", [])) != sorted(forget_ids):
        raise RunError(f"--retrained {ref.path} forgot a different set of samples; use the same forget users "
                       "(or the same --forget-fraction and seed)")
    with open(ref / PREDICTIONS_FORGET, newline="") as f:
        probs = {row["sample_id"]: float(row["p_yes"]) for row in csv.DictReader(f)}
    return np.array([probs[i] for i in forget_ids]), float(m["unlearn_seconds"]), str(ref.path)


def mia_samples(cfg: UnlearnConfig, splits: Splits, trained: list[Sample], forget_users: list[int],
                retained: list[Sample]) -> tuple[dict[str, list[Sample]], dict[str, str]]:
    """The attack's samples: retained members to fit on, never-seen samples of other users to fit on, and
    never-seen samples of the forget users to compare the forget set with (METHODS §7)."""
    mia, seed = cfg.unlearn.mia, cfg.forget_seed
    pool: list[Sample] = []
    if mia.unseen in ("auto", "unused-train"):
        used = {s.source_id for s in trained}
        pool = [s for s in splits.pool if s.sample_id not in used]
        if not pool and mia.unseen == "unused-train":
            raise UserError("unlearn.mia.unseen=unused-train: the run trained on every training-period sample "
                            "(data.n_train is unset); use valid-test")
    source = "unused-train" if pool else "valid-test"
    pool = pool or (splits.valid + splits.test)
    fu = set(forget_users)
    same_users = [s for s in pool if s.user_id in fu]
    other_users = [s for s in pool if s.user_id not in fu]
    if len(same_users) >= MIN_UNSEEN and len(other_users) >= MIN_UNSEEN:
        unseen_eval, unseen_fit, eval_users = same_users, other_users, "forget-users"
    else:  # too few never-seen samples of the forget users: halve the whole pool
        order = np.random.default_rng([seed, 20]).permutation(len(pool))
        half = len(pool) // 2
        unseen_eval = [pool[i] for i in sorted(order[:half])]
        unseen_fit = [pool[i] for i in sorted(order[half:])]
        eval_users = "all-users"
    n = mia.max_samples
    sets = {"members_fit": draw(retained, n, [seed, 23]), "unseen_fit": draw(unseen_fit, n, [seed, 22]),
            "unseen_eval": draw(unseen_eval, n, [seed, 21])}
    return sets, {"mia_unseen_source": source, "mia_unseen_eval_users": eval_users}


def forget_set(cfg: UnlearnConfig, splits: Splits, trained: list[Sample], run_path: Path
               ) -> tuple[list[int], list[Sample], list[Sample]]:
    """(the forget users, their training items, every other training item): the users given, or
    ``forget_fraction`` of the training users drawn with the forget seed.

    Raises:
        UserError: a forget user without training samples, or nothing left to retain.
    """
    users = cfg.unlearn.forget_users or choose_forget_users(splits.train, cfg.unlearn.forget_fraction,
                                                            cfg.forget_seed)
    unknown = sorted(set(users) - {s.user_id for s in splits.train})
    if unknown:
        raise UserError(f"{len(unknown)} of the forget users have no training samples in {run_path} "
                        f"(e.g. {unknown[:5]}); nothing of theirs to unlearn")
    forget_s, retain_s = split_by_users(trained, users)
    if not retain_s:
        raise UserError("the forget users own every training sample: nothing is left to retain")
    return users, forget_s, retain_s


def measure(cfg: UnlearnConfig, splits: Splits, labels: dict[str, list], probs: dict[str, np.ndarray],
            ref_probs: np.ndarray | None, seconds: float, ref_seconds: float | None) -> dict:
    """Every measure of forgetting (METHODS §5, §7) from the unlearnt model's P(Yes) on the test set, the
    forget set and the attack's sets (``probs`` keyed test, forget_eval, members_fit, unseen_fit,
    unseen_eval)."""

    def outputs(key: str) -> Outputs:
        return Outputs(labels[key], probs[key])

    return forgetting_measures(
        outputs("test"), outputs("forget_eval"), test_users=[s.user_id for s in splits.test],
        retain=outputs("members_fit"),
        mia=MiaSets(outputs("members_fit"), outputs("unseen_fit"), outputs("forget_eval"), outputs("unseen_eval")),
        reference_forget_probs=ref_probs, seconds=seconds, reference_seconds=ref_seconds, seed=cfg.seed)


def record(cfg: UnlearnConfig, splits: Splits, method: str, exact: bool, run_path: Path, ref_path: str | None,
           ref_seconds: float | None, users: list[int], forget_s: list[Sample], retain_s: list[Sample]) -> dict:
    """What an unlearning run's metrics.json says about the run itself, beside the measures."""
    return {
        "kind": "unlearning", "method": method, "exact": exact, "original_run": str(run_path),
        "retrained_reference": ref_path, "retrain_seconds": ref_seconds,
        "n_train": len(splits.train), "n_users_train": len({s.user_id for s in splits.train}),
        "n_forget_users": len(users), "n_forget_items": len(forget_s), "n_retain_items": len(retain_s),
        "forget_sample_fraction": len(originals(forget_s)) / len(splits.train),
        "model": cfg.model.name, "protocol": cfg.data.protocol, "seed": cfg.seed, "machine": machine(),
    }


# --- the procedure -----------------------------------------------------------------------------------------
def run_unlearn(cfg: UnlearnConfig, run_path: str | Path, out: str | Path, retrained: str | Path | None = None,
                progress: bool = True) -> dict:
    """Forget users from a trained run with ``cfg.unlearn.method``; returns metrics.json's content.

    Raises:
        UserError: bad run directory, forget users not in the training set, nothing left to retain, a
            reference run with a different forget set.
    """
    run_path = Path(run_path)
    if isinstance(cfg, ApaConfig):
        return run_unlearn_shards(cfg, run_path, out, retrained, progress)
    method = cfg.unlearn.method
    # 1. the original run's samples (everything up to step 4 happens before OUT is touched, so bad input
    #    fails with its one-line error and leaves nothing behind)
    deleted = deleted_interactions(run_path, cfg.data)
    splits = setup_data(cfg, deleted)  # a model that forgot data keeps it forgotten
    trained = augment(splits.train, cfg.augment.shuffle, cfg.augment.mask, cfg.augment.copies, cfg.seed,
                   splits.dataset.schema.kv_keys())

    # 2. the forget set: every training sample (augmented copies too) of the forget users
    users, forget_s, retain_s = forget_set(cfg, splits, trained, run_path)
    forget_eval, retained = originals(forget_s), originals(retain_s)
    forget_ids = [s.sample_id for s in forget_eval]

    # 3. the retrained reference (divergence and speed-up are measured against it)
    ref_probs, ref_seconds, ref_path = None, None, None
    if retrained is not None:
        ref_probs, ref_seconds, ref_path = read_reference(retrained, forget_ids)
    # 4. the original model, checked against the adapter's lineage, its prompts' counted features recounted
    #    without the forget users (METHODS §12: the retained set's); the attack's samples
    kept = setup_data(cfg, deleted | user_interactions(splits.dataset, users)) if cfg.shows_labels else None
    model, original_state, original_meta = load_original(cfg, splits, run_path, trained, kept)
    mia_s, mia_info = mia_samples(cfg, splits, trained, users, retained)

    out_run = RunDir(out)
    out_run.write_config(cfg)
    atomic_write_json(out_run / FORGET_FILE, {"users": users, "sample_ids": sorted(forget_ids),
                                              "n_trained_items": len(forget_s)})
    out_run.log(f"privrec unlearn {run_path} --method {method} -> {out_run.path}")
    out_run.log(f"forgetting {len(users)} of {len({s.user_id for s in splits.train})} training users: "
                f"{len(forget_eval)} of {len(splits.train)} training samples ({len(forget_s)} items with "
                f"augmented copies); {len(retain_s)} retained items")

    # 5. tokenise once; fill the frozen-layer cache apart from the timed unlearning
    bs = cfg.train.eval_batch_size
    enc = {name: model.encode(s) for name, s in [("forget", forget_s), ("retain", retain_s),
                                                  ("valid", splits.valid), ("test", splits.test),
                                                  ("forget_eval", forget_eval)] + list(mia_s.items())}
    budget = request_budget(cfg, len(enc["forget"]), len(enc["retain"]))  # in proportion to the request
    retain_pool = draw(enc["retain"], budget["retain"], [cfg.forget_seed, 17])
    needed = enc["forget"] + retain_pool + enc["test"] + enc["forget_eval"]
    needed += [e for k in mia_s for e in enc[k]]
    if method == "retrain":
        needed += enc["retain"] + enc["valid"]
    elif method == "influence":  # the retained items its Hessian is estimated on
        needed += hessian_items(cfg.unlearn.influence, enc["retain"], cfg.seed)
    t0 = time.perf_counter()
    model.prepare(needed, bs, progress)
    cache_seconds = time.perf_counter() - t0

    # 6. unlearn (timed)
    task = UnlearnTask(cfg, splits.dataset, model, original_state, enc["forget"], enc["retain"], retain_pool,
                       enc["valid"], cfg.seed, progress, log=out_run.log)
    t0 = time.perf_counter()
    result: Unlearned = METHODS[method](task)
    unlearn_seconds = 0.0 if method == "original" else time.perf_counter() - t0
    out_run.log(f"{method}: unlearned in {unlearn_seconds:.1f}s")

    # 7. the unlearned adapter, with what it may claim about its lineage
    exact = result.trained_on_retained_only
    # every sample whose gradient reached these weights: approximate methods start from the original
    lineage = {} if exact else {k: original_meta.get(k) for k in ("sample_ids", "lineage_sha256")}
    if kept is not None:  # what its prompts' features were counted over: the data without the forget users
        lineage["features"] = features_record(cfg, kept)
    save_adapter(result.model.model, out_run / ADAPTERS_DIR / SINGLE_ADAPTER, adapter_meta(
        cfg, result.model, originals(retain_s), method=method, exact=exact, original_run=str(run_path),
        lora=result.lora.model_dump(), forgotten_users=users,
        forgotten_sample_ids=sorted({s.source_id for s in forget_s}), **lineage))
    models.write(out_run.path, models.build(cfg, out_run.path, "student", method=method, exact=exact,
                                            original=str(run_path), forgotten_users=users, forget=[]))

    # 8. measure
    um = result.model
    t0 = time.perf_counter()
    probs = {k: um.score(enc[k], bs, progress) for k in ("test", "forget_eval", *mia_s)}
    score_seconds = time.perf_counter() - t0

    if method == "retrain" and ref_probs is None:  # the retrained model is its own reference
        ref_probs, ref_seconds = probs["forget_eval"], unlearn_seconds
    metrics = measure(cfg, splits, {k: [e.label for e in enc[k]] for k in probs}, probs, ref_probs,
                      unlearn_seconds, ref_seconds)
    metrics.update(mia_info)
    metrics.update(record(cfg, splits, method, exact, run_path, ref_path, ref_seconds, users, forget_s, retain_s))
    metrics.update({"n_retain_pool": len(retain_pool), "cache_seconds": cache_seconds, "score_seconds": score_seconds,
                    "budget": budget, "details": result.details})
    write_predictions(out_run / PREDICTIONS_FORGET, forget_eval, probs["forget_eval"])
    write_predictions(out_run / "predictions_test.csv", splits.test, probs["test"])
    out_run.write_metrics(metrics)
    out_run.log(f"{method}: test AUC {metrics['test_auc']:.4f}, forget AUC {metrics['forget_auc']:.4f}, "
                f"MIA loss-threshold accuracy {metrics['mia_loss_accuracy']:.3f}"
                + (f", JSD vs retrain {metrics['jsd_vs_retrain']:.5f}" if metrics["jsd_vs_retrain"] is not None
                   else ""))
    return metrics


SHARD_METHODS = ("retrain", "original")


def run_unlearn_shards(cfg: ShardUnlearnConfig, run_path: Path, out: str | Path, retrained: str | Path | None = None,
                       progress: bool = True) -> dict:
    """``privrec unlearn`` on a shards model: OUT is a copy of the model that forgot the users exactly with
    ``privrec forget``'s retrain-shards (``--method retrain``: ledger, certificate, only the shards that held
    them retrained) or that forgot nothing (``original``), measured with every measure of forgetting under its
    primary aggregation, so the exact route sits in the same table as E2URec. OUT stays a shards model:
    ``evaluate``, ``recommend`` and ``forget`` take it; its resolved unlearn settings are ``unlearn.yaml``.

    Raises:
        UserError: an approximate method (they act on one adapter), forget users without training samples,
            an OUT that exists. RunError: a reference run with a different forget set.
    """
    from privrec.recommender import ShardAggregation, open_model
    from privrec.unlearning.exact.forget import run_forget
    from privrec.unlearning.exact.routes import purge_common
    from privrec.unlearning.exact.shards import purge_features

    method = cfg.unlearn.method
    if method not in SHARD_METHODS:
        raise UserError(f"{run_path} is a shards model: privrec unlearn runs --method retrain (its exact "
                        f"retrain-shards, measured) or original on it; {method} acts on one adapter: use a "
                        "privrec train model")
    # 1-3. the model's samples (minus what it already forgot), the forget set, the reference
    splits = setup_data(cfg, deleted_interactions(run_path, cfg.data))
    users, forget_s, retain_s = forget_set(cfg, splits, splits.train, run_path)
    forget_ids = [s.sample_id for s in forget_s]
    ref_probs, ref_seconds, ref_path = None, None, None
    if retrained is not None:
        ref_probs, ref_seconds, ref_path = read_reference(retrained, forget_ids)
    mia_s, mia_info = mia_samples(cfg, splits, splits.train, users, retain_s)
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists: privrec unlearn writes a new copy of the shards model there")

    # 4. the copy, and (retrain) its exact forgetting
    shutil.copytree(run_path, out, ignore=shutil.ignore_patterns(".lock", STAGING_DIR))
    out_run = RunDir(out)
    atomic_write_text(out_run / UNLEARN_FILE, yaml.safe_dump({"unlearn": cfg.unlearn.model_dump(mode="json")},
                                                            sort_keys=False))
    atomic_write_json(out_run / FORGET_FILE, {"users": users, "sample_ids": sorted(forget_ids),
                                              "n_trained_items": len(forget_s)})
    out_run.log(f"privrec unlearn {run_path} --method {method} -> {out_run.path} (shards)")
    details: dict = {}
    t0 = time.perf_counter()
    if method == "retrain":
        cert = run_forget(out, users=users, progress=progress)
        details = {"certificate": f"{CERTIFICATES_DIR}/{cert['body']['request']['id']}.json",
                   "body_sha256": cert["body_sha256"], "affected_shards": cert["body"]["affected_shards"],
                   "shard_retrain_seconds": cert["record"]["retrain_seconds"]}
    unlearn_seconds = 0.0 if method == "original" else time.perf_counter() - t0

    # 5. measure under the primary aggregation (the forgotten samples' features are computed, never cached)
    md = open_model(out)
    scorer = ShardAggregation(md, md.splits())
    t0 = time.perf_counter()
    sets = {"test": splits.test, "forget_eval": forget_s, **mia_s}
    probs = {k: scorer.score(v, progress, own_samples=k != "forget_eval") for k, v in sets.items()}
    score_seconds = time.perf_counter() - t0
    if method == "retrain":  # what scoring them derived from the deleted samples goes again (forget --verify)
        gone = {s.sample_id: s for v in sets.values() for s in v if s.user_id in set(users)}
        purge_features(out_run / FEATURES_FILE, set(gone))
        purge_common(out_run, scorer.model, set(gone), gone)
    if method == "retrain" and ref_probs is None:
        ref_probs, ref_seconds = probs["forget_eval"], unlearn_seconds
    metrics = measure(cfg, splits, {k: [s.label for s in v] for k, v in sets.items()}, probs, ref_probs,
                      unlearn_seconds, ref_seconds)
    metrics.update(mia_info)
    metrics.update(record(cfg, splits, "retrain-shards" if method == "retrain" else method, method == "retrain",
                          run_path, ref_path, ref_seconds, users, forget_s, retain_s))
    metrics.update({"n_retain_pool": len(retain_s), "cache_seconds": 0.0, "score_seconds": score_seconds,
                    "budget": None,  # exact: the affected shards retrain on all their retained samples
                    "details": dict(details, aggregation=md.manifest.primary)})
    write_predictions(out_run / PREDICTIONS_FORGET, forget_s, probs["forget_eval"])
    write_predictions(out_run / "predictions_test.csv", splits.test, probs["test"])
    out_run.write_metrics(metrics)
    out_run.log(f"{method} (shards, {md.manifest.primary}): test AUC {metrics['test_auc']:.4f}, forget AUC "
                f"{metrics['forget_auc']:.4f}, MIA loss-threshold accuracy {metrics['mia_loss_accuracy']:.3f}")
    return metrics
