"""The exact routes of forgetting (METHODS §4, §7): what forgetting exactly means for a model of one adapter
(``retrain-all``) and for a shards model (``retrain-shards``), and the model directory opened with its route
(:func:`session`). The routes of a clients model are :mod:`privrec.federated.forget`; the request state
machine that drives a route is :mod:`privrec.unlearning.exact.forget`.

In the ledger and the certificates an adapter is a numbered *slot*: shard K is slot K, client C is slot C, a
single model's one adapter is slot 0.

- ``retrain-shards`` retrains, from the common init, only the shards that held the deleted data (APA / SISA:
  the others stay bit-identical); a sliced shard replays from the checkpoint before the first slice that lost
  samples (METHODS §9);
- ``retrain-all`` retrains the one adapter from scratch, with ``privrec train``'s own code and seed
  (:func:`privrec.train.retrain_single`), on the same draw of samples minus the deleted ones.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from privrec import models
from privrec.config import ExecutorConfig, ExperimentConfig
from privrec.data import Dataset, Sample, Splits
from privrec.errors import RunError, UserError
from privrec.executor import open_executor
from privrec.model.adapters import (
    adapter_state,
    load_adapter_state,
    read_adapter,
    read_meta,
    save_adapter,
    tensors_digest,
)
from privrec.prepare import (
    Tombstones,
    build_model,
    collab_features,
    counted_features,
    features_record,
    item_stats,
    setup_data,
    source_data,
)
from privrec.rundir import (
    ADAPTERS_DIR,
    CHECKPOINT_FILE,
    FEATURES_FILE,
    LEDGER_FILE,
    PREDICTIONS_GLOB,
    SHARD_PREFIX,
    SINGLE_ADAPTER,
    SLICES_DIR,
    STAGING_DIR,
    RunDir,
    atomic_write_text,
    is_adapter,
    old_of,
    remove_tree,
    run_lock,
    swap_in,
)
from privrec.train import TrainResult, retrain_single
from privrec.unlearning.exact.ledger import Ledger
from privrec.unlearning.exact.shards import (
    ADAPTER_SECTIONS,
    ApaConfig,
    ShardJob,
    job_encodings,
    purge_features,
    reusable,
    save_checkpoints,
    save_trained,
    setup_shard_data,
    shard_dir,
    shard_features,
    shard_folders,
    shard_meta,
    train_task,
)
from privrec.unlearning.exact.shards import build_model as shard_model
from privrec.unlearning.exact.shards import features_record as shard_features_record
from privrec.unlearning.exact.slices import (
    check_checkpoints,
    checkpoint_set,
    complete,
    copy_checkpoint,
    cumulative,
    first_affected,
    load_checkpoint,
    restore,
    sliced_fields,
    stage_dir,
    stage_features_record,
    stage_label,
    train_sliced,
)

Fault = Callable[[str], None]
RETIRED = "RETIRED"  # marker file of a staged adapter that lost all its samples
FEATURES_UNRECORDED = ("its prompts read features counted from other samples' labels, but its adapter does not "
                       "record what they were counted over (trained before features had lineage, or altered)")
FEATURE_KEYS = ("lineage_sha256", "digest", "n_samples")  # what a features record is checked by


def feature_problems(recorded: dict | None, recount: Callable[[], dict], against: str) -> list[str]:
    """Problems of an adapter's (or checkpoint's) ``features`` record against ``recount()``, its recomputation
    from ``against`` (what it must have been counted over): unrecorded, or differing in a :data:`FEATURE_KEYS`."""
    if recorded is None:
        return [FEATURES_UNRECORDED]
    now = recount()
    return [f"its features' {key} differs from {against} (counted outside its lineage, or altered)"
            for key in FEATURE_KEYS if recorded.get(key) != now.get(key)]


class Route:
    """What forgetting exactly means for one kind: its adapter slots, which of them a removal affects, how one
    is retrained without the data, and what else holds a derived copy of it."""

    name = ""
    config: type[ExperimentConfig] = ExperimentConfig  # the config class of the models it forgets
    disjoint = True  # every sample reaches at most one slot (a partition); else every slot holds the union
    fault: Fault | None = None  # called at the route's own step boundaries (a replayed checkpoint; tests crash there)
    executor: ExecutorConfig = ExecutorConfig()  # how independent slots retrain (RetrainShards: Ray tasks with ray)

    def __init__(self, run: RunDir, cfg: ExperimentConfig):
        self.run, self.cfg = run, cfg

    def folders(self) -> dict[int, Path]:
        """slot -> adapter folder, as on disk now."""
        raise NotImplementedError

    def folder_of(self, k: int) -> Path:
        """Where slot ``k``'s adapter lives (whether or not it is there now: a swap may be half done)."""
        raise NotImplementedError

    def label(self, k: int) -> str:
        raise NotImplementedError

    def affected(self, removed: list[dict]) -> set[int]:
        """The slots a request's removed samples ({sample_id, split, shard}) force to retrain."""
        return {x["shard"] for x in removed if x["shard"] is not None}

    def retrain(self, rid: str, k: int, ids: list[str], universe: dict[str, Sample], tombstones: set,
                staged: Path, progress: bool) -> None:
        """Train slot ``k`` from scratch without the deleted data into ``staged`` (unless already there)."""
        raise NotImplementedError

    def retrain_slots(self, rid: str, jobs: dict[int, list[str]], universe: dict[str, Sample], tombstones: set,
                      staged: dict[int, Path], progress: bool) -> None:
        """:meth:`retrain` every slot of ``jobs`` (slot -> the ids it keeps) into ``staged[slot]``; here one after
        another (a route whose slots are independent may run them at once)."""
        for k, ids in jobs.items():
            self.retrain(rid, k, ids, universe, tombstones, staged[k], progress)

    def purge(self, removed_ids: set[str], universe: dict[str, Sample], before: Tombstones = frozenset()) -> str:
        """Drop derived copies of the removed samples (``before``: the interactions deleted before this
        request); returns what was dropped, for the log."""
        return purge_common(self.run, self.cached_model(before), removed_ids, universe)

    def cached_model(self, before: Tombstones = frozenset()):
        """A model of this run with its frozen-layer cache (None: the run's LoRA caches no frozen layers), to
        find the cache entries of samples; prompts that read counted features render them as they were with
        the interactions ``before`` deleted (default: as trained)."""
        lora = self.cfg.lora
        if not (lora.top_layers and lora.cache_frozen):
            return None
        if not self.cfg.shows_labels:
            return build_model(self.cfg, source_data(self.cfg)[0])
        splits = setup_data(self.cfg, before)
        return build_model(self.cfg, splits.dataset, stats=item_stats(self.cfg, splits),
                           collab=collab_features(self.cfg, splits))

    def installed(self) -> None:
        """After the swap: drop what still holds the old adapters."""

    def install_slot(self, rid: str, k: int, retired: bool) -> None:
        """Before slot ``k``'s adapter is swapped in: swap in what goes with it (a sliced shard's checkpoints)."""

    def problems(self, k: int, folder: Path, universe: dict[str, Sample], tombstones: set) -> list[str]:
        """Problems of what goes with slot ``k``'s adapter (a sliced shard's checkpoints)."""
        return []

    def stray(self) -> list[str]:
        """Problems of derived copies no current adapter accounts for."""
        return []

    def run_info(self) -> dict:
        return {"kind": "", "forget": self.name, "base_model": self.cfg.model.name,
                "config_digest": self.cfg.digest(), "data_source": self.cfg.data.source}


