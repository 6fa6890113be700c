"""The exact routes of a ``clients`` model (``privrec federate``, METHODS §10), driven by the request state machine
of :mod:`privrec.unlearning.exact.forget` like every other route:

- under ``local`` / ``mixture`` (``retrain-client``) only the adapter of the client that held the data
  retrains, alone (a client whose samples are all deleted leaves: its adapter is dropped);
- under ``pplr`` / ``fedavg`` / ``fedprox`` / ``centralised`` (``retrain-federation``, asked for with
  ``--retrain-federation``) the whole federation trains again without the data.

Slot C is client C's adapter (``adapters/client-C``). :data:`ROUTES` is every exact route, the clients' with
those of :mod:`privrec.unlearning.exact.routes`: what the engine is opened with.
"""

from __future__ import annotations

import json
import os
import shutil

from privrec import models
from privrec.data import Sample
from privrec.errors import RunError
from privrec.federated import slicing
from privrec.federated.client import POOLED, FederatedClient, client_features, client_pool, features_record
from privrec.federated.config import FederatedConfig
from privrec.federated.runner import build_model as federated_model
from privrec.federated.runner import run_federate
from privrec.model.adapters import ADAPTER_META, adapter_state, lineage_of, load_adapter_state, read_meta, save_adapter
from privrec.prepare import adapter_meta, setup_data, source_data
from privrec.rundir import ADAPTERS_DIR, CLIENT_PREFIX, METRICS_FILE, RunDir, atomic_write_text, is_adapter, remove_tree
from privrec.unlearning.exact.routes import (
    EXACT_ROUTES,
    FEATURES_UNRECORDED,
    RETIRED,
    Checkpointed,
    Route,
    purge_common,
)
from privrec.unlearning.exact.slices import first_affected, load_checkpoint, restore, stage_dir, stage_label


class _ClientSlots(Checkpointed):
    """A ``clients`` model (``privrec federate``): slot C is client C's adapter (``adapters/client-C``)."""

    def __init__(self, run, cfg):
        super().__init__(run, cfg)
        self._model = None

    prefix = CLIENT_PREFIX
    config = FederatedConfig

    def folders(self):
        return {int(f.name[len(CLIENT_PREFIX):]): f for f in models.adapter_folders(self.run.path, CLIENT_PREFIX)}

    def folder_of(self, k):
        return self.run / ADAPTERS_DIR / f"{CLIENT_PREFIX}{k}"

    def label(self, k):
        return f"client {k}"

    def _built(self):
        """(the model, its seeded initial adapter: what every client of the run started from)."""
        if self._model is None:
            splits = source_data(self.cfg)[2]
            model = federated_model(self.cfg, splits)
            self._model = (model, adapter_state(model.model))
        return self._model

    def cached_model(self, before=frozenset()):
        lora = self.cfg.lora
        return self._built()[0] if lora.top_layers and lora.cache_frozen else None

    def run_info(self):
        manifest = models.load(self.run.path)
        return dict(super().run_info(), kind="clients", strategy=manifest.strategy)

    def counted(self, tombstones, clients) -> dict[int, list[Sample]]:
        """What each of ``clients``' counted features are counted over with ``tombstones`` deleted (its
        :func:`~privrec.federated.client.client_pool`)."""
        splits, assignment = setup_data(self.cfg, frozenset(tombstones)), models.load(self.run.path).clients
        return {c: client_pool(self.cfg, splits, assignment, c) for c in clients}

    def pool_hits(self, removed) -> set[int]:
        """The clients whose counted features read a removed sample of the training pool (METHODS §12: a sample
        no adapter trained on, whose label only a client's features counted); none without counted features."""
        if not self.cfg.shows_labels:
            return set()
        m = models.load(self.run.path)
        if m.strategy == "centralised":
            return {POOLED} if any(x["split"] == "pool" for x in removed) else set()
        return {m.clients[x["user_id"]] for x in removed if x["split"] == "pool" and x["user_id"] in m.clients}

    def problems(self, k, folder, universe, tombstones):
        """Also, when prompts read counted features (METHODS §12): the adapter's record of each client's
        features must be what that client's data that remains gives (recomputed here)."""
        out = super().problems(k, folder, universe, tombstones)
        if not self.cfg.shows_labels:
            return out
        meta = read_meta(folder)
        recorded = meta.get("features")
        if recorded is None:
            return [*out, FEATURES_UNRECORDED]
        out += _record_problems(recorded, features_record(self.cfg, self.counted(
            tombstones, [int(c) for c in recorded.get("clients", {})])), "its clients' data that remains",
            ("uses", "clients"))
        if not meta.get("checkpoints"):
            return out
        counted = self.counted(tombstones, [k])[k]  # a sliced client's checkpoints: each counted over its stage's
        train = [s for s in setup_data(self.cfg, frozenset(tombstones)).train
                 if models.load(self.run.path).clients.get(s.user_id) == k]
        for rec in meta["checkpoints"]:
            s, ckpt = rec["stage"], stage_dir(self.checkpoints(self.run.path, k), rec["stage"])
            if not is_adapter(ckpt):
                continue  # missing: check_checkpoints says so
            now = slicing.checkpoint_features(self.cfg, k, slicing.stage_pool(counted, train, meta["slices"], s), s)
            out += [f"checkpoint {ckpt.name}: {p}" for p in _record_problems(
                read_meta(ckpt).get("features"), now, f"the client's data of the users of slices 1..{s} that remains",
                ("uses", "counted_over", "clients"))]
        return out

    def purge(self, removed_ids, universe, before=frozenset()):
        model = self.cached_model(before)
        if not self.cfg.shows_labels or model is None or model.cache is None:
            return super().purge(removed_ids, universe, before)
        # counted features (METHODS §12): every prompt of a client whose features counted removed samples showed
        # them: drop the cached states of all its prompts as they were rendered
        manifest = models.load(self.run.path)
        pooled = manifest.strategy == "centralised"
        hit = [POOLED] if pooled else sorted({manifest.clients.get(universe[i].user_id) for i in removed_ids
                                              if i in universe} - {None})
        splits, dropped = setup_data(self.cfg, before), 0
        for c, counted in self.counted(before, hit).items():
            shown = [s for part in (splits.train, splits.valid, splits.test) for s in part
                     if pooled or manifest.clients.get(s.user_id) == c]
            with model.features_of(client_features(self.cfg, counted)):
                dropped += sum(model.cache.discard(e.key) for e in model.encode(shown))
            slices = None if pooled or c not in self.folders() else read_meta(self.folders()[c]).get("slices")
            train = [s for s in splits.train if manifest.clients.get(s.user_id) == c]
            for s in range(1, len(slices or [])):  # a sliced client's earlier stages, under their own features
                with model.features_of(client_features(self.cfg, slicing.stage_pool(counted, train, slices, s))):
                    dropped += sum(model.cache.discard(e.key) for e in model.encode(
                        slicing.in_slices(train, slices, s)))
        return f"{dropped} cached prompts that showed the old features, " + purge_common(
            self.run, model, removed_ids, universe)


