"""``privrec forget MODEL``: exact unlearning of users or samples (METHODS §4, §7), for every model kind that
can forget exactly, through ONE ledger (:mod:`privrec.unlearning.exact.ledger`) and ONE certificate format
(:mod:`privrec.unlearning.exact.certificate`):

- a ``shards`` model (``retrain-shards``) retrains, from the common init, only the shards that held the
  deleted data (APA / SISA: the others stay bit-identical);
- a ``single`` model (``retrain-all``) retrains its one adapter from scratch, with ``privrec train``'s own
  code and seed, on the same draw of samples minus the deleted ones (exact, honest, slow).
- a ``clients`` model (``privrec federate``, METHODS §10) under ``local`` / ``mixture`` (``retrain-client``)
  retrains only the adapter of the client that held the data, alone (``--clients``: the client leaves, its
  adapter is dropped); under ``pplr`` / ``fedavg`` / ``fedprox`` / ``centralised`` (``retrain-federation``,
  asked for with ``--retrain-federation``) it trains the whole federation again without the data.

In the ledger and the certificates an adapter is a numbered *slot*: shard K is slot K, client C is slot C, a
single model's one adapter is slot 0. A request moves through the ledger's statuses, each step idempotent, so a
request killed at any point is finished by ``privrec forget MODEL --resume`` and is never applied twice:

  pending    the request, its tombstones, the samples it removes and every adapter's hash are committed in
             one SQLite transaction before any model work;
  retrained  derived copies of the removed samples are purged (the run's feature rows, their frozen-layer
             cache entries, their rows in prediction files), every affected adapter is retrained from
             scratch without them into ``MODEL/staging/<request>/`` (atomic folders; a finished staged
             adapter is reused on resume, an interrupted single retrain continues from its last epoch);
  installed  each staged adapter replaces the old one by rename (old -> .old, staged -> final, drop .old);
             a resume finishes a half-done swap and checks an already-swapped adapter's hash; the manifest
             is rewritten from the adapters on disk; a single model's training checkpoint (it holds the old
             weights) is removed;
  done       every adapter's lineage is checked against the data and the tombstones, unaffected adapters
             are checked bit-identical, the certificate is written to ``MODEL/certificates/<request>.json``.

``submit_forget`` records a request without applying it (``privrec serve``: its worker applies the recorded
requests in order with ``run_resume``; a request recorded behind another takes its adapters' state again when
it starts, and retrains with the tombstones of the requests up to itself, so its certificate is the one the
requests give run one after the other).

``run_verify`` re-checks every certificate and every adapter against the ledger, the manifest and the data.
Kinds that cannot forget exactly (student, a single model whose prompts show other users' labels) are refused
with one line naming what can.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from privrec import models
from privrec.commands.model_dir import CONFIG_OF
from privrec.commands.train import retrain_single
from privrec.config import ExperimentConfig
from privrec.data import Dataset, Sample, Splits
from privrec.data.idfiles import read_id_file
from privrec.errors import RunError, UserError
from privrec.model.adapters import ADAPTER_META, read_adapter, read_meta, save_adapter, tensors_digest
from privrec.prepare import build_model, shows_tombstoned, source_data
from privrec.rundir import (
    ADAPTERS_DIR,
    CERTIFICATES_DIR,
    CLIENT_PREFIX,
    FEATURES_FILE,
    LEDGER_FILE,
    SHARD_PREFIX,
    SINGLE_ADAPTER,
    SLICES_DIR,
    STAGING_DIR,
    RunDir,
    atomic_write_text,
    is_adapter,
)
from privrec.train import CHECKPOINT_FILE, TrainResult
from privrec.unlearning.exact.certificate import (
    build_body,
    canonical_sha256,
    check_adapter,
    make_certificate,
    read_certificate,
    write_certificate,
)
from privrec.unlearning.exact.ledger import DONE, INSTALLED, PENDING, RETRAINED, Ledger, run_lock
from privrec.unlearning.exact.shards import (
    ADAPTER_SECTIONS,
    purge_features,
    reusable,
    shard_dir,
    shard_folders,
    shard_meta,
    train_shard,
)
from privrec.unlearning.exact.shards import build_model as shard_model
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
    stage_label,
    train_sliced,
)

Fault = Callable[[str], None]
RETIRED = "RETIRED"  # marker file of a staged adapter that lost all its samples
_SAMPLE_ID = re.compile(r"^u(\d+)-i(\d+)$")
EXACT = ("retrain-shards", "retrain-all", "retrain-client", "retrain-federation")


# --- each kind's exact route ---------------------------------------------------------------------------------
class Route:
    """What forgetting exactly means for one kind: its adapter slots, which of them a removal affects, how one
    is retrained without the data, and what else holds a derived copy of it."""

    name = ""
    disjoint = True  # every sample reaches at most one slot (a partition); else every slot holds the union
    fault: Fault | None = None  # called at the route's own step boundaries (a replayed checkpoint; tests crash there)

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

    def purge(self, removed_ids: set[str], universe: dict[str, Sample]) -> str:
        """Drop derived copies of the removed samples; returns what was dropped, for the log."""
        return ""

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


class _Checkpointed(Route):
    """Slots whose adapter may come with SISA checkpoints (METHODS §9): ``slices/{prefix}K/stage-S``."""

    prefix = SHARD_PREFIX

    def checkpoints(self, root, k: int) -> Path:
        return checkpoint_set(root, k, self.prefix)

    def install_slot(self, rid, k, retired):
        staged, final = self.checkpoints(self.run / STAGING_DIR / rid, k), self.checkpoints(self.run.path, k)
        old = final.with_name(f".{final.name}.old")
        if staged.exists():
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(staged, final)
        elif retired:
            shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)  # the replaced checkpoints held the deleted data

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


class RetrainShards(_Checkpointed):
    name = "retrain-shards"

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
        if self._model is None:
            self._model = shard_model(self.cfg, source_data(self.cfg)[0])
        return self._model

    def retrain(self, rid, k, ids, universe, tombstones, staged, progress):
        samples = [universe[i] for i in ids]
        old = read_meta(self.folders()[k])
        if old.get("slices"):
            return self._replay(rid, k, ids, universe, old, staged, progress)
        if reusable(staged, self.cfg, samples) is None:
            model, init_state = self._built()
            res = train_shard(model, init_state, samples, self.cfg, k, progress)
            save_adapter(model.model, staged, shard_meta(self.cfg, model, k, samples, rid, res))
            self.run.log(f"forget {rid}: shard {k} retrained on {len(ids)} samples in {res.seconds:.1f}s")

    def _replay(self, rid, k, ids, universe, old, staged, progress):
        """A sliced shard (METHODS §9): restore the checkpoint before the first slice that lost samples, replay
        the later stages without them into staging (copying the unaffected checkpoints beside them). A
        resumed request continues from the last checkpoint it staged."""
        keep = set(ids)
        slices = [[i for i in sl if i in keep] for sl in old["slices"]]
        r, j = len(slices), first_affected(old["slices"], slices)
        assert j is not None, "an affected shard lost samples"
        samples = [universe[i] for i in ids]
        if reusable(staged, self.cfg, samples, slices) is not None:
            return
        model, init_state = self._built()
        here, there = self.checkpoints(self.run.path, k), self.checkpoints(staged.parent, k)
        self.stage_unaffected(here, there, j)
        start = self.resume_point(there, old, slices, j)
        state = restore(there, old, start, init_state) if start < j else load_checkpoint(stage_dir(there, start))[0]
        base = shard_meta(self.cfg, model, k, samples, rid, TrainResult())
        seconds = train_sliced(model, state, [[universe[i] for i in sl] for sl in slices], self.cfg, k, start + 1,
                               there, base, progress, self.fault)
        replay = {"request": rid, "restored": stage_label(j - 1), "replayed": list(range(j, r + 1)),
                  "checkpoints_replaced": [stage_label(s) for s in range(j, r)]}
        meta = dict(shard_meta(self.cfg, model, k, samples, rid, TrainResult(epochs_run=r - start, seconds=seconds)),
                    **sliced_fields(self.cfg, slices, there), replay=replay)
        save_adapter(model.model, staged, meta)
        self.run.log(f"forget {rid}: shard {k} restored {replay['restored']}, replayed stages {start + 1}..{r} on "
                     f"{len(ids)} samples in {seconds:.1f}s")

    def purge(self, removed_ids, universe):
        n = purge_features(self.run / FEATURES_FILE, removed_ids)
        return f"{n} feature rows, " + _purge_common(self.run, self._built()[0], removed_ids, universe)

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
        # a validation sample picks the epoch, so it reached the adapter too
        return {0} if any(x["shard"] is not None or x["split"] == "valid" for x in removed) else set()

    def retrain(self, rid, k, ids, universe, tombstones, staged, progress):
        if not is_adapter(staged):
            t0 = time.perf_counter()
            retrain_single(self.cfg, tombstones, staged, staged.parent, progress, log=self.run.log)
            self.run.log(f"forget {rid}: adapter {SINGLE_ADAPTER} retrained from scratch on {len(ids)} samples in "
                         f"{time.perf_counter() - t0:.1f}s")

    def purge(self, removed_ids, universe):
        lora = self.cfg.lora
        model = build_model(self.cfg, source_data(self.cfg)[0]) if lora.top_layers and lora.cache_frozen else None
        return _purge_common(self.run, model, removed_ids, universe)  # (no frozen-layer cache: no model needed)

    def installed(self):
        (self.run / CHECKPOINT_FILE).unlink(missing_ok=True)  # its adapter tensors were trained on the data

    def run_info(self):
        return dict(super().run_info(), kind="single")


class _ClientSlots(_Checkpointed):
    """A ``clients`` model (``privrec federate``): slot C is client C's adapter (``adapters/client-C``)."""

    def __init__(self, run, cfg):
        super().__init__(run, cfg)
        self._model = None

    prefix = CLIENT_PREFIX

    def folders(self):
        return {int(f.name[len(CLIENT_PREFIX):]): f for f in models.adapter_folders(self.run.path, CLIENT_PREFIX)}

    def folder_of(self, k):
        return self.run / ADAPTERS_DIR / f"{CLIENT_PREFIX}{k}"

    def label(self, k):
        return f"client {k}"

    def _built(self):
        """(the model, its seeded initial adapter: what every client of the run started from)."""
        if self._model is None:
            from privrec.federated.runner import build_model as federated_model
            from privrec.model.adapters import adapter_state

            splits = source_data(self.cfg)[2]
            model = federated_model(self.cfg, splits)
            self._model = (model, adapter_state(model.model))
        return self._model

    def purge(self, removed_ids, universe):
        lora = self.cfg.lora
        model = self._built()[0] if lora.top_layers and lora.cache_frozen else None
        return _purge_common(self.run, model, removed_ids, universe)

    def run_info(self):
        manifest = models.load(self.run.path)
        return dict(super().run_info(), kind="clients", strategy=manifest.strategy)


