"""``privrec shard-train``: one LoRA adapter per shard, evaluated under every aggregation (METHODS §4, §6).

The procedure (torchtune style, one fixed life):
  1. lock the run, open its deletion ledger, read the tombstones (deleted data stays deleted: every sample
     showing a tombstoned interaction is dropped from the splits before anything else happens);
  2. data, then the model (the prompt builder needs the dataset); the fresh LoRA init is kept as the one
     starting point of every shard;
  3. tokenise once, fill the frozen-layer cache once (with ``lora.top_layers`` it is shared by all shards,
     the full retrain and every later ``forget``);
  4. the untuned model's hidden states (cached per run in ``features.npz``) for the partition and the
     neighbour search;
  5. partition, then train every shard from the common init with the one training loop and save it with
     its lineage (``adapters/shard-k``), recording each in the ledger (every shard through the executor: one
     after another here, or one Ray task each with ``executor: ray``, a sliced shard's task returning its
     checkpoints; this process alone writes);
  6. optionally the full-retrain baseline (one adapter on all shards' samples; its adapter is not kept);
  7. score: every single adapter, SISA, uniform, APA(D), APA(ND); write ``metrics.json``.

The shards' pieces (config, seeded training of one shard, features, scoring) are in
``privrec.unlearning.exact.shards``; the model directory is a ``shards`` model (privrec.models).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from privrec import baselines, models
from privrec.config import ExecutorConfig
from privrec.errors import RunError
from privrec.executor import open_executor
from privrec.metrics import binary_metrics
from privrec.model.adapters import load_adapter_state, read_adapter
from privrec.prepare import machine
from privrec.rundir import LEDGER_FILE, RunDir, run_lock
from privrec.train import TrainResult, train
from privrec.unlearning.exact.ledger import Ledger
from privrec.unlearning.exact.partition import partition
from privrec.unlearning.exact.shards import (
    ApaConfig,
    ShardJob,
    build_model,
    evaluate_shards,
    job_encodings,
    load_features,
    model_batch,
    plain_encodings,
    reusable,
    save_checkpoints,
    save_trained,
    setup_shard_data,
    shard_dir,
    shard_folders,
    shard_meta,
    train_task,
)
from privrec.unlearning.exact.slices import (
    check_checkpoints,
    checkpoint_set,
    slice_map,
    sliced_fields,
)


def run_shard_train(cfg: ApaConfig, out: str | Path, resume: bool = False, progress: bool = True,
                    executor: ExecutorConfig | None = None) -> dict:
    """Train K shard adapters and evaluate every aggregation; returns metrics.json's content.

    ``executor`` (default: the config's ``executor`` section): the shards run one after another here
    (``local``) or as Ray tasks (``ray``), with the same adapters, checkpoints, ledger rows and manifest either
    way.

    With ``resume``, a shard whose saved adapter already holds exactly its shard's samples under the same
    config is kept instead of retrained.

    Raises:
        UserError: bad data, model or config. RunError: the run is busy, has an unfinished deletion
            request, or its ledger belongs to another data source.
    """
    run = RunDir(out)
    with run_lock(run.path):
        # 1. the ledger first: tombstoned samples never reach training
        ledger = Ledger(run / LEDGER_FILE)
        ledger.bind_source(cfg.data.source, cfg.data.path)
        pending = ledger.unfinished()
        if pending:
            raise RunError(
                f"deletion request {pending['id']} is unfinished ({pending['status']}); "
                f"finish it first: privrec forget {run.path} --resume"
            )
        tombstones = ledger.tombstones()
        # 2. data, then the model (the prompt builder needs the dataset's records)
        splits = setup_shard_data(cfg, tombstones)
        model, init_state = build_model(cfg, splits)
        run.write_config(cfg)
        run.log(
            f"privrec shard-train -> {run.path} (model {cfg.model.name}, K={cfg.shards.k}, partition "
            f"{cfg.shards.partition}, {len(tombstones)} tombstoned interactions)"
        )
        run.log(f"samples: {len(splits.train)} train, {len(splits.valid)} valid, {len(splits.test)} test")

        # 3. tokenise once; the frozen-layer cache once for every prompt (shared by all shards). With counted
        #    features (METHODS §12) the partition reads the training prompts without them (plain), each shard
        #    trains on its own features (train_shard), and validation / test show those of all shards' samples
        need_train = cfg.shards.partition in ("semantic", "kmeans-balanced", "user", "semantic-users")
        need_pool = any(a in ("apa-d", "apa-nd") for a in cfg.shards.aggregations)
        tr, va, te = model.encode(splits.train), model.encode(splits.valid), model.encode(splits.test)
        plain = plain_encodings(model, splits.train) if cfg.shows_labels and need_train else tr
        t0 = time.perf_counter()
        model.prepare((plain if plain is not tr else []) + tr + va + te, model_batch(cfg), progress)
        cache_seconds = time.perf_counter() - t0

        # 4. untuned hidden states: train (partition), valid + test (neighbours); only where needed
        t0 = time.perf_counter()
        f_tr = load_features(run, model, cfg, plain, progress) if need_train else None
        f_va = load_features(run, model, cfg, va, progress) if need_pool else None
        f_te = load_features(run, model, cfg, te, progress) if need_pool else None
        features_seconds = time.perf_counter() - t0

        # 5. partition and train every shard from the common init
        t0 = time.perf_counter()
        shards = partition(
            cfg.shards.partition,
            [s.sample_id for s in splits.train],
            cfg.shards.k,
            cfg.seed,
            features=f_tr,
            users=[s.user_id for s in splits.train],
            iters=cfg.shards.iters,
        )
        partition_seconds = time.perf_counter() - t0
        run.log(f"partition {cfg.shards.partition}: shard sizes {[len(s) for s in shards]}")
        by_id = {s.sample_id: s for s in splits.train}
        origin = ledger.next_origin("shard-train")
        plan = []  # (k, samples, slice map or None, kept adapter or None), in shard order
        for k, ids in enumerate(shards):
            samples = [by_id[i] for i in ids]
            slices = slice_map(samples, cfg.shards.slices) if cfg.shards.slices > 1 else None
            kept = reusable(shard_dir(run, k), cfg, samples, slices) if resume else None
            if kept is not None and slices is not None and check_checkpoints(
                    checkpoint_set(run.path, k), read_adapter(shard_dir(run, k))[1], by_id, tombstones):
                kept = None  # its checkpoints are not all there: train the shard again
            plan.append((k, samples, slices, kept))
        # every shard to train is one unit of the executor (a Ray task with `executor: ray`), saved here as it
        # finishes (a sliced shard's unit returns its checkpoints too, written here)
        t_shards = time.perf_counter()
        jobs = [ShardJob(k, samples, None if slices is None else _of(samples, slices))
                for k, samples, slices, kept in plan if kept is None]
        if cfg.shows_labels:  # each shard's prompts show its own features: cached here, not in a task
            model.prepare([e for job in jobs for e in job_encodings(model, cfg, job)],
                          model_batch(cfg), progress)
        trained: dict[int, tuple] = {}

        def save(i: int, result: tuple) -> None:
            job, (state, res, checkpoints) = jobs[i], result
            set_dir = checkpoint_set(run.path, job.k)
            shutil.rmtree(set_dir, ignore_errors=True)  # of an earlier training of this shard
            meta = shard_meta(cfg, model, job.k, job.samples, origin, res)
            if job.slices is not None:
                save_checkpoints(model, cfg, set_dir, job, checkpoints,
                                 shard_meta(cfg, model, job.k, job.samples, origin, TrainResult()))
                meta = dict(meta, **sliced_fields(cfg, job.slice_ids, set_dir))
            save_trained(model, shard_dir(run, job.k), state, meta)
            trained[job.k] = (state, res)

        with open_executor(executor or cfg.executor, run.path, run.log) as ex:
            ex.map(train_task, (model, init_state, cfg, progress), jobs, labels=[f"shard {job.k}" for job in jobs],
                   on_result=save, log=run.log)
        states, shard_seconds = [], []
        for k, samples, slices, kept in plan:
            folder = shard_dir(run, k)
            if kept is not None:
                run.log(f"shard {k}: kept (resume), {len(samples)} samples")
                _, meta = read_adapter(folder)
                if (ledger.latest_adapters().get(k) or {}).get("tensors_sha256") != meta["tensors_sha256"]:
                    # saved just before an interruption, never recorded: record it now
                    ledger.record_adapter(
                        k, meta["tensors_sha256"], meta["lineage_sha256"], len(samples), origin
                    )
                states.append(kept)
                shard_seconds.append(0.0)
                continue
            state, res = trained[k]
            _, meta = read_adapter(folder)
            ledger.record_adapter(k, meta["tensors_sha256"], meta["lineage_sha256"], len(samples), origin)
            states.append(state)
            shard_seconds.append(res.seconds)
            run.log(f"shard {k}: {len(samples)} samples"
                    + (f" in {len(slices)} slices of {[len(sl) for sl in slices]}" if slices else "")
                    + f", trained {res.seconds:.1f}s"
                    + (f", last loss {res.history[-1]['train_loss']:.4f}" if res.history else ""))
        shards_wall = time.perf_counter() - t_shards
        _retire_extra_shards(run, ledger, cfg.shards.k, origin)
        models.write(run.path, models.build(cfg, run.path, "shards", partition=cfg.shards.partition,
                                            aggregations=cfg.shards.aggregations, primary=cfg.shards.primary,
                                            slices=cfg.shards.slices, forget=["retrain-shards"]))

        # 6. the full-retrain baseline (not kept)
        retrain = None
        if cfg.shards.full_retrain:
            load_adapter_state(model.model, init_state)
            res = train(model, tr, cfg.train, cfg.seed, progress=progress)
            t0 = time.perf_counter()
            probs = model.score(te, model_batch(cfg), progress)
            retrain = binary_metrics([s.label for s in splits.test], probs, [s.user_id for s in splits.test])
            retrain.update(train_seconds=res.seconds, score_seconds=time.perf_counter() - t0, n_train=len(tr))
            run.log(f"full retrain: {len(tr)} samples, {res.seconds:.1f}s, test AUC {retrain['auc']:.4f}")

        # 7. score every aggregation
        ev = evaluate_shards(cfg, model, splits.valid, splits.test, va, te, f_va, f_te, states, progress,
                             [[by_id[i].user_id for i in ids] for ids in shards])
        primary = ev.metrics["aggregations"][cfg.shards.primary]
        metrics = dict(primary)
        metrics.update(ev.metrics)
        for single, ids in zip(metrics["single_shards"], shards):
            single["n_train"] = len(ids)
        metrics.update(
            {
                "method": cfg.shards.primary,
                "partition": cfg.shards.partition,
                "k": cfg.shards.k,
                "slices": cfg.shards.slices,
                "shards": [len(s) for s in shards],
                "retrain": retrain,
                "n_train": len(splits.train),
                "n_valid": len(splits.valid),
                "n_test": len(splits.test),
                "n_tombstoned_interactions": len(tombstones),
                "train_seconds": float(sum(shard_seconds)),
                "shard_train_seconds": shard_seconds,
                "shards_wall_seconds": shards_wall,  # step 5's wall time: the shards at once with `ray`
                "cache_seconds": cache_seconds,
                "features_seconds": features_seconds,
                "partition_seconds": partition_seconds,
                "score_seconds": ev.seconds,
                "references": baselines.references(
                    splits.dataset, splits.train, splits.test, cfg.data.like_threshold, cfg.seed
                ),
                "model": cfg.model.name,
                "protocol": cfg.data.protocol,
            }
        )
        metrics["machine"] = machine()
        run.write_metrics(metrics)
        run.log(
            "test AUC: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics["auc_by_aggregation"].items())
            + f"; single shards mean {metrics['single_shard_mean_auc']:.4f}"
        )
        ledger.close()
        return metrics




def _of(samples: list, slices: list[list[str]]) -> list[list]:
    """A slice map of ids as slices of the samples."""
    by_id = {s.sample_id: s for s in samples}
    return [[by_id[i] for i in sl] for sl in slices]


def _retire_extra_shards(run: RunDir, ledger: Ledger, k: int, origin: str) -> None:
    """A re-partition into fewer shards removes the shards it no longer has (and their checkpoints)."""
    for j, folder in shard_folders(run).items():
        if j >= k:
            shutil.rmtree(checkpoint_set(run.path, j), ignore_errors=True)
            shutil.rmtree(folder)
            ledger.record_adapter(j, None, None, 0, origin)
            run.log(f"shard {j}: removed (run now has K={k})")
