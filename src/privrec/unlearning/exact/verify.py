"""Verification of a model that forgets exactly (METHODS §7): every adapter against its ``privrec.json``, the
ledger, the manifest and the data, and every certificate against the ledger and the adapters on disk
(``privrec forget MODEL --verify``; :func:`check_current` is also the check a request certifies with).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privrec import models
from privrec.errors import RunError
from privrec.model.adapters import read_meta, tensors_digest
from privrec.prepare import shows_tombstoned
from privrec.rundir import (
    ADAPTERS_DIR,
    CERTIFICATES_DIR,
    CHECKPOINT_FILE,
    FEATURES_FILE,
    PREDICTIONS_FORGET,
    PREDICTIONS_GLOB,
    SERVE_DIR,
    SLICES_DIR,
    STAGING_DIR,
    read_json,
)
from privrec.train import CKPT_ADAPTER, CKPT_BEST, load_checkpoint
from privrec.unlearning.exact.certificate import canonical_sha256, check_adapter, read_certificate
from privrec.unlearning.exact.ledger import DONE
from privrec.unlearning.exact.routes import EXACT_ROUTES, Routes, Run, session


def check_current(r: Run, upto: str | None = None) -> list[dict]:
    """Every current adapter against its privrec.json, the ledger's record, the manifest and the data (the
    tombstones of every request, or of ``upto`` and the requests before it)."""
    tomb = (r.ledger.tombstones_upto(upto) if upto else r.ledger.tombstones()) if r.ledger else set()
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


def residue(r: Run) -> list[str]:
    """What in the model directory, or in the frozen-layer cache, may still derive from a deleted sample: a
    folder a swap left beside the adapters (``adapters/.NAME.old``, ``slices/.../.stage-S.partial``), a staging
    folder of a finished request, a training checkpoint of an adapter no longer installed, rows of deleted
    samples in the per-sample files (:data:`privrec.rundir.DERIVED_PER_SAMPLE`), a forgotten user in the
    service's stores, and cache entries of removed samples."""
    out = []
    current = {f.name for f in r.route.folders().values()}
    adir = r.run / ADAPTERS_DIR
    for p in sorted(adir.iterdir()) if adir.is_dir() else []:
        if p.name not in current:
            out.append(f"{ADAPTERS_DIR}/{p.name} is left beside the adapters (it may hold deleted data): remove it")
    unfinished = r.ledger.unfinished() if r.ledger else None
    sdir = r.run / STAGING_DIR
    for p in sorted(sdir.iterdir()) if sdir.is_dir() else []:
        if unfinished is None or p.name != unfinished["id"]:
            out.append(f"{STAGING_DIR}/{p.name} is left from a deletion request (it may hold deleted data)")
    sl = r.run / SLICES_DIR
    out += [f"{p.relative_to(r.run.path)} is left beside the checkpoints" for p in sorted(sl.rglob(".*"))
            if sl.is_dir()]
    tomb = r.ledger.tombstones() if r.ledger else set()
    if not tomb:
        return out
    ck = r.run / CHECKPOINT_FILE
    if ck.is_file():
        installed = {read_meta(f).get("tensors_sha256") for f in r.route.folders().values()}
        try:
            c = load_checkpoint(ck)
            trained = {tensors_digest(c[k]) for k in (CKPT_ADAPTER, CKPT_BEST) if c.get(k)}
        except RunError:
            trained = set()
        if not trained & installed:
            out.append(f"{CHECKPOINT_FILE} did not train the installed adapter (it may hold deleted data)")
    deleted = {sid for sid, s in r.universe.items() if shows_tombstoned(s, tomb)}
    for path in sorted(p for p in r.run.path.glob(PREDICTIONS_GLOB) if p.name != PREDICTIONS_FORGET):
        held = {ln.split(",", 1)[0] for ln in path.read_text().splitlines()} & deleted
        if held:
            out.append(f"{path.name} holds rows of {len(held)} deleted samples (e.g. {min(held)})")
    if (r.run / FEATURES_FILE).is_file():
        with np.load(r.run / FEATURES_FILE, allow_pickle=False) as z:
            held = set(z["ids"].tolist()) & deleted
        if held:
            out.append(f"{FEATURES_FILE} holds rows of {len(held)} deleted samples (e.g. {min(held)})")
    counts = r.ds.inter.groupby("user_id").size()
    per_user: dict[int, int] = {}
    for u, _ in tomb:
        per_user[u] = per_user.get(u, 0) + 1
    gone = {u for u, n in per_user.items() if n >= int(counts.get(u, 0))}
    for path in sorted((r.run / SERVE_DIR).glob("recommendations*.json")):
        held = {int(u) for u in (read_json(path).get("users") or {})} & gone
        if held:
            out.append(f"{path.name} holds the recommendations of {len(held)} forgotten users (e.g. {min(held)})")
    removed = sorted({x["sample_id"] for q in r.ledger.requests() for x in r.ledger.removed(q["id"])})
    model = r.route.cached_model() if removed else None
    if model is not None and model.cache is not None:
        held = [e.sample_id for e in model.encode([r.universe[i] for i in removed if i in r.universe])
                if model.cache.entry(e.key) is not None]
        if held:
            out.append(f"the frozen-layer cache holds {len(held)} removed samples (e.g. {held[0]})")
    return out


def run_verify(run_path: str | Path, routes: Routes = EXACT_ROUTES) -> dict:
    """Re-check every certificate and every current adapter of a model; ``ok`` is False on any problem.

    Adapters: tensors on disk == privrec.json == the ledger's latest record == the manifest; lineage recomputed
    from the data == recorded; no lineage sample shows a tombstoned interaction; every adapter the ledger knows
    exists. Certificates: one per done request, body unaltered (its sha256) and the one the ledger recorded;
    none of its removed samples is in any current lineage; every adapter it certified still holds the adapter
    it certified, unless the ledger shows a later install of that slot. A single model that never forgot
    anything has no ledger: its adapter is checked against its manifest and the data.
    """
    with session(run_path, routes, create_ledger=False) as r:
        adapters = check_current(r)
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
        stray = r.route.stray() + residue(r)
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