class RetrainClient(_ClientSlots):
    """local / mixture (METHODS §10): a client adapter saw only its own users' samples, so forgetting a user
    retrains their client's adapter alone, with the run's rounds and seeds on the samples it has left (in the
    run's order): from the run's initial adapter, or, for a sliced client (``federated.slices``, METHODS §9),
    from the checkpoint before the first round that saw the slice holding them (the later rounds replayed, their
    checkpoints written again); a client whose samples are all deleted (``--clients``) has left: its adapter
    and checkpoints are dropped. Every other client's adapter stays bit-identical."""

    name = "retrain-client"
    # where the client's data lives: None = here (the model's data source); a Flower deployment sets
    # remote(client, users, start_state, first_round) -> (state, n_train, seconds, {stage: checkpoint state}):
    # the node holding the client replays its rounds from first_round
    remote = None

    def retrain(self, rid, k, ids, universe, tombstones, staged, progress):
        from privrec.federated import slicing
        from privrec.federated.client import FederatedClient
        from privrec.model.adapters import load_adapter_state
        from privrec.prepare import adapter_meta

        if is_adapter(staged):
            return
        keep = set(ids)
        samples = [s for s in source_data(self.cfg)[2].train if s.sample_id in keep]  # the run's order
        model, init = self._built()
        manifest = models.load(self.run.path)
        old = read_meta(self.folders()[k])
        meta = adapter_meta(self.cfg, model, samples, client=k, strategy=manifest.strategy,
                            rounds=self.cfg.federated.rounds, trained_on_clients=[k], request=rid)
        rounds, slices, replay = self.cfg.federated.rounds, None, {}
        start, first = init, 0
        there = self.checkpoints(staged.parent, k)
        if old.get("slices"):
            slices = [[i for i in sl if i in keep] for sl in old["slices"]]
            r, j = len(slices), first_affected(old["slices"], slices)
            assert j is not None, "an affected client lost samples"
            self.stage_unaffected(self.checkpoints(self.run.path, k), there, j)
            done = self.resume_point(there, old, slices, j)
            restored = restore(there, old, done, init) if done < j else load_checkpoint(stage_dir(there, done))[0]
            start = restored.adapter
            first = slicing.first_round(done + 1, r, rounds)
            replay = {"request": rid, "restored": stage_label(j - 1), "replayed_rounds": list(range(
                slicing.first_round(j, r, rounds) + 1, rounds + 1)), "checkpoints_replaced": [
                stage_label(s) for s in range(j, r)]}

        def saved(s: int, state) -> None:  # a replayed round's checkpoint, into the request's staging folder
            load_adapter_state(model.model, state)
            slicing.save_client_checkpoint(model, staged.parent, k, s, slicing.in_slices(samples, slices, s), meta)
            if self.fault is not None:
                self.fault(f"checkpoint-client-{k}-stage-{s}")

        if self.remote is not None:  # only the node holding client k learns who is deleted
            users = sorted({u for u, _ in tombstones if manifest.clients.get(u) == k})
            state, n, seconds, ckpts = self.remote(k, users, start, first)
            if n != len(samples):
                raise RunError(f"the node of client {k} retrained on {n} samples; this model's data leaves "
                               f"{len(samples)}: the node's folder and the model's data differ")
            for s, st in sorted(ckpts.items()):
                saved(s, st)
        else:
            client = FederatedClient(k, model, samples, [], [], self.cfg, slices=slices)
            state, seconds = client.train_alone(start, first, saved)
        load_adapter_state(model.model, state)
        meta.update(train_seconds=seconds)
        if slices is not None:
            meta.update(slicing.sliced_fields(self.cfg, k, slices, staged.parent), replay=replay)
        save_adapter(model.model, staged, meta)
        self.run.log(f"forget {rid}: client {k} retrained alone on {len(samples)} samples in {seconds:.1f}s"
                     + (f" (restored {replay['restored']}, replayed rounds {first + 1}..{rounds})" if replay else ""))


