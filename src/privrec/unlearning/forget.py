"""``privrec forget``: exact unlearning of users or samples from a shard-train run (METHODS §4, §7).

A request moves through the ledger's statuses, each step idempotent, so a request killed at any point is
finished by ``privrec forget RUN --resume`` and is never applied twice:

  pending    the request, its tombstones, the samples it removes and every shard's hash are committed in
             one SQLite transaction before any model work;
  retrained  derived copies of the removed samples are purged (the run's feature rows, their frozen-layer
             cache entries), every affected shard is retrained from scratch without them into
             ``RUN/staging/<request>/`` (atomic folders; a finished staged shard is reused on resume);
  installed  each staged adapter replaces the old one by rename (old -> .old, staged -> final, drop .old);
             a resume finishes a half-done swap and checks an already-swapped shard's hash;
  done       every shard's lineage is checked against the data and the tombstones, unaffected shards are
             checked bit-identical, the certificate is written to ``RUN/certificates/<request>.json``.

``run_verify`` re-checks every certificate and every adapter against the ledger and the data.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from privrec.data import Dataset, Sample, Splits
from privrec.data.idfiles import read_id_file
from privrec.errors import RunError, UserError
from privrec.model.adapters import read_adapter, save_adapter, tensors_digest
from privrec.rundir import CERTIFICATES_DIR, FEATURES_FILE, LEDGER_FILE, SHARD_PREFIX, STAGING_DIR, RunDir
from privrec.unlearning.certificate import (
    build_body,
    canonical_sha256,
    check_adapter,
    make_certificate,
    read_certificate,
    write_certificate,
)
from privrec.unlearning.ledger import DONE, INSTALLED, PENDING, RETRAINED, Ledger, run_lock, shows_tombstoned
from privrec.unlearning.sharding import (
    ADAPTER_SECTIONS,
    ApaConfig,
    _reusable,
    build_model,
    purge_features,
    shard_dir,
    shard_folders,
    shard_meta,
    source_data,
    train_shard,
)

Fault = Callable[[str], None]
RETIRED = "RETIRED"  # marker file of a staged shard that lost all its samples
_SAMPLE_ID = re.compile(r"^u(\d+)-i(\d+)$")


@dataclass
class _Run:
    run: RunDir
    cfg: ApaConfig
    ledger: Ledger
    ds: Dataset
    universe: dict[str, Sample]
    splits: Splits  # the run's split draw, before tombstones


def _open(run_path: str | Path) -> _Run:
    """Raises: RunError (not a shard-train run, no ledger), DataError / AssetError (data source)."""
    run = RunDir(run_path, create=False)
    cfg = run.load_config(cls=ApaConfig)
    ledger = Ledger(run / LEDGER_FILE, create=False)
    ledger.bind_source(cfg.data.source, cfg.data.path)
    ds, universe, splits = source_data(cfg)
    return _Run(run, cfg, ledger, ds, universe, splits)


@contextlib.contextmanager
def _session(run_path: str | Path) -> Iterator[_Run]:
    """The run, locked for this command, its ledger closed at the end."""
    with run_lock(Path(run_path)):
        r = _open(run_path)
        try:
            yield r
        finally:
            r.ledger.close()


def parse_users(text: str) -> list[int]:
    """``"12,40"`` -> [12, 40].

    Raises:
        UserError: empty or not a comma-separated list of integers."""
    try:
        users = sorted({int(u) for u in text.split(",") if u.strip()})
    except ValueError:
        raise UserError(f"--users expects comma-separated user ids, got {text!r}") from None
    if not users:
        raise UserError("--users is empty")
    return users


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
) -> dict:
    """Delete users' or samples' data from a shard-train run; returns the certificate.

    ``fault(point)`` is called at every step boundary (tests inject crashes there).
    Returns ``{"noop": True, ...}`` when everything asked for is already deleted.

    Raises:
        UserError: unknown user / sample, unreadable samples file. RunError: not a shard-train run, busy,
            an unfinished request (finish it with ``--resume`` first), or a failed lineage check.
    """
    if (users is None) == (samples_file is None):
        raise UserError("give exactly one of --users or --samples")
    sample_ids = read_sample_ids(samples_file) if samples_file is not None else None
    with _session(run_path) as r:
        unfinished = r.ledger.unfinished()
        if unfinished:
            raise RunError(
                f"deletion request {unfinished['id']} is unfinished ({unfinished['status']}); "
                f"finish it first: privrec forget {r.run.path} --resume"
            )
        kind, spec = (
            ("users", {"users": users}) if users is not None else ("samples", {"samples": sample_ids})
        )
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

        # which of the run's samples go, and which shard holds each
        split_of = {s.sample_id: name for name in ("train", "valid", "test") for s in r.splits.get(name)}
        folders = shard_folders(r.run)
        metas = {k: read_adapter(f) for k, f in folders.items()}
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
        hit = {x["shard"] for x in removed if x["shard"] is not None}
        shards = [
            {
                "shard": k,
                "retrain": k in hit,
                "before_sha256": tensors_digest(state),
                "n_before": len(meta.get("sample_ids", [])),
            }
            for k, (state, meta) in metas.items()
        ]
        rid = r.ledger.record_request(kind, spec, new, removed, shards)
        r.run.log(
            f"forget {rid}: {len(new)} interactions deleted, {len(removed)} samples removed, "
            f"shards to retrain: {sorted(hit)}"
        )
        _fault(fault, "recorded")
        return _finish(r, rid, progress, fault)


def run_resume(run_path: str | Path, progress: bool = True, fault: Fault | None = None) -> dict | None:
    """Finish the unfinished request of a run, if any; returns its certificate (None: nothing to do)."""
    with _session(run_path) as r:
        req = r.ledger.unfinished()
        if req is None:
            return None
        r.run.log(f"forget --resume: {req['id']} from status {req['status']}")
        return _finish(r, req["id"], progress, fault)


def _finish(r: _Run, rid: str, progress: bool, fault: Fault | None) -> dict:
    if r.ledger.request(rid)["status"] == PENDING:
        seconds = _retrain(r, rid, progress)
        r.ledger.advance(rid, RETRAINED, retrain_seconds=seconds)
        _fault(fault, "retrained")
    if r.ledger.request(rid)["status"] == RETRAINED:
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


def _retrain(r: _Run, rid: str, progress: bool) -> float:
    """Purge the removed samples' derived copies, retrain every affected shard into staging; returns the
    training seconds of the staged adapters."""
    removed_ids = {x["sample_id"] for x in r.ledger.removed(rid)}
    model, init_state = build_model(r.cfg, r.ds)
    purged = purge_features(r.run / FEATURES_FILE, removed_ids)
    dropped = 0
    if model.cache is not None:
        for e in model.encode([r.universe[i] for i in sorted(removed_ids)]):
            dropped += model.cache.discard(e.key)
    r.run.log(f"forget {rid}: purged {purged} feature rows and {dropped} frozen-cache entries")
    seconds = 0.0
    for s in r.ledger.request_shards(rid):
        k = s["shard"]
        if not s["retrain"]:
            r.ledger.set_after(rid, k, s["before_sha256"], s["n_before"])
            continue
        _, meta = read_adapter(shard_dir(r.run, k))
        ids = [i for i in meta["sample_ids"] if i not in removed_ids]
        staged = r.run / STAGING_DIR / rid / f"{SHARD_PREFIX}{k}"
        if not ids:  # every sample of the shard was deleted: the shard is retired
            staged.mkdir(parents=True, exist_ok=True)
            (staged / RETIRED).write_text(rid)
            r.ledger.set_after(rid, k, None, 0)
            continue
        samples = [r.universe[i] for i in ids]
        if _reusable(staged, r.cfg, samples) is None:
            res = train_shard(model, init_state, samples, r.cfg, k, progress)
            save_adapter(model.model, staged, shard_meta(r.cfg, model, k, samples, rid, res))
            r.run.log(f"forget {rid}: shard {k} retrained on {len(ids)} samples in {res.seconds:.1f}s")
        _, staged_meta = read_adapter(staged)
        seconds += float(staged_meta.get("train_seconds", 0.0))
        r.ledger.set_after(rid, k, staged_meta["tensors_sha256"], len(ids))
    return seconds


def _install(r: _Run, rid: str, fault: Fault | None) -> None:
    """Swap every staged shard in; finish a half-done swap; check shards swapped before a crash."""
    for s in r.ledger.request_shards(rid):
        if not s["retrain"]:
            continue
        k, after = s["shard"], s["after_sha256"]
        final = shard_dir(r.run, k)
        old = final.with_name(f".{final.name}.old")
        staged = r.run / STAGING_DIR / rid / final.name
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
                f"shard {k} does not hold the adapter staged by {rid}: the run was changed during "
                "the request; restore it from a backup or retrain with shard-train"
            )
        shutil.rmtree(old, ignore_errors=True)
        latest = r.ledger.latest_adapters().get(k)
        if latest is None or latest["origin"] != rid:
            lineage = read_adapter(final)[1]["lineage_sha256"] if final.exists() else None
            r.ledger.record_adapter(k, after, lineage, s["n_after"] or 0, rid)
        _fault(fault, f"installed-shard-{k}")


def _certify(r: _Run, rid: str) -> dict:
    """Check every shard, write the certificate; raise if a check failed (the request stays installed)."""
    req = r.ledger.request(rid)
    tomb = r.ledger.tombstones()
    latest = r.ledger.latest_adapters()
    folders = shard_folders(r.run)
    checks = [
        check_adapter(f, r.universe, tomb, (latest.get(k) or {}).get("tensors_sha256"))
        for k, f in folders.items()
    ]
    by_shard = {c["shard"]: c for c in checks}
    shards = r.ledger.request_shards(rid)
    for s in shards:  # every shard holds exactly what this request left: unaffected ones bit-identical
        c = by_shard.get(s["shard"])
        now = c["tensors_sha256"] if c else None
        if now != s["after_sha256"]:
            what = "retrained" if s["retrain"] else "untouched"
            problem = f"adapter differs from the {what} adapter this request left"
            if c is None:
                checks.append(
                    {
                        "shard": s["shard"],
                        "ok": False,
                        "problems": [problem],
                        "tensors_sha256": None,
                        "lineage_sha256": None,
                        "n_samples": 0,
                    }
                )
            else:
                c["problems"].append(problem)
                c["ok"] = False
    metas = [read_adapter(f)[1] for f in folders.values()]
    run_info = {
        "base_model": r.cfg.model.name,
        "config_digest": r.cfg.digest(*ADAPTER_SECTIONS),
        "base_fingerprint": metas[0].get("base_fingerprint") if metas else None,
        "partition": r.cfg.shards.partition,
        "data_source": r.cfg.data.source,
    }
    body = build_body(req, r.ledger.interactions(rid), r.ledger.removed(rid), shards, checks, run_info)
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
        bad = [f"shard {c['shard']}: {'; '.join(c['problems'])}" for c in checks if not c["ok"]]
        raise RunError(
            f"{rid}: lineage check failed ({' | '.join(bad)}); certificate written with "
            "passed=false, request left unfinished"
        )
    return cert


# --- verification --------------------------------------------------------------------------------------
def run_verify(run_path: str | Path) -> dict:
    """Re-check every certificate and every current adapter of a run; ``ok`` is False on any problem.

    Adapters: tensors on disk == privrec.json == the ledger's latest record; lineage recomputed from the
    data == recorded; no lineage sample shows a tombstoned interaction; every shard the ledger knows exists.
    Certificates: one per done request, body unaltered (its sha256) and the one the ledger recorded; none
    of its removed samples is in any current lineage; every shard it certified still holds the adapter it
    certified, unless the ledger shows a later install of that shard.
    """
    with _session(run_path) as r:
        tomb = r.ledger.tombstones()
        latest = r.ledger.latest_adapters()
        folders = shard_folders(r.run)
        adapters = []
        for k, f in folders.items():
            c = check_adapter(f, r.universe, tomb, (latest.get(k) or {}).get("tensors_sha256"))
            if k not in latest:
                c["problems"].append("adapter not recorded in the ledger")
                c["ok"] = False
            adapters.append(c)
        for k, row in latest.items():
            if row["tensors_sha256"] is not None and k not in folders:
                adapters.append(
                    {
                        "shard": k,
                        "ok": False,
                        "problems": ["recorded in the ledger but missing"],
                        "tensors_sha256": None,
                        "lineage_sha256": None,
                        "n_samples": 0,
                    }
                )
        current = {c["shard"]: c["tensors_sha256"] for c in adapters}
        owners: dict[str, list[int]] = {}
        for k, f in folders.items():
            for i in read_adapter(f)[1].get("sample_ids", []):
                owners.setdefault(i, []).append(k)
        shared = sorted(i for i, ks in owners.items() if len(ks) > 1)
        if shared:  # shards are a partition: e.g. an interrupted re-partition left old shards beside new ones
            adapters.append({"shard": "all", "ok": False, "tensors_sha256": None, "lineage_sha256": None,
                             "n_samples": len(owners), "problems": [
                                 f"{len(shared)} samples are in two shards (e.g. {shared[0]}): rerun "
                                 "shard-train --resume"]})
        lineage_ids = set(owners)

        certificates = []
        known = set()
        for req in r.ledger.requests():
            rid = req["id"]
            known.add(f"{rid}.json")
            path = r.run / CERTIFICATES_DIR / f"{rid}.json"
            problems = []
            if req["status"] != DONE:
                problems.append(f"request unfinished ({req['status']}): run privrec forget RUN --resume")
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
                        continue  # re-trained since (a later request or shard-train): checked as an adapter
                    if current.get(k) != a["after"]:
                        problems.append(f"shard {k} no longer holds the adapter this certificate covers")
            certificates.append({"request": rid, "ok": not problems, "problems": problems})
        cdir = r.run / CERTIFICATES_DIR
        for p in sorted(cdir.glob("*.json")) if cdir.is_dir() else []:
            if p.name not in known:
                certificates.append(
                    {
                        "request": p.stem,
                        "ok": False,
                        "problems": ["certificate with no request in the ledger"],
                    }
                )
        ok = all(a["ok"] for a in adapters) and all(c["ok"] for c in certificates)
        return {"ok": ok, "adapters": adapters, "certificates": certificates, "tombstones": len(tomb)}