class Checkpointed(Route):
    """Slots whose adapter may come with SISA checkpoints (METHODS §9): ``slices/{prefix}K/stage-S``."""

    prefix = SHARD_PREFIX

    def checkpoints(self, root, k: int) -> Path:
        return checkpoint_set(root, k, self.prefix)

    def install_slot(self, rid, k, retired):
        staged, final = self.checkpoints(self.run / STAGING_DIR / rid, k), self.checkpoints(self.run.path, k)
        if staged.exists():
            swap_in(staged, final)  # the replaced checkpoints held the deleted data
        elif retired:
            remove_tree(final)
        remove_tree(old_of(final))  # a swap a crash interrupted

    def problems(self, k, folder, universe, tombstones):
        meta = read_meta(folder)
        here = self.checkpoints(self.run.path, k)
        if not meta.get("slices") and not here.exists():
            return []
        return check_checkpoints(here, meta, universe, tombstones)

    def stray(self):
        base = self.run / SLICES_DIR
        have = {f"{self.prefix}{k}" for k in self.folders()}
        return [f"checkpoints {p.name} belong to no current {self.prefix.rstrip('-')}" for p in sorted(base.iterdir())
                if p.name not in have] if base.is_dir() else []

    def resume_point(self, there: Path, old: dict, slices: list[list[str]], j: int) -> int:
        """The stage a replay of a slot whose first affected slice is ``j`` continues after: the last checkpoint
        this request already staged with the right samples (a resumed request), else ``j - 1``."""
        r = len(slices)
        return next((s for s in range(r - 1, j - 1, -1) if complete(stage_dir(there, s))
                     and read_meta(stage_dir(there, s)).get("sample_ids") == cumulative(slices, s)), j - 1)

    def stage_unaffected(self, here: Path, there: Path, j: int) -> None:
        """The checkpoints before slice ``j`` are kept: copied beside the replayed ones in staging."""
        for s in range(1, j):
            if not complete(stage_dir(there, s)):
                copy_checkpoint(stage_dir(here, s), stage_dir(there, s))


