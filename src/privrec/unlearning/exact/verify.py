"""Verification of a model that forgets exactly (METHODS §7): every adapter against its ``privrec.json``, the
ledger, the manifest and the data, and every certificate against the ledger and the adapters on disk
(``privrec forget MODEL --verify``; :func:`check_current` is also the check a request certifies with).
"""

from __future__ import annotations

from pathlib import Path

from privrec import models
from privrec.model.adapters import read_meta
from privrec.rundir import CERTIFICATES_DIR
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