class RetrainFederation(_ClientSlots):
    """pplr / fedavg / fedprox / centralised (METHODS §10): aggregation mixed every client into every adapter,
    so exact forgetting retrains the whole federation without the data (every round, every client; users stay
    on their clients, a client with no sample left has left), with ``privrec federate``'s own code, into
    ``staging/<request>/federation``; each slot then takes its client's new adapter. Honest, and as slow as
    training the federation again (``--retrain-federation`` asks for it)."""

    name = "retrain-federation"
    disjoint = False  # every adapter's lineage holds every contributing client's samples
    # a Flower deployment sets remote(out, tombstones, assignment, progress) -> metrics: the nodes retrain
    remote = None

    def affected(self, removed):
        return set(self.folders()) if any(x["shard"] is not None for x in removed) else set()

    def retrain(self, rid, k, ids, universe, tombstones, staged, progress):
        from privrec.federated.runner import run_federate

        if staged.exists():
            return
        fed = staged.parent / "federation"
        if not (fed / "metrics.json").is_file():
            shutil.rmtree(fed, ignore_errors=True)
            manifest = models.load(self.run.path)
            if self.remote is not None:
                m = self.remote(fed, frozenset(tombstones), dict(manifest.clients), progress)
            else:
                m = run_federate(self.cfg, fed, progress=progress, tombstones=frozenset(tombstones),
                                 assignment=dict(manifest.clients))
            self.run.log(f"forget {rid}: the federation retrained without the data ({m['strategy']}, "
                         f"{len(m['rounds'])} rounds) in {m['train_seconds']:.1f}s")
        seconds = RunDir(fed, create=False).read_metrics()["train_seconds"]
        src = fed / ADAPTERS_DIR / staged.name
        tmp = staged.with_name(f".{staged.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_adapter(src):  # the client left the federation: no adapter of it any more
            tmp.mkdir(parents=True)
            (tmp / RETIRED).write_text(rid)
        else:
            shutil.copytree(src, tmp)
            meta = read_meta(tmp)  # the federation's training time goes to the first slot, once
            first = min(self.folders())
            meta.update(train_seconds=seconds if k == first else 0.0, federation_train_seconds=seconds, request=rid)
            atomic_write_text(tmp / ADAPTER_META, json.dumps(meta, indent=1))
        os.replace(tmp, staged)


ROUTES: dict[str, type[Route]] = {"retrain-shards": RetrainShards, "retrain-all": RetrainAll,
                                  "retrain-client": RetrainClient, "retrain-federation": RetrainFederation}


def _purge_common(run: RunDir, model, removed_ids: set[str], universe: dict[str, Sample]) -> str:
    """The removed samples' frozen-layer cache entries and their rows in the run's prediction files."""
    dropped = 0
    if model is not None and model.cache is not None:
        for e in model.encode([universe[i] for i in sorted(removed_ids) if i in universe]):
            dropped += model.cache.discard(e.key)
    rows = 0
    for path in sorted(run.path.glob("predictions_*.csv")):
        lines = path.read_text().splitlines()
        keep = [ln for ln in lines if ln.split(",", 1)[0] not in removed_ids]
        if len(keep) < len(lines):
            rows += len(lines) - len(keep)
            atomic_write_text(path, "\n".join(keep) + "\n")
    return f"{dropped} frozen-cache entries, {rows} prediction rows"


def refusal(manifest, cfg: ExperimentConfig, path) -> str:
    """The one line refusing ``forget`` on a model that cannot forget exactly, naming what can."""
    if manifest.kind == "student":
        return (f"{path} is {manifest.describe()}: forget from the model it was unlearnt from, privrec forget "
                f"{manifest.original} --users ...")
    if manifest.inferred:
        why = "it was written before lineage hashes covered sample content, so nothing it forgets can be certified"
    elif cfg.shows_labels:
        why = ("its prompts show other users' labels (prompt.item_stats, prompt.cf_score or collab.inject), so "
               "retraining cannot erase a label")
    else:
        why = f"task {cfg.task} models cannot forget exactly yet"
    return (f"{path} is {manifest.describe()} that cannot forget exactly: {why}; train it again with privrec "
            "train (prompt.item_stats=false, task like-prediction), or use privrec shard-train")


# --- the model directory, locked ------------------------------------------------------------------------------
@dataclass
class _Run:
    run: RunDir
    manifest: object
    cfg: ExperimentConfig
    route: Route
    ledger: Ledger | None
    ds: Dataset
    universe: dict[str, Sample]
    splits: Splits  # the run's split draw, before tombstones


def _open(run_path: str | Path, create_ledger: bool) -> _Run:
    """Raises: RunError (not a model that forgets exactly, no ledger), DataError / AssetError (data source)."""
    manifest = models.load(run_path)
    run = RunDir(run_path, create=False)
    cfg = run.load_config(cls=CONFIG_OF[manifest.kind])
    ways = models.clients_forgetting(manifest.strategy) if manifest.kind == "clients" else manifest.forget
    way = next((w for w in ways if w in EXACT), None)
    if way is None:
        raise UserError(refusal(manifest, cfg, run.path))
    route = ROUTES[way](run, cfg)
    ds, universe, splits = source_data(cfg)
    ledger = None
    if (run / LEDGER_FILE).is_file() or create_ledger or way == "retrain-shards":
        ledger = Ledger(run / LEDGER_FILE, create=way != "retrain-shards")
        ledger.bind_source(cfg.data.source, cfg.data.path)
        if not ledger.latest_adapters():  # the first request on a model whose command kept no ledger
            _record_trained(run, manifest, route, ledger)
    return _Run(run, manifest, cfg, route, ledger, ds, universe, splits)


def _record_trained(run: RunDir, manifest, route: Route, ledger: Ledger) -> None:
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
def _session(run_path: str | Path, create_ledger: bool = True, lock: bool = True) -> Iterator[_Run]:
    """The model directory, locked for this command (``lock=False``: the caller holds the lock, as the
    service does for its whole life), its ledger closed at the end."""
    with run_lock(Path(run_path)) if lock else contextlib.nullcontext():
        r = _open(run_path, create_ledger)
        try:
            yield r
        finally:
            if r.ledger is not None:
                r.ledger.close()


def parse_ids(text: str, option: str = "--users", what: str = "user") -> list[int]:
    """``"12,40"`` -> [12, 40] (the ids of ``--users`` or ``--clients``).

    Raises:
        UserError: empty or not a comma-separated list of integers."""
    try:
        ids = sorted({int(u) for u in text.split(",") if u.strip()})
    except ValueError:
        raise UserError(f"{option} expects comma-separated {what} ids, got {text!r}") from None
    if not ids:
        raise UserError(f"{option} is empty")
    return ids


def parse_users(text: str) -> list[int]:
    return parse_ids(text)


def parse_clients(text: str) -> list[int]:
    return parse_ids(text, "--clients", "client")


def read_sample_ids(path: str | Path) -> list[str]:
    """Sample ids ``u{user}-i{item}``, one per line (blank lines and ``#`` comments skipped).

    Raises:
        DataError: missing file, malformed id, or no ids."""

    def parse(text: str) -> str:
        if not _SAMPLE_ID.match(text):
            raise ValueError(text)
        return text

    return read_id_file(path, "samples", parse, "a sample id like u12-i345")


def resolve_interactions(
    ds: Dataset, users: list[int] | None = None, sample_ids: list[str] | None = None
) -> list[tuple[int, int, int]]:
    """The (user, item, timestamp) interactions a request deletes: all of the users', or the samples'.

    Raises:
        UserError: an unknown user, or a sample id that is not an interaction of the data source."""
    inter = ds.inter
    if users is not None:
        rows = inter[inter["user_id"].isin(users)]
        unknown = sorted(set(users) - set(rows["user_id"].tolist()))
        if unknown:
            raise UserError(
                f"user {unknown[0]} not found in {ds.name}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            )
    else:
        pairs = {tuple(int(g) for g in _SAMPLE_ID.match(s).groups()) for s in sample_ids or []}
        keys = list(zip(inter["user_id"].tolist(), inter["item_id"].tolist()))
        mask = [k in pairs for k in keys]
        rows = inter[mask]
        unknown = sorted(pairs - set(zip(rows["user_id"].tolist(), rows["item_id"].tolist())))
        if unknown:
            raise UserError(f"sample u{unknown[0][0]}-i{unknown[0][1]} is not an interaction in {ds.name}")
    return sorted(
        (int(u), int(i), int(t)) for u, i, t in zip(rows["user_id"], rows["item_id"], rows["timestamp"])
    )


def _fault(fault: Fault | None, point: str) -> None:
    if fault is not None:
        fault(point)


# --- the command ---------------------------------------------------------------------------------------
def run_forget(
    run_path: str | Path,
    users: list[int] | None = None,
    samples_file: str | Path | None = None,
    progress: bool = True,
    fault: Fault | None = None,
    clients: list[int] | None = None,
    retrain_federation: bool = False,
    remote=None,
) -> dict:
    """Delete users', samples' or (a ``clients`` model) whole clients' data from a model that forgets exactly;
    returns the certificate.

    ``clients``: every user those clients hold leaves the model (under local / mixture their adapters are
    dropped). ``retrain_federation``: consent to the full federated retrain a pplr / fedavg / fedprox /
    centralised model needs (METHODS §10); without it such a model is refused with its cost.
    ``remote``: a model deployed on Flower (:class:`privrec.federated.flower_app.FlowerForget`): a client's
    retrain runs on the node holding its data; a federated retrain runs on every node, the deleted interactions
    sent only to the nodes that held them.
    ``fault(point)`` is called at every step boundary (tests inject crashes there).
    Returns ``{"noop": True, ...}`` when everything asked for is already deleted.

    Raises:
        UserError: unknown user / sample / client, unreadable samples file, a kind that cannot forget exactly,
            a federated retrain not asked for.
        RunError: not a model directory, busy, an unfinished request (finish it with ``--resume`` first), or a
            failed lineage check.
    """
    if sum(x is not None for x in (users, samples_file, clients)) != 1:
        raise UserError("give exactly one of --users, --samples or --clients")
    sample_ids = read_sample_ids(samples_file) if samples_file is not None else None
    with _session(run_path) as r:
        _check_consent(r, retrain_federation)
        if remote is not None:
            if r.route.name == "retrain-client":
                r.route.remote = remote
            elif r.route.name == "retrain-federation" and hasattr(remote, "federation"):
                r.route.remote = remote.federation
            else:
                raise UserError(f"a deletion on Flower retrains clients; {r.run.path} forgets with {r.route.name}")
        unfinished = r.ledger.unfinished()
        if unfinished:
            raise RunError(
                f"deletion request {unfinished['id']} is unfinished ({unfinished['status']}); "
                f"finish it first: privrec forget {r.run.path} --resume"
            )
        if clients is not None:
            users = users_of_clients(r, clients)
        recorded = _record(r, users, sample_ids, clients)
        if recorded.get("noop"):
            return recorded
        _fault(fault, "recorded")
        return _finish(r, recorded["request"], progress, fault)


def submit_forget(run_path: str | Path, users: list[int]) -> dict:
    """Record a deletion request of ``users`` and return ``{"request": id}`` without applying it (the service:
    its worker applies requests in order with :func:`run_resume`). The caller holds the model's run lock.

    A request recorded while an earlier one is unfinished waits for it: its plan (which samples go, which
    adapters retrain) is made now, its adapters' before-hashes are taken again when it starts (``_replan``).
    Returns ``{"noop": True, ...}`` when everything asked for is already deleted.

    Raises:
        UserError: unknown user.
    """
    with _session(run_path, lock=False) as r:
        _check_consent(r, False)
        return _record(r, users, None)


def _check_consent(r: _Run, retrain_federation: bool) -> None:
    """Raises: UserError for a model whose exact forgetting is a full federated retrain not asked for (with
    what it costs), or for ``--retrain-federation`` on one that needs none."""
    federation = r.route.name == "retrain-federation"
    if federation and not retrain_federation:
        m = r.manifest
        cost = ""
        with contextlib.suppress(RunError, OSError, KeyError, ValueError):
            cost = f", about {r.run.read_metrics()['train_seconds']:.0f}s as it trained"
        raise UserError(
            f"{r.run.path} is {m.describe()}, strategy {m.strategy}: its aggregation mixed every client into every "
            f"adapter, so exact forgetting retrains the whole federation without the data ("
            f"{r.cfg.federated.rounds} rounds x {len(r.route.folders())} clients{cost}); ask for it with "
            "--retrain-federation, or train with federated.strategy=mixture (forgets by retraining one client)")
    if retrain_federation and not federation:
        raise UserError(f"--retrain-federation is for federated models whose aggregation mixed the clients; "
                        f"{r.run.path} forgets with {r.route.name}")


def users_of_clients(r: _Run, clients: list[int]) -> list[int]:
    """Every user a ``clients`` model's clients hold.

    Raises:
        UserError: not a clients model, or a client it does not have."""
    if r.manifest.kind != "clients":
        raise UserError(f"--clients is for federated models (privrec federate); {r.run.path} is "
                        f"{r.manifest.describe()}")
    have = set(r.manifest.clients.values())
    unknown = sorted(set(clients) - have)
    if unknown:
        raise UserError(f"client {unknown[0]} is not a client of {r.run.path} (clients {sorted(have)})")
    return sorted(u for u, c in r.manifest.clients.items() if c in set(clients))


def _record(r: _Run, users: list[int] | None, sample_ids: list[str] | None,
            clients: list[int] | None = None) -> dict:
    """Write the request into the ledger (status pending): ``{"request": id}``, or ``{"noop": True, ...}``."""
    if clients is not None:
        kind, spec = "clients", {"clients": clients}
    elif users is not None:
        kind, spec = "users", {"users": users}
    else:
        kind, spec = "samples", {"samples": sample_ids}
    interactions = resolve_interactions(r.ds, users, sample_ids)
    old = r.ledger.tombstones()
    new = [t for t in interactions if (t[0], t[1]) not in old]
    if not new:
        return {
            "noop": True,
            "message": f"nothing to forget: all {len(interactions)} interactions were "
            "deleted by earlier requests",
        }
    new_set = {(u, i) for u, i, _ in new}

    # which of the run's samples go, and which adapter slot holds each
    split_of = {s.sample_id: name for name in ("train", "valid", "test") for s in r.splits.get(name)}
    metas = {k: read_adapter(f) for k, f in r.route.folders().items()}
    owner = {sid: k for k, (_, meta) in metas.items() for sid in meta.get("sample_ids", [])}
    removed = []
    for sid in sorted(set(split_of) | set(owner)):
        s = r.universe.get(sid)
        if s is None or not shows_tombstoned(s, new_set) or shows_tombstoned(s, old):
            continue
        removed.append(
            {
                "sample_id": sid,
                "user_id": s.user_id,
                "item_id": s.item_id,
                "timestamp": s.timestamp,
                "split": split_of.get(sid, "train"),
                "shard": owner.get(sid),
            }
        )
    hit = r.route.affected(removed)
    slots = [
        {
            "shard": k,
            "retrain": k in hit,
            "before_sha256": tensors_digest(state),
            "n_before": len(meta.get("sample_ids", [])),
        }
        for k, (state, meta) in metas.items()
    ]
    rid = r.ledger.record_request(kind, spec, new, removed, slots)
    r.run.log(
        f"forget {rid}: {len(new)} interactions deleted, {len(removed)} samples removed, "
        f"{r.route.name}: {', '.join(r.route.label(k) for k in sorted(hit)) or 'no adapter held them'}"
    )
    return {"request": rid}


def run_resume(run_path: str | Path, progress: bool = True, fault: Fault | None = None, lock: bool = True,
               swap_guard: contextlib.AbstractContextManager | None = None) -> dict | None:
    """Finish the first unfinished request of a model, if any; returns its certificate (None: nothing to do).

    ``lock=False``: the caller holds the run lock (the service). ``swap_guard`` is held while adapters are
    swapped in (the service holds it while it records a request, so a plan never sees a half-done swap).
    """
    with _session(run_path, lock=lock) as r:
        req = r.ledger.unfinished()
        if req is None:
            return None
        r.run.log(f"forget --resume: {req['id']} from status {req['status']}")
        return _finish(r, req["id"], progress, fault, swap_guard)


def _finish(r: _Run, rid: str, progress: bool, fault: Fault | None,
            swap_guard: contextlib.AbstractContextManager | None = None) -> dict:
    if r.ledger.request(rid)["status"] == PENDING:
        _replan(r, rid)
        r.route.fault = fault
        seconds = _retrain(r, rid, progress)
        r.ledger.advance(rid, RETRAINED, retrain_seconds=seconds)
        _fault(fault, "retrained")
    if r.ledger.request(rid)["status"] == RETRAINED:
        with swap_guard or contextlib.nullcontext():
            _install(r, rid, fault)
            r.ledger.advance(rid, INSTALLED)
        _fault(fault, "installed")
    if r.ledger.request(rid)["status"] == INSTALLED:
        cert = _certify(r, rid)
        _fault(fault, "certified")
        r.ledger.advance(
            rid, DONE, certificate_sha256=cert["body_sha256"], adapters_seq=r.ledger.adapters_seq()
        )
        shutil.rmtree(r.run / STAGING_DIR / rid, ignore_errors=True)
        r.run.log(
            f"forget {rid}: done, certificate {cert['body_sha256'][:16]}, retrain "
            f"{cert['record']['retrain_seconds']:.1f}s"
        )
        return cert
    return read_certificate(r.run / CERTIFICATES_DIR / f"{rid}.json")


def _tombstones_upto(r: _Run, rid: str) -> set[tuple[int, int]]:
    """The interactions deleted by ``rid`` and every request before it (not by requests queued after it)."""
    seq = {q["id"]: q["seq"] for q in r.ledger.requests()}
    return {(t["user_id"], t["item_id"]) for t in r.ledger.tombstone_rows() if seq[t["request_id"]] <= seq[rid]}


def _replan(r: _Run, rid: str) -> None:
    """Take a pending request's adapters' before-hashes again: an earlier request queued before it (the
    service) may have installed new adapters since it was recorded. A no-op for a request recorded with
    nothing unfinished (every CLI request)."""
    folders = r.route.folders()
    for s in r.ledger.request_shards(rid):
        f = folders.get(s["shard"])
        if f is None:  # retired by an earlier request: nothing of this request can be in it
            r.ledger.set_before(rid, s["shard"], None, 0)
            continue
        state, meta = read_adapter(f)
        digest = tensors_digest(state)
        if digest != s["before_sha256"]:
            r.ledger.set_before(rid, s["shard"], digest, len(meta.get("sample_ids", [])))


def _staged(r: _Run, rid: str, k: int) -> Path:
    return r.run / STAGING_DIR / rid / r.route.folder_of(k).name


def _retrain(r: _Run, rid: str, progress: bool) -> float:
    """Purge the removed samples' derived copies, retrain every affected slot into staging; returns the
    training seconds of the staged adapters."""
    removed_ids = {x["sample_id"] for x in r.ledger.removed(rid)}
    r.run.log(f"forget {rid}: purged {r.route.purge(removed_ids, r.universe)}")
    tombstones = _tombstones_upto(r, rid)  # not those of a request queued after it (the service)
    seconds = 0.0
    for s in r.ledger.request_shards(rid):
        k = s["shard"]
        if not s["retrain"]:
            r.ledger.set_after(rid, k, s["before_sha256"], s["n_before"])
            continue
        meta = read_meta(r.route.folders()[k])
        ids = [i for i in meta["sample_ids"] if i not in removed_ids]
        staged = _staged(r, rid, k)
        if not ids:  # every sample of the adapter was deleted: it is retired
            staged.mkdir(parents=True, exist_ok=True)
            (staged / RETIRED).write_text(rid)
            r.ledger.set_after(rid, k, None, 0)
            continue
        r.route.retrain(rid, k, ids, r.universe, tombstones, staged, progress)
        if (staged / RETIRED).exists():  # the route dropped it (a client that left a federated retrain)
            r.ledger.set_after(rid, k, None, 0)
            continue
        staged_meta = read_meta(staged)
        seconds += float(staged_meta.get("train_seconds", 0.0))
        r.ledger.set_after(rid, k, staged_meta["tensors_sha256"], len(staged_meta["sample_ids"]))
    return seconds


def _install(r: _Run, rid: str, fault: Fault | None) -> None:
    """Swap every staged adapter in; finish a half-done swap; check adapters swapped before a crash."""
    for s in r.ledger.request_shards(rid):
        if not s["retrain"]:
            continue
        k, after = s["shard"], s["after_sha256"]
        staged, final = _staged(r, rid, k), r.route.folder_of(k)
        old = final.with_name(f".{final.name}.old")
        r.route.install_slot(rid, k, (staged / RETIRED).exists() if staged.exists() else not final.exists())
        if staged.exists():
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            if (staged / RETIRED).exists():
                shutil.rmtree(staged)
            else:
                os.replace(staged, final)
        installed = tensors_digest(read_adapter(final)[0]) if final.exists() else None
        if installed != after:
            raise RunError(
                f"{r.route.label(k)} does not hold the adapter staged by {rid}: the model was changed during "
                "the request; restore it from a backup or train it again"
            )
        shutil.rmtree(old, ignore_errors=True)
        latest = r.ledger.latest_adapters().get(k)
        if latest is None or latest["origin"] != rid:
            lineage = read_meta(final)["lineage_sha256"] if final.exists() else None
            r.ledger.record_adapter(k, after, lineage, s["n_after"] or 0, rid)
        _fault(fault, f"installed-shard-{k}")
    r.route.installed()
    models.refresh(r.run.path)


def _check_current(r: _Run, upto: str | None = None) -> list[dict]:
    """Every current adapter against its privrec.json, the ledger's record, the manifest and the data (the
    tombstones of every request, or of ``upto`` and the requests before it)."""
    tomb = (_tombstones_upto(r, upto) if upto else r.ledger.tombstones()) if r.ledger else set()
    latest = r.ledger.latest_adapters() if r.ledger else {}
    manifest = {a.path: a for a in models.load(r.run.path).adapters}
    checks = []
    for k, f in r.route.folders().items():
        c = check_adapter(f, r.universe, tomb, (latest.get(k) or {}).get("tensors_sha256"), slot=k)
        extra = r.route.problems(k, f, r.universe, tomb)
        if extra:
            c["problems"] += extra
            c["ok"] = False
        rec = manifest.get(str(f.relative_to(r.run.path)))
        meta = read_meta(f)
        if rec is None or rec.tensors_sha256 != c["tensors_sha256"] or rec.sample_ids != meta.get("sample_ids"):
            c["problems"].append("the manifest (model.json) does not describe this adapter")
            c["ok"] = False
        checks.append(c)
    return checks


def _certify(r: _Run, rid: str) -> dict:
    """Check every adapter, write the certificate; raise if a check failed (the request stays installed)."""
    req = r.ledger.request(rid)
    checks = _check_current(r, upto=rid)
    by_slot = {c["shard"]: c for c in checks}
    slots = r.ledger.request_shards(rid)
    for s in slots:  # every adapter holds exactly what this request left: unaffected ones bit-identical
        c = by_slot.get(s["shard"])
        now = c["tensors_sha256"] if c else None
        if now != s["after_sha256"]:
            what = "retrained" if s["retrain"] else "untouched"
            problem = f"adapter differs from the {what} adapter this request left"
            if c is None:
                checks.append({"shard": s["shard"], "ok": False, "problems": [problem], "tensors_sha256": None,
                               "lineage_sha256": None, "n_samples": 0})
            else:
                c["problems"].append(problem)
                c["ok"] = False
    metas = [read_meta(f) for f in r.route.folders().values()]
    run_info = dict(r.route.run_info(), base_fingerprint=metas[0].get("base_fingerprint") if metas else None)
    replays = {}
    for s in slots:  # a sliced shard's adapter says which checkpoint it restored and which stages it replayed
        f = r.route.folders().get(s["shard"])
        replay = read_meta(f).get("replay") if s["retrain"] and f is not None else None
        if replay and replay.get("request") == rid:
            replays[s["shard"]] = {k: v for k, v in replay.items() if k != "request"}
    body = build_body(req, r.ledger.interactions(rid), r.ledger.removed(rid), slots, checks, run_info,
                      slices=replays)
    record = {
        "created": req["created"],
        "completed": time.time(),
        "retrain_seconds": req["retrain_seconds"],
        "wall_seconds": time.time() - req["created"],
        "events": r.ledger.events(rid),
    }
    cert = make_certificate(body, record)
    write_certificate(r.run / CERTIFICATES_DIR / f"{rid}.json", cert)
    if not body["lineage_check"]["passed"]:
        bad = [f"{r.route.label(c['shard'])}: {'; '.join(c['problems'])}" for c in checks if not c["ok"]]
        raise RunError(
            f"{rid}: lineage check failed ({' | '.join(bad)}); certificate written with "
            "passed=false, request left unfinished"
        )
    return cert


# --- verification --------------------------------------------------------------------------------------
def run_verify(run_path: str | Path) -> dict:
    """Re-check every certificate and every current adapter of a model; ``ok`` is False on any problem.

    Adapters: tensors on disk == privrec.json == the ledger's latest record == the manifest; lineage recomputed
    from the data == recorded; no lineage sample shows a tombstoned interaction; every adapter the ledger knows
    exists. Certificates: one per done request, body unaltered (its sha256) and the one the ledger recorded;
    none of its removed samples is in any current lineage; every adapter it certified still holds the adapter
    it certified, unless the ledger shows a later install of that slot. A single model that never forgot
    anything has no ledger: its adapter is checked against its manifest and the data.
    """
    with _session(run_path, create_ledger=False) as r:
        adapters = _check_current(r)
        latest = r.ledger.latest_adapters() if r.ledger else {}
        folders = r.route.folders()
        for c in adapters:
            if r.ledger is not None and c["shard"] not in latest:
                c["problems"].append("adapter not recorded in the ledger")
                c["ok"] = False
        for k, row in latest.items():
            if row["tensors_sha256"] is not None and k not in folders:
                adapters.append({"shard": k, "ok": False, "problems": ["recorded in the ledger but missing"],
                                 "tensors_sha256": None, "lineage_sha256": None, "n_samples": 0})
        current = {c["shard"]: c["tensors_sha256"] for c in adapters}
        owners: dict[str, list[int]] = {}
        for k, f in folders.items():
            for i in read_meta(f).get("sample_ids", []):
                owners.setdefault(i, []).append(k)
        shared = sorted(i for i, ks in owners.items() if len(ks) > 1) if r.route.disjoint else []
        if shared:  # shards are a partition: e.g. an interrupted re-partition left old shards beside new ones
            adapters.append({"shard": "all", "ok": False, "tensors_sha256": None, "lineage_sha256": None,
                             "n_samples": len(owners), "problems": [
                                 f"{len(shared)} samples are in two shards (e.g. {shared[0]}): rerun "
                                 "shard-train --resume"]})
        lineage_ids = set(owners)
        stray = r.route.stray()
        if stray:
            adapters.append({"shard": "all", "ok": False, "tensors_sha256": None, "lineage_sha256": None,
                             "n_samples": 0, "problems": stray})

        certificates = []
        known = set()
        for req in r.ledger.requests() if r.ledger else []:
            rid = req["id"]
            known.add(f"{rid}.json")
            path = r.run / CERTIFICATES_DIR / f"{rid}.json"
            problems = []
            if req["status"] != DONE:
                problems.append(f"request unfinished ({req['status']}): run privrec forget MODEL --resume")
            elif not path.is_file():
                problems.append("certificate missing")
            else:
                cert = read_certificate(path)
                body = cert.get("body", {})
                if canonical_sha256(body) != cert.get("body_sha256"):
                    problems.append("certificate body altered (sha256 mismatch)")
                if cert.get("body_sha256") != req["certificate_sha256"]:
                    problems.append("certificate differs from the one recorded in the ledger")
                held = sorted(
                    x["sample_id"]
                    for x in body.get("removed", {}).get("samples", [])
                    if x["sample_id"] in lineage_ids
                )
                if held:
                    problems.append(f"{len(held)} removed samples are back in a lineage (e.g. {held[0]})")
                for a in body.get("adapters", []):
                    k = a["shard"]
                    if r.ledger.installed_after(k, req["adapters_seq"] or 0):
                        continue  # re-trained since (a later request or a training command): checked above
                    if current.get(k) != a["after"]:
                        problems.append(f"{r.route.label(k)} no longer holds the adapter this certificate covers")
            certificates.append({"request": rid, "ok": not problems, "problems": problems})
        cdir = r.run / CERTIFICATES_DIR
        for p in sorted(cdir.glob("*.json")) if cdir.is_dir() else []:
            if p.name not in known:
                certificates.append({"request": p.stem, "ok": False,
                                     "problems": ["certificate with no request in the ledger"]})
        ok = all(a["ok"] for a in adapters) and all(c["ok"] for c in certificates)
        for a in adapters:
            a["label"] = r.route.label(a["shard"]) if isinstance(a["shard"], int) else "shards"
        return {"ok": ok, "adapters": adapters, "certificates": certificates,
                "tombstones": len(r.ledger.tombstones()) if r.ledger else 0}