class RetrainShards(Checkpointed):
    name = "retrain-shards"
    config = ApaConfig

    def __init__(self, run, cfg):
        super().__init__(run, cfg)
        self._model = None

    def folders(self):
        return shard_folders(self.run)

    def folder_of(self, k):
        return shard_dir(self.run, k)

    def label(self, k):
        return f"shard {k}"

    def _built(self):
        """The shards' model, built once (each retrain shows its shard's own features: train_shard)."""
        if self._model is None:
            ds, _, sp = source_data(self.cfg)
            self._model = shard_model(self.cfg, Splits(ds, sp.train, [], []))
        return self._model

    def retrain(self, rid, k, ids, universe, tombstones, staged, progress):
        self.retrain_slots(rid, {k: ids}, universe, tombstones, {k: staged}, progress)

    def retrain_slots(self, rid, jobs, universe, tombstones, staged, progress):
        """The shards retrain as units of the executor, each saved into staging here as it finishes (a staged
        adapter already there is kept: a resumed request): an unsliced shard from the common init; a sliced one
        (METHODS §9) replays from the checkpoint before its first affected slice: here, stage by stage with each
        checkpoint written as it is reached (``executor: local``), or as one Ray task that returns them."""
        todo, replays = [], {}
        for k, ids in jobs.items():
            old = read_meta(self.folders()[k])
            if old.get("slices"):
                got = self._replay_job(rid, k, ids, universe, old, staged[k])
                if got is None:
                    continue
                if self.executor.kind == "local":
                    self._replay(rid, got, staged[k], progress)
                else:
                    todo.append(got[0])
                    replays[k] = got[1]
            elif reusable(staged[k], self.cfg, [universe[i] for i in ids]) is None:
                todo.append(ShardJob(k, [universe[i] for i in ids]))
        if not todo:
            return
        model, init_state = self._built()
        if self.executor.kind != "local":  # the tasks get the frozen-layer cache in memory: no worker reads or
            for job in todo:                # writes the asset home's cache (a cluster node may have none)
                model.prepare(job_encodings(model, self.cfg, job), self.cfg.train.eval_batch_size, progress)

        def save(i: int, result: tuple) -> None:
            job, (state, res, checkpoints) = todo[i], result
            if job.k in replays:
                save_checkpoints(model, self.cfg, self.checkpoints(staged[job.k].parent, job.k), job, checkpoints,
                                 shard_meta(self.cfg, model, job.k, job.samples, rid, TrainResult()))
                self._save_replay(rid, job, replays[job.k], state, res.seconds, staged[job.k])
                return
            save_trained(model, staged[job.k], state, shard_meta(self.cfg, model, job.k, job.samples, rid, res))
            self.run.log(f"forget {rid}: shard {job.k} retrained on {len(job.samples)} samples in "
                         f"{res.seconds:.1f}s")

        with open_executor(self.executor, self.run.path, self.run.log) as ex:
            ex.map(train_task, (model, init_state, self.cfg, progress), todo,
                   labels=[f"shard {job.k}" for job in todo], on_result=save, log=self.run.log)

    def _replay_job(self, rid, k, ids, universe, old, staged) -> tuple[ShardJob, dict] | None:
        """A sliced shard's replay (METHODS §9) as a unit, with its ``replay`` record; None: already staged (a
        resumed request). Restores the checkpoint before the first slice that lost samples (copying the
        unaffected checkpoints beside the replayed ones in staging); a resumed request continues from the last
        checkpoint it staged."""
        keep = set(ids)
        slices = [[i for i in sl if i in keep] for sl in old["slices"]]
        r, j = len(slices), first_affected(old["slices"], slices)
        if j is None:  # the shard was affected, so one of its slices lost samples, unless its metadata lies
            raise RunError(f"{self.folders()[k]}: its slice map does not hold its lineage's samples (privrec.json "
                           "is corrupt); train the model again")
        samples = [universe[i] for i in ids]
        if reusable(staged, self.cfg, samples, slices) is not None:
            return None
        _, init_state = self._built()
        here, there = self.checkpoints(self.run.path, k), self.checkpoints(staged.parent, k)
        self.stage_unaffected(here, there, j)
        start = self.resume_point(there, old, slices, j)
        state = restore(there, old, start, init_state) if start < j else load_checkpoint(stage_dir(there, start))[0]
        job = ShardJob(k, samples, [[universe[i] for i in sl] for sl in slices], start + 1, state)
        replay = {"request": rid, "restored": stage_label(j - 1), "replayed": list(range(j, r + 1)),
                  "checkpoints_replaced": [stage_label(s) for s in range(j, r)]}
        return job, replay

    def _replay(self, rid, got, staged, progress):
        """A sliced shard's replay here, stage by stage, each checkpoint written into staging as it is reached."""
        job, replay = got
        model, _ = self._built()
        base = shard_meta(self.cfg, model, job.k, job.samples, rid, TrainResult())
        seconds = train_sliced(model, job.start, job.slices, self.cfg, job.k, job.first,
                               self.checkpoints(staged.parent, job.k), base, progress, self.fault)
        self._save_replay(rid, job, replay, adapter_state(model.model), seconds, staged)

    def _save_replay(self, rid, job, replay, state, seconds, staged):
        """The replayed shard's adapter into staging, beside its staged checkpoints."""
        model, _ = self._built()
        load_adapter_state(model.model, state)
        r, start = len(job.slices), job.first - 1
        meta = dict(shard_meta(self.cfg, model, job.k, job.samples, rid,
                               TrainResult(epochs_run=r - start, seconds=seconds)),
                    **sliced_fields(self.cfg, job.slice_ids, self.checkpoints(staged.parent, job.k)), replay=replay)
        save_adapter(model.model, staged, meta)
        self.run.log(f"forget {rid}: shard {job.k} restored {replay['restored']}, replayed stages "
                     f"{start + 1}..{r} on {len(job.samples)} samples in {seconds:.1f}s")

    def cached_model(self, before=frozenset()):
        model = self._built()[0]
        if self.cfg.shows_labels:  # validation / test prompts show features counted over the shards' samples
            model.set_features(counted_features(self.cfg, setup_shard_data(self.cfg, before).train))
        return model

    def purge(self, removed_ids, universe, before=frozenset()):
        if not self.cfg.shows_labels:
            n = purge_features(self.run / FEATURES_FILE, removed_ids)
            return f"{n} feature rows, " + super().purge(removed_ids, universe, before)
        # counted features (METHODS §12): the affected shards' training prompts showed features counted over
        # their samples, and every validation / test prompt features counted over all shards' samples, deleted
        # ones included: drop the cached states of all of them as they were rendered, and the hidden-state rows
        # (all computed under the old features); the removed samples' own prompts as the partition read them
        model = self.cached_model(before)
        shown = []
        if model.cache is not None:
            for folder in self.folders().values():
                meta = read_meta(folder)
                if removed_ids.intersection(meta["sample_ids"]):  # a sliced shard's stages that saw them
                    stages = [cumulative(meta["slices"], s) for s in range(1, len(meta["slices"]) + 1)] \
                        if meta.get("slices") else [meta["sample_ids"]]
                    for ids in (ids for ids in stages if removed_ids.intersection(ids)):
                        old = [universe[i] for i in ids if i in universe]
                        with model.features_of(shard_features(self.cfg, old)):
                            shown += model.encode(old)
            sp = setup_shard_data(self.cfg, before)
            shown += model.encode(sp.valid + sp.test)
        dropped = sum(model.cache.discard(e.key) for e in shown) if model.cache is not None else 0
        had = (self.run / FEATURES_FILE).is_file()
        remove_tree(self.run / FEATURES_FILE)
        with model.features_of(None):
            common = purge_common(self.run, model, removed_ids, universe)
        return (f"{dropped} cached prompts that showed the old features, "
                f"{FEATURES_FILE} {'removed' if had else 'absent'}, " + common)

    def problems(self, k, folder, universe, tombstones):
        out = super().problems(k, folder, universe, tombstones)
        if not self.cfg.shows_labels:
            return out
        meta = read_meta(folder)
        if meta.get("features") is None:
            return [*out, FEATURES_UNRECORDED]
        out += feature_problems(meta["features"], lambda: shard_features_record(
            self.cfg, [universe[i] for i in meta["sample_ids"] if i in universe]), "its own samples'")
        for rec in meta.get("checkpoints") or []:  # a stage's: counted over the slices it had seen
            folder = stage_dir(self.checkpoints(self.run.path, k), rec["stage"])
            if not is_adapter(folder):
                continue  # missing: check_checkpoints says so
            stage = read_meta(folder)
            recount = functools.partial(stage_features_record, self.cfg,
                                        [universe[i] for i in stage["sample_ids"] if i in universe], rec["stage"])
            out += [f"checkpoint {folder.name}: {p}"
                    for p in feature_problems(stage.get("features"), recount, f"slices 1..{rec['stage']}'")]
        return out

    def run_info(self):
        return dict(super().run_info(), kind="shards", config_digest=self.cfg.digest(*ADAPTER_SECTIONS),
                    partition=self.cfg.shards.partition)


