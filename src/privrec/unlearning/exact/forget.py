"""The request state machine of exact unlearning (METHODS §4, §7): users', samples' or clients' data deleted
from a model of any kind that can forget exactly, through ONE ledger (:mod:`privrec.unlearning.exact.ledger`),
ONE certificate format (:mod:`privrec.unlearning.exact.certificate`) and the route of its kind
(:mod:`privrec.unlearning.exact.routes`, :mod:`privrec.federated.forget`):

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
request killed at any point is finished by :func:`run_resume` (``privrec forget MODEL --resume``) and is never
applied twice:

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

:func:`privrec.unlearning.exact.verify.run_verify` re-checks every certificate and every adapter against the
ledger, the manifest and the data. Kinds that cannot forget exactly (student, a single model whose prompts
show other users' labels) are refused with one line naming what can (:func:`privrec.models.refusal`).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from privrec import models
from privrec.config import ExecutorConfig
from privrec.data import Dataset
from privrec.data.idfiles import SAMPLE_ID
from privrec.errors import NotFoundError, RunError, UserError
from privrec.model.adapters import read_adapter, read_meta, tensors_digest
from privrec.prepare import shows_tombstoned
from privrec.rundir import CERTIFICATES_DIR, METRICS_FILE, STAGING_DIR, old_of, remove_tree, swap_in
from privrec.unlearning.exact.certificate import build_body, make_certificate, read_certificate, write_certificate
from privrec.unlearning.exact.ledger import DONE, INSTALLED, PENDING, RETRAINED
from privrec.unlearning.exact.routes import EXACT_ROUTES, RETIRED, Fault, Routes, Run, session
from privrec.unlearning.exact.verify import check_current


# --- a request: recorded, then finished ----------------------------------------------------------------------
def run_forget(
    run_path: str | Path,
    users: list[int] | None = None,
    sample_ids: list[str] | None = None,
    progress: bool = True,
    fault: Fault | None = None,
    clients: list[int] | None = None,
    retrain_federation: bool = False,
    remote=None,
    routes: Routes = EXACT_ROUTES,
    executor: ExecutorConfig | None = None,
) -> dict:
    """Delete users', samples' or (a ``clients`` model) whole clients' data from a model that forgets exactly;
    returns the certificate. ``routes``: the routes it may take (:data:`privrec.federated.forget.ROUTES` for
    every kind; the default knows the one-adapter and shards routes only).

    ``clients``: every user those clients hold leaves the model (under local / mixture their adapters are
    dropped). ``retrain_federation``: consent to the full federated retrain a pplr / fedavg / fedprox /
    centralised model needs (METHODS §10); without it such a model is refused with its cost.
    ``remote``: a model deployed on Flower (:class:`privrec.federated.flower_app.FlowerForget`): a client's
    retrain runs on the node holding its data; a federated retrain runs on every node, the deleted interactions
    sent only to the nodes that held them.
    ``fault(point)`` is called at every step boundary (tests inject crashes there). ``executor``: how the shards
    a request retrains run (default local; ``ray``: one Ray task each, the same certificate).
    Returns ``{"noop": True, ...}`` when everything asked for is already deleted.

    Raises:
        UserError: unknown user / sample / client, a kind that cannot forget exactly, a federated retrain not
            asked for.
        RunError: not a model directory, busy, an unfinished request (finish it with ``--resume`` first), or a
            failed lineage check.
    """
    if sum(x is not None for x in (users, sample_ids, clients)) != 1:
        raise UserError("give exactly one of --users, --samples or --clients")
    with session(run_path, routes) as r:
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
        r.route.executor = executor or ExecutorConfig()
        return _finish(r, recorded["request"], progress, fault)


def submit_forget(run_path: str | Path, users: list[int], routes: Routes = EXACT_ROUTES) -> dict:
    """Record a deletion request of ``users`` and return ``{"request": id}`` without applying it (the service:
    its worker applies requests in order with :func:`run_resume`). The caller holds the model's run lock.

    A request recorded while an earlier one is unfinished waits for it: its plan (which samples go, which
    adapters retrain) is made now, its adapters' before-hashes are taken again when it starts (``_replan``).
    Returns ``{"noop": True, ...}`` when everything asked for is already deleted.

    Raises:
        UserError: unknown user.
    """
    with session(run_path, routes, lock=False) as r:
        _check_consent(r, False)
        return _record(r, users, None)


def _check_consent(r: Run, retrain_federation: bool) -> None:
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


def users_of_clients(r: Run, clients: list[int]) -> list[int]:
    """Every user a ``clients`` model's clients hold.

    Raises:
        UserError: not a clients model, or a client it does not have."""
    if r.manifest.kind != "clients":
        raise UserError(f"--clients is for federated models (privrec federate); {r.run.path} is "
                        f"{r.manifest.describe()}")
    have = set(r.manifest.clients.values())
    unknown = sorted(set(clients) - have)
    if unknown:
        raise NotFoundError(f"client {unknown[0]} is not a client of {r.run.path} (clients {sorted(have)})")
    return sorted(u for u, c in r.manifest.clients.items() if c in set(clients))


def _record(r: Run, users: list[int] | None, sample_ids: list[str] | None,
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
    if r.cfg.shows_labels:  # its prompts' features were counted over the whole training pool (METHODS §12)
        split_of = {**{s.sample_id: "pool" for s in r.splits.pool}, **split_of}
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
               swap_guard: contextlib.AbstractContextManager | None = None,
               routes: Routes = EXACT_ROUTES, executor: ExecutorConfig | None = None) -> dict | None:
    """Finish the first unfinished request of a model, if any; returns its certificate (None: nothing to do).

    ``lock=False``: the caller holds the run lock (the service). ``swap_guard`` is held while adapters are
    swapped in (the service holds it while it records a request, so a plan never sees a half-done swap).
    """
    with session(run_path, routes, lock=lock) as r:
        req = r.ledger.unfinished()
        if req is None:
            return None
        r.run.log(f"forget --resume: {req['id']} from status {req['status']}")
        r.route.executor = executor or ExecutorConfig()
        return _finish(r, req["id"], progress, fault, swap_guard)


def _finish(r: Run, rid: str, progress: bool, fault: Fault | None,
            swap_guard: contextlib.AbstractContextManager | None = None) -> dict:
    if r.route.executor.kind != "local" and r.route.name != "retrain-shards":
        r.run.log(f"forget {rid}: {r.route.name} retrains in this process (only a shards model's shards run as "
                  "Ray tasks)")
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
        remove_tree(r.run / STAGING_DIR / rid)
        _note_in_metrics(r, rid)
        r.run.log(
            f"forget {rid}: done, certificate {cert['body_sha256'][:16]}, retrain "
            f"{cert['record']['retrain_seconds']:.1f}s"
        )
        return cert
    return read_certificate(r.run / CERTIFICATES_DIR / f"{rid}.json")


def _replan(r: Run, rid: str) -> None:
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


def _staged(r: Run, rid: str, k: int) -> Path:
    return r.run / STAGING_DIR / rid / r.route.folder_of(k).name


def _retrain(r: Run, rid: str, progress: bool) -> float:
    """Purge the removed samples' derived copies, retrain every affected slot into staging; returns the
    training seconds of the staged adapters."""
    removed_ids = {x["sample_id"] for x in r.ledger.removed(rid)}
    tombstones = r.ledger.tombstones_upto(rid)  # not those of a request queued after it (the service)
    before = tombstones - {(t["user_id"], t["item_id"]) for t in r.ledger.tombstone_rows() if t["request_id"] == rid}
    r.run.log(f"forget {rid}: purged {r.route.purge(removed_ids, r.universe, before)}")
    slots, jobs = r.ledger.request_shards(rid), {}
    for s in slots:
        if s["retrain"]:
            meta = read_meta(r.route.folders()[s["shard"]])
            jobs[s["shard"]] = [i for i in meta["sample_ids"] if i not in removed_ids]
    staged = {k: _staged(r, rid, k) for k in jobs}
    for k, ids in jobs.items():
        if not ids:  # every sample of the adapter was deleted: it is retired
            staged[k].mkdir(parents=True, exist_ok=True)
            (staged[k] / RETIRED).write_text(rid)
    # the slots' retraining, independent of each other (the route may run them as Ray tasks)
    r.route.retrain_slots(rid, {k: ids for k, ids in jobs.items() if ids}, r.universe, tombstones, staged, progress)
    seconds = 0.0
    for s in slots:  # the ledger rows in slot order, however the retraining ran
        k = s["shard"]
        if not s["retrain"]:
            r.ledger.set_after(rid, k, s["before_sha256"], s["n_before"])
            continue
        if (staged[k] / RETIRED).exists():  # every sample went, or the route dropped it (a client that left)
            r.ledger.set_after(rid, k, None, 0)
            continue
        staged_meta = read_meta(staged[k])
        seconds += float(staged_meta.get("train_seconds", 0.0))
        r.ledger.set_after(rid, k, staged_meta["tensors_sha256"], len(staged_meta["sample_ids"]))
    return seconds


def _install(r: Run, rid: str, fault: Fault | None) -> None:
    """Swap every staged adapter in; finish a half-done swap; check adapters swapped before a crash."""
    for s in r.ledger.request_shards(rid):
        if not s["retrain"]:
            continue
        k, after = s["shard"], s["after_sha256"]
        staged, final = _staged(r, rid, k), r.route.folder_of(k)
        r.route.install_slot(rid, k, (staged / RETIRED).exists() if staged.exists() else not final.exists())
        if staged.exists() and (staged / RETIRED).exists():  # every sample of it was deleted: it goes
            if final.exists():
                os.replace(final, old_of(final))
            remove_tree(staged)
        elif staged.exists():
            swap_in(staged, final)
        remove_tree(old_of(final))  # a swap a crash interrupted: the old adapter held the deleted data
        installed = tensors_digest(read_adapter(final)[0]) if final.exists() else None
        if installed != after:
            raise RunError(
                f"{r.route.label(k)} does not hold the adapter staged by {rid}: the model was changed during "
                "the request; restore it from a backup or train it again"
            )
        latest = r.ledger.latest_adapters().get(k)
        if latest is None or latest["origin"] != rid:
            lineage = read_meta(final)["lineage_sha256"] if final.exists() else None
            r.ledger.record_adapter(k, after, lineage, s["n_after"] or 0, rid)
        _fault(fault, f"installed-shard-{k}")
    r.route.installed()
    models.refresh(r.run.path)


def _certify(r: Run, rid: str) -> dict:
    """Check every adapter, write the certificate; raise if a check failed (the request stays installed)."""
    req = r.ledger.request(rid)
    checks = check_current(r, upto=rid)
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
            raise NotFoundError(
                f"user {unknown[0]} not found in {ds.name}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            )
    else:
        pairs = {tuple(int(g) for g in SAMPLE_ID.match(s).groups()) for s in sample_ids or []}
        keys = list(zip(inter["user_id"].tolist(), inter["item_id"].tolist()))
        mask = [k in pairs for k in keys]
        rows = inter[mask]
        unknown = sorted(pairs - set(zip(rows["user_id"].tolist(), rows["item_id"].tolist())))
        if unknown:
            raise NotFoundError(f"sample u{unknown[0][0]}-i{unknown[0][1]} is not an interaction in {ds.name}")
    return sorted(
        (int(u), int(i), int(t)) for u, i, t in zip(rows["user_id"], rows["item_id"], rows["timestamp"])
    )


def _note_in_metrics(r: Run, rid: str) -> None:
    """The model's ``metrics.json`` describes it as trained, before this deletion: it says so
    (``predates_deletions``: the requests done since; a training into the directory writes it anew)."""
    path = r.run / METRICS_FILE
    if not path.is_file():
        return
    metrics = r.run.read_metrics()
    done = list(metrics.get("predates_deletions") or [])
    if rid not in done:
        r.run.write_metrics(dict(metrics, predates_deletions=done + [rid]))


def _fault(fault: Fault | None, point: str) -> None:
    if fault is not None:
        fault(point)