def _record_problems(recorded: dict | None, now: dict, against: str, keys: tuple[str, ...]) -> list[str]:
    """Problems of a client adapter's (or checkpoint's) ``features`` record against ``now``, its recount from
    ``against``: unrecorded, or differing in one of ``keys`` (the clients' twin of
    :func:`~privrec.unlearning.exact.routes.feature_problems`, whose records have one block per client)."""
    if recorded is None:
        return [FEATURES_UNRECORDED]
    return [f"its features' record differs from {against} ({what}: counted outside its lineage, or altered)"
            for what in keys if recorded.get(what) != now.get(what)]


def _counted_lineage(meta: dict, k: int) -> str | None:
    """The lineage hash of what client ``k``'s counted features were counted over, as an adapter's (or a
    checkpoint's) ``privrec.json`` records it (None: unrecorded)."""
    return ((meta.get("features") or {}).get("clients") or {}).get(str(k), {}).get("lineage_sha256")


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

    def affected(self, removed):
        return super().affected(removed) | (self.pool_hits(removed) & set(self.folders()))

    def first_stage(self, k: int, old: dict, slices: list[list[str]], samples: list[Sample],
                    counted: list[Sample] | None) -> int | None:
        """The first stage of sliced client k a deletion reaches: the first slice that lost training samples, or,
        when its prompts read counted features (METHODS §12), the first stage whose recorded features were counted
        over data that changed (the last stage's record is the adapter's own: a pool-only user's data reaches it
        alone); None when neither. ``slices``, ``samples``, ``counted``: what remains."""
        j = first_affected(old["slices"], slices)
        if counted is None:
            return j
        here = self.checkpoints(self.run.path, k)
        for s in range(1, j or len(slices)):
            if _counted_lineage(read_meta(stage_dir(here, s)), k) != lineage_of(
                    slicing.stage_pool(counted, samples, slices, s)):
                return s
        if j is None and _counted_lineage(old, k) != lineage_of(counted):
            return len(slices)
        return j

    def retrain(self, rid, k, ids, universe, tombstones, staged, progress):
        if is_adapter(staged):
            return
        keep = set(ids)
        samples = [s for s in source_data(self.cfg)[2].train if s.sample_id in keep]  # the run's order
        model, init = self._built()
        manifest = models.load(self.run.path)
        old = read_meta(self.folders()[k])
        counted = self.counted(tombstones, [k])[k] if self.cfg.shows_labels else None
        extra = {"features": features_record(self.cfg, {k: counted})} if counted is not None else {}
        meta = adapter_meta(self.cfg, model, samples, client=k, strategy=manifest.strategy,
                            rounds=self.cfg.federated.rounds, trained_on_clients=[k], request=rid, **extra)
        rounds, slices, replay = self.cfg.federated.rounds, None, {}
        start, first = init, 0
        there = self.checkpoints(staged.parent, k)
        if old.get("slices"):
            slices = [[i for i in sl if i in keep] for sl in old["slices"]]
            r, j = len(slices), self.first_stage(k, old, slices, samples, counted)
            if j is None:  # affected: a slice or its counted data lost samples, unless its metadata lies
                raise RunError(f"{self.folders()[k]}: its slice map does not hold its lineage's samples "
                               "(privrec.json is corrupt); train the model again")
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
            feats = None if counted is None else slicing.checkpoint_features(
                self.cfg, k, slicing.stage_pool(counted, samples, slices, s), s)
            slicing.save_client_checkpoint(model, staged.parent, k, s, slicing.in_slices(samples, slices, s), meta,
                                           feats)
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
            client = FederatedClient(k, model, samples, [], [], self.cfg, slices=slices, counted=counted)
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
        hit = any(x["shard"] is not None for x in removed) or self.pool_hits(removed)
        return set(self.folders()) if hit else set()

    def retrain(self, rid, k, ids, universe, tombstones, staged, progress):
        if staged.exists():
            return
        fed = staged.parent / "federation"
        if not (fed / METRICS_FILE).is_file():
            remove_tree(fed)
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
        remove_tree(tmp)
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


# every exact route: those of privrec.unlearning.exact and the clients' (what the engine is opened with)
ROUTES: dict[str, type[Route]] = {**EXACT_ROUTES, "retrain-client": RetrainClient,
                                  "retrain-federation": RetrainFederation}