class RetrainAll(Route):
    name = "retrain-all"

    def folders(self):
        return {0: self.folder_of(0)} if is_adapter(self.folder_of(0)) else {}

    def folder_of(self, k):
        return self.run / ADAPTERS_DIR / SINGLE_ADAPTER

    def label(self, k):
        return SINGLE_ADAPTER

    def affected(self, removed):
        # a validation sample picks the epoch, so it reached the adapter too; a pool sample reached it through
        # the features its prompts read (METHODS §12: counted over the pool, recorded as part of its lineage)
        return {0} if any(x["shard"] is not None or x["split"] in ("valid", "pool") for x in removed) else set()

    def problems(self, k, folder, universe, tombstones):
        """A model whose prompts read counted features: its adapter's ``features`` record must be what the
        data that remains gives (recomputed here), else the features came from outside its lineage."""
        if not self.cfg.shows_labels:
            return []
        return feature_problems(read_meta(folder).get("features"),
                                lambda: features_record(self.cfg, setup_data(self.cfg, tombstones)),
                                "the data that remains")

    def retrain(self, rid, k, ids, universe, tombstones, staged, progress):
        if not is_adapter(staged):
            t0 = time.perf_counter()
            retrain_single(self.cfg, tombstones, staged, staged.parent, progress, log=self.run.log)
            self.run.log(f"forget {rid}: adapter {SINGLE_ADAPTER} retrained from scratch on {len(ids)} samples in "
                         f"{time.perf_counter() - t0:.1f}s")

    def purge(self, removed_ids, universe, before=frozenset()):
        if not self.cfg.shows_labels:
            return super().purge(removed_ids, universe, before)
        # every prompt showed features counted over the deleted data: drop the cached states of all of them as
        # they were rendered (the retrain renders and caches them anew), and the removed samples' own rows
        model = self.cached_model(before)
        splits = setup_data(self.cfg, before)
        shown = [s for part in (splits.train, splits.valid, splits.test) for s in part]
        dropped = sum(model.cache.discard(e.key) for e in model.encode(shown)) if model is not None else 0
        return f"{dropped} cached prompts that showed the old features, " + purge_common(
            self.run, model, removed_ids, universe)

    def installed(self):
        remove_tree(self.run / CHECKPOINT_FILE)  # its adapter tensors were trained on the data

    def run_info(self):
        return dict(super().run_info(), kind="single")


