"""The approximate answer to a deletion request on a shards model (METHODS §13; issue 32, Build 2).

An exact request on a user-aware shards model retrains (or replays the later slices of) the shard that held the
user: minutes on a real model. With ``privrec serve --approximate influence`` the service first moves each
affected shard's adapter by one influence step without the user's samples (:mod:`privrec.unlearning.approx
.influence`: the update is local to that shard's adapter, estimated on the shard's own retained samples) and
serves the K adapters with those in place, seconds after the request; the exact replay then runs as before and
its adapters replace the approximate ones. Only the exact model is certified: the request's history and its
certificate say which model served when (:class:`ApproximateLog`, ``MODEL/serve/approximate.json``).

The approximate adapters live in memory only: a restarted service computes them again for a request still
pending. Off by default.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from privrec.errors import UserError
from privrec.model.adapters import adapter_state, load_adapter_state, read_meta
from privrec.prepare import source_data
from privrec.recommender import Recommender
from privrec.rundir import atomic_write_json, read_json
from privrec.serve import SERVE_DIR
from privrec.unlearning.approx.influence import apply_update, hessian_items, influence_update
from privrec.unlearning.approx.task import InfluenceSection
from privrec.unlearning.exact.shards import shard_features

APPROXIMATE_FILE = "approximate.json"
METHODS = ("influence",)


def check_approximate(method: str | None, kind: str) -> None:
    """Raises: UserError for a method privrec serve cannot apply to a model of ``kind``."""
    if method is None:
        return
    if method not in METHODS:
        raise UserError(f"--approximate {method}: choose one of {', '.join(METHODS)}")
    if kind != "shards":
        raise UserError(f"--approximate {method} needs a shards model (privrec shard-train): the update is local to "
                        f"the shard that held the user; this model is {kind}")


def influence_states(rec: Recommender, users: set[int], section: InfluenceSection,
                     log=print) -> tuple[dict[int, dict], dict]:
    """{shard: its adapter moved by one influence step without ``users``' samples} for every shard of ``rec``
    (a shards model) whose lineage holds one of them, and what was done (per shard: sizes, the solver's last
    relative residual, seconds). Each shard's prompts are rendered as it trained on them (its own counted
    features, METHODS §12); the Hessian is estimated on that shard's retained samples alone."""
    scorer, cfg = rec.scorer, rec.cfg
    model = scorer.model
    universe = source_data(cfg)[1]
    out, info = {}, {}
    for k, record in enumerate(rec.md.manifest.adapters):
        ids = read_meta(rec.md.run / record.path)["sample_ids"]
        samples = [universe[i] for i in ids if i in universe]
        forget = [s for s in samples if s.user_id in users]
        if not forget:
            continue
        t0 = time.perf_counter()
        retain = [s for s in samples if s.user_id not in users]
        load_adapter_state(model.model, scorer.states[k])
        with model.features_of(shard_features(cfg, sorted(samples, key=lambda s: s.sample_id))):
            f_items, r_items = model.encode(forget), model.encode(retain)
        hessian = hessian_items(section, r_items, cfg.seed)
        model.prepare(f_items + hessian, cfg.train.eval_batch_size, False)
        delta, sol, sizes = influence_update(model, f_items, hessian, len(r_items), section, log=lambda m: None)
        apply_update(model, delta)
        out[k] = adapter_state(model.model)
        info[str(k)] = {**sizes, "residual": sol.residuals[-1] if sol.residuals else None,
                        "iterations": sol.iterations, "seconds": time.perf_counter() - t0}
        log(f"approximate: shard {k} moved by influence without {len(forget)} samples ({sol.iterations} "
            f"iterations, relative residual {info[str(k)]['residual']:.2e}, {info[str(k)]['seconds']:.1f}s)")
    load_adapter_state(model.model, scorer.states[0])
    return out, info


def approximate_recommender(rec: Recommender, rid: str, states: dict[int, dict]) -> Recommender:
    """``rec`` (a fresh one, not serving yet) with ``states`` in place of its shards' adapters: the approximate
    model of request ``rid`` (its digest names it, so no store entry of another model is read for it)."""
    rec.scorer.use_states(states)
    rec.digest = f"{rec.digest}+approximate:{rid}"
    rec.approximate = rid
    return rec


class ApproximateLog:
    """``MODEL/serve/approximate.json``: for each request an approximate model served, the method, the shards it
    moved, what the solver did, and when it served (``served_from``, ``served_until``: when the exact adapters
    replaced it). Written atomically; read by the request's history and its certificate."""

    def __init__(self, model: Path):
        self.path = Path(model) / SERVE_DIR / APPROXIMATE_FILE
        self._lock = threading.Lock()
        self.records: dict[str, dict] = read_json(self.path) if self.path.is_file() else {}

    def served(self, rid: str, method: str, shards: dict, seconds: float) -> None:
        with self._lock:
            self.records[rid] = {"method": method, "shards": shards, "seconds": seconds, "served_from": time.time(),
                                 "served_until": None, "certified": False}
            self._write()

    def replaced(self, rid: str) -> None:
        with self._lock:
            if rid in self.records and self.records[rid]["served_until"] is None:
                self.records[rid]["served_until"] = time.time()
                self._write()

    def get(self, rid: str) -> dict | None:
        with self._lock:
            rec = self.records.get(rid)
            return dict(rec) if rec else None

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.records)


def served_models(approx: dict | None, done_at: float | None) -> list[dict]:
    """Which model answered for a request's users' neighbours, when: the approximate one (never certified), then
    the exact one (certified by the request's certificate)."""
    out = []
    if approx is not None:
        out.append({"model": f"approximate ({approx['method']}, shards {sorted(int(k) for k in approx['shards'])})",
                    "from": approx["served_from"], "until": approx["served_until"], "certified": False})
    out.append({"model": "exact (retrained without the data)", "from": (approx or {}).get("served_until") or done_at,
                "until": None, "certified": True})
    return out
