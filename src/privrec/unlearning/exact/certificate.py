"""Lineage and erasure certificates (METHODS §4 unlearning, §7: exact unlearning must be provable).

An adapter's lineage is the exact list of sample ids that trained it plus the project's one lineage hash
over those ids and their content (:func:`privrec.model.adapters.lineage_of`): recomputable from the data
source at any time, so a lineage that was edited, or data that changed under it, shows.

A certificate (``RUN/certificates/<request>.json``) has a deterministic ``body`` (the request, the removed
interactions and samples, every shard's adapter hash before and after, the lineage check) and its
``body_sha256``, plus a ``record`` of times that naturally differ from run to run (created, completed,
retrain seconds, the status events). The same request on the same run always yields the same body, however
often it was interrupted and resumed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from privrec.data import Sample
from privrec.model.adapters import lineage_of, read_adapter, tensors_digest
from privrec.rundir import atomic_write_json, read_json
from privrec.unlearning.exact.ledger import shows_tombstoned

CERTIFICATE_VERSION = "privrec-erasure-certificate/1"


def canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_adapter(
    folder: Path,
    universe: dict[str, Sample],
    tombstones: set[tuple[int, int]],
    recorded_sha256: str | None = None,
    slot: int | None = None,
) -> dict:
    """Check one adapter folder (slot ``slot`` of its model: a shard's number, 0 for a single adapter) against
    its own metadata, the data and the tombstones.

    Checks: the tensors on disk hash to the hash in ``privrec.json`` (and to ``recorded_sha256``, the
    ledger's record, when given); every lineage id exists in the data source; the lineage hash recomputed
    from the data equals the recorded one; no lineage sample shows a tombstoned interaction.

    Returns:
        {shard (the slot), ok, problems, tensors_sha256, lineage_sha256, n_samples}.
    """
    folder = Path(folder)
    problems: list[str] = []
    try:
        state, meta = read_adapter(folder)
    except Exception as e:  # noqa: BLE001 - an unreadable adapter is a failed check, not a crash
        return {
            "shard": folder.name if slot is None else slot,
            "ok": False,
            "problems": [f"unreadable adapter: {e.__class__.__name__}"],
            "tensors_sha256": None,
            "lineage_sha256": None,
            "n_samples": 0,
        }
    digest = tensors_digest(state)
    if digest != meta.get("tensors_sha256"):
        problems.append("tensors differ from the hash in privrec.json")
    if recorded_sha256 is not None and digest != recorded_sha256:
        problems.append("tensors differ from the hash recorded in the ledger")
    ids = list(meta.get("sample_ids", []))
    unknown = [i for i in ids if i not in universe]
    if unknown:
        problems.append(f"{len(unknown)} lineage ids unknown to the data source (e.g. {unknown[0]})")
    known = [universe[i] for i in ids if i in universe]
    lineage = lineage_of(known) if not unknown else None
    if lineage != meta.get("lineage_sha256"):
        problems.append("lineage hash recomputed from the data differs from privrec.json")
    held = [s.sample_id for s in known if shows_tombstoned(s, tombstones)]
    if held:
        problems.append(f"lineage holds {len(held)} deleted samples (e.g. {held[0]})")
    return {
        "shard": meta.get("shard", folder.name) if slot is None else slot,
        "ok": not problems,
        "problems": problems,
        "tensors_sha256": digest,
        "lineage_sha256": lineage,
        "n_samples": len(ids),
    }


def build_body(
    request: dict,
    interactions: list[tuple[int, int, int]],
    removed: list[dict],
    shards: list[dict],
    checks: list[dict],
    run_info: dict,
    slices: dict[int, dict] | None = None,
) -> dict:
    """The deterministic part of a certificate. ``slices``: per sliced shard that replayed, the checkpoint it
    restored, the stages it replayed and the checkpoints it replaced (METHODS §9); only those adapters carry a
    ``slices`` entry, so an unsliced model's certificate is as before."""
    slices = slices or {}
    body = {
        "certificate": CERTIFICATE_VERSION,
        "request": {"id": request["id"], "kind": request["kind"], "spec": json.loads(request["spec"])},
        "run": run_info,
        "removed": {
            "interactions": [list(t) for t in sorted(interactions)],
            "samples": [
                {"sample_id": r["sample_id"], "split": r["split"], "shard": r["shard"]}
                for r in sorted(removed, key=lambda r: r["sample_id"])
            ],
        },
        "affected_shards": [s["shard"] for s in shards if s["retrain"]],
        "adapters": [
            {
                "shard": s["shard"],
                "retrained": bool(s["retrain"]),
                "before": s["before_sha256"],
                "after": s["after_sha256"],
                "n_before": s["n_before"],
                "n_after": s["n_after"],
                "unchanged": s["before_sha256"] == s["after_sha256"],
                **({"slices": slices[s["shard"]]} if s["shard"] in slices else {}),
            }
            for s in shards
        ],
        "lineage_check": {
            "passed": all(c["ok"] for c in checks),
            "shards": [
                {
                    "shard": c["shard"],
                    "ok": c["ok"],
                    "problems": c["problems"],
                    "lineage_sha256": c["lineage_sha256"],
                    "n_samples": c["n_samples"],
                }
                for c in checks
            ],
        },
    }
    return body


def make_certificate(body: dict, record: dict) -> dict:
    return {"body": body, "body_sha256": canonical_sha256(body), "record": record}


def write_certificate(path: Path, cert: dict) -> None:
    atomic_write_json(path, cert)


def read_certificate(path: Path) -> dict:
    return read_json(path)