def purge_common(run: RunDir, model, removed_ids: set[str], universe: dict[str, Sample]) -> str:
    """The removed samples' frozen-layer cache entries and their rows in the run's prediction files."""
    dropped = 0
    if model is not None and model.cache is not None:
        for e in model.encode([universe[i] for i in sorted(removed_ids) if i in universe]):
            dropped += model.cache.discard(e.key)
    rows = 0
    for path in sorted(run.path.glob(PREDICTIONS_GLOB)):
        lines = path.read_text().splitlines()
        keep = [ln for ln in lines if ln.split(",", 1)[0] not in removed_ids]
        if len(keep) < len(lines):
            rows += len(lines) - len(keep)
            atomic_write_text(path, "\n".join(keep) + "\n")
    return f"{dropped} frozen-cache entries, {rows} prediction rows"


EXACT_ROUTES: dict[str, type[Route]] = {"retrain-shards": RetrainShards, "retrain-all": RetrainAll}
Routes = Mapping[str, type[Route]]


# --- the model directory, locked, with its route ----------------------------------------------------------------
@dataclass
class Run:
    run: RunDir
    manifest: object
    cfg: ExperimentConfig
    route: Route
    ledger: Ledger | None
    ds: Dataset
    universe: dict[str, Sample]
    splits: Splits  # the run's split draw, before tombstones


def open_run(run_path: str | Path, create_ledger: bool, routes: Routes = EXACT_ROUTES) -> Run:
    """The model directory with the route its kind forgets by (``routes``: route name -> class; a clients model
    needs :data:`privrec.federated.forget.ROUTES`).

    Raises:
        UserError: a model that cannot forget exactly (the registry's one line). RunError: not a model
            directory, no ledger, or no route given for its kind. DataError / AssetError: its data source.
    """
    manifest = models.load(run_path)
    run = RunDir(run_path, create=False)
    route, why = _route_of(run, manifest, routes)
    if route is None:
        raise UserError(why)
    cfg, way = route.cfg, models.exact_route(manifest)
    ds, universe, splits = source_data(cfg)
    ledger = None
    if (run / LEDGER_FILE).is_file() or create_ledger or way == "retrain-shards":
        ledger = Ledger(run / LEDGER_FILE, create=way != "retrain-shards")
        ledger.bind_source(cfg.data.source, cfg.data.path)
        if not ledger.latest_adapters():  # the first request on a model whose command kept no ledger
            record_trained(run, manifest, route, ledger)
    return Run(run, manifest, cfg, route, ledger, ds, universe, splits)


def _route_of(run: RunDir, manifest, routes: Routes) -> tuple[Route | None, str]:
    """(the route this model forgets by, "") or (None, the one line saying why it cannot forget exactly)."""
    way = models.exact_route(manifest)
    if way is None:
        cfg = run.load_config(cls=ExperimentConfig) if manifest.kind == "single" else None
        return None, models.refusal(manifest, bool(cfg and cfg.shows_labels), cfg.task if cfg else "", run.path)
    if way not in routes:
        raise RunError(f"{run.path} forgets with {way}: open it with privrec.federated.forget.ROUTES")
    route = routes[way](run, run.load_config(cls=routes[way].config))
    if route.cfg.shows_labels and any("features" not in read_meta(f) for f in route.folders().values()):
        return None, f"{run.path}: {FEATURES_UNRECORDED}; train it again with privrec train"
    return route, ""


def forget_refusal(run_path: str | Path, routes: Routes = EXACT_ROUTES) -> str | None:
    """Why the model directory cannot forget exactly (the line ``privrec forget`` would refuse with), None: it
    can. Reads only the manifest, the config and the adapters' metadata (no data, no ledger)."""
    run = RunDir(run_path, create=False)
    return _route_of(run, models.load(run_path), routes)[1] or None


def record_trained(run: RunDir, manifest, route: Route, ledger: Ledger) -> None:
    """Record the adapters as their training command left them, after checking they still are.

    Raises:
        RunError: an adapter's tensors differ from what its training recorded.
    """
    recorded = {a.path: a.tensors_sha256 for a in manifest.adapters}
    for k, folder in route.folders().items():
        state, meta = read_adapter(folder)
        digest = tensors_digest(state)
        if digest != meta.get("tensors_sha256") or digest != recorded.get(str(folder.relative_to(run.path))):
            raise RunError(f"{folder}: its tensors differ from those its training recorded; train it again")
        ledger.record_adapter(k, digest, meta.get("lineage_sha256"), len(meta.get("sample_ids", [])),
                              ledger.next_origin(manifest.command))


@contextlib.contextmanager
def session(run_path: str | Path, routes: Routes = EXACT_ROUTES, create_ledger: bool = True,
            lock: bool = True) -> Iterator[Run]:
    """The model directory, locked for this command (``lock=False``: the caller holds the lock, as the
    service does for its whole life), its ledger closed at the end."""
    with run_lock(Path(run_path)) if lock else contextlib.nullcontext():
        r = open_run(run_path, create_ledger, routes)
        try:
            yield r
        finally:
            if r.ledger is not None:
                r.ledger.close()
