"""The model directory's manifest (``model.json``) and its kinds: what a trained model is, which samples
reached which adapter, and what it can do to forget (DESIGN.md, "One model, its whole life").

Every training command writes one model directory and, as soon as its adapters are saved, its manifest:

==========  ==================  =====================================================================
kind        written by          what it holds
==========  ==================  =====================================================================
single      ``train``           one adapter (``adapters/default``)
shards      ``shard-train``     K shard adapters (``adapters/shard-K``) and their aggregations (APA(D),
                                APA(ND), uniform, SISA; METHODS §4, §6), the primary one named
clients     ``federate``        one adapter per client (``adapters/client-C``), the strategy, and which
                                client holds which user: a user's prompts are scored with the adapter of
                                the client that holds the user (METHODS §2)
student     ``unlearn``         the one adapter an unlearning method left (E2URec's original + student,
                                NegGrad's or Bad-Teacher's tuned original, or a retrain; METHODS §5)
==========  ==================  =====================================================================

For every adapter the manifest lists its folder, the ids of the samples that reached it, their lineage
hash (:func:`privrec.model.adapters.lineage_of`, the one definition) and the hash of its tensors. ``forget``
says what the model can do to forget with a privrec command today:

- ``retrain-shards``: retrain only the shards that held the data (``privrec forget``, exact);
- ``retrain-all``: retrain its one adapter from scratch without the data (``privrec forget``, exact);
- ``approximate``: E2URec / NegGrad / Bad-Teacher on its one adapter (``privrec unlearn``).

A ``clients`` model also names what its strategy leaves open (``strategy_allows``: ``retrain-client``
when every client adapter saw only its own users (local, mixture), ``retrain-federation`` when its adapters
mixed every client's data (fedavg, fedprox, pplr, and the centralised reference, which pools every client's
data into each adapter). ``privrec forget`` runs
``retrain-client`` (``forget``: the client that held the data retrains alone; a client can leave) and, asked
with ``--retrain-federation``, a full federated retrain without the data for the others (METHODS §10).

:data:`KINDS` is the one registry of kinds: per kind the command that trains it, where its adapters live,
how it scores, which exact route forgets it and why it refuses when it cannot; every consumer asks it (the
config class and the scorer themselves live with the code they need, :mod:`privrec.recommender` and the
forget routes, above this module, keyed by what the registry names).

The manifest is versioned and validated on load; a bad one is refused with one line. A directory written
before manifests existed is read by inferring its manifest from its files (:func:`infer`), or refused with
one line where its files cannot say what it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from privrec.errors import RunError
from privrec.model.adapters import read_meta
from privrec.rundir import (
    ADAPTERS_DIR,
    CLIENT_PREFIX,
    CONFIG_FILE,
    LEGACY_ADAPTER_DIR,
    MANIFEST_FILE,
    SHARD_PREFIX,
    SINGLE_ADAPTER,
    atomic_write_json,
    is_adapter,
    single_adapter_dir,
)

FORMAT = "privrec-model"
VERSION = 1

Kind = Literal["single", "shards", "clients", "student"]
Forgetting = Literal["retrain-shards", "retrain-all", "approximate", "retrain-client", "retrain-federation"]
EXACT: tuple[str, ...] = ("retrain-shards", "retrain-all", "retrain-client", "retrain-federation")


@dataclass(frozen=True)
class KindSpec:
    """What one kind of model is: the command that trains it, its adapter folders, how it scores."""

    trained_by: str  # the command that builds it (what a refusal names)
    prefix: str | None  # its adapters are adapters/{prefix}N; None: one adapter (adapters/default)
    scorer: str  # privrec.recommender's scorer of it (clients: the manifest's ``scoring`` picks)


KINDS: dict[str, KindSpec] = {
    "single": KindSpec("train", None, "one-adapter"),
    "shards": KindSpec("shard-train", SHARD_PREFIX, "shard-aggregation"),
    "clients": KindSpec("federate", CLIENT_PREFIX, "client-of-user"),
    "student": KindSpec("unlearn", None, "one-adapter"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterRecord(_Strict):
    """One adapter of a model: where it is and which samples reached it."""

    name: str = Field(description="default, shard-K or client-C.")
    path: str = Field(description="Its folder, relative to the model directory.")
    sample_ids: list[str] = Field(description="Every sample whose gradient reached it (its lineage).")
    lineage_sha256: str | None = Field(
        description="lineage_of(those samples); None in a directory written before the one lineage hash.")
    tensors_sha256: str | None = Field(description="sha256 of its LoRA tensors (privrec.json's).")


class _Manifest(_Strict):
    format: Literal["privrec-model"] = FORMAT
    version: Literal[1] = VERSION
    command: Literal["train", "shard-train", "federate", "unlearn"]
    task: Literal["like-prediction", "ranking"]
    base_model: str
    base_fingerprint: str | None
    config_digest: str
    adapters: list[AdapterRecord]
    forget: list[Forgetting] = Field(description="What privrec commands can do on it to forget.")
    inferred: bool = Field(False, description="Inferred from the files of a directory written before manifests.")
    data_files: dict[str, dict] | None = Field(
        None, description="The data source's files when it was trained: per file its name, size and sha256 "
        "(privrec.data.digest; `privrec data status` compares the source with it). None in a directory written "
        "before.")

    def adapter(self, name: str) -> AdapterRecord:
        for a in self.adapters:
            if a.name == name:
                return a
        raise RunError(f"the model has no adapter {name!r} (it has {', '.join(a.name for a in self.adapters)})")

    def describe(self) -> str:
        """A few words for messages: ``a shards model (shard-train)``."""
        return f"a {self.kind} model ({KINDS[self.kind].trained_by})"


class SingleManifest(_Manifest):
    kind: Literal["single"] = "single"


class ShardsManifest(_Manifest):
    kind: Literal["shards"] = "shards"
    partition: str
    aggregations: list[Literal["uniform", "apa-d", "apa-nd", "sisa"]]
    primary: Literal["uniform", "apa-d", "apa-nd", "sisa"] = Field(
        description="The aggregation that evaluate and recommend use.")
    slices: int = Field(1, ge=1, description="SISA slices per shard (METHODS §9); 1 = unsliced.")


class ClientsManifest(_Manifest):
    kind: Literal["clients"] = "clients"
    strategy: Literal["local", "fedavg", "fedprox", "pplr", "mixture", "centralised"]
    loss: Literal["bce", "fedabc"]
    scoring: Literal["client-of-user", "mixture"] = Field(
        "client-of-user", description="client-of-user: a user's prompts are scored with the adapter of the client "
        "holding them; mixture: with the APA mixture of every client's adapter, weighted on that client's "
        "validation samples (METHODS §10).")
    split: dict[str, int] | None = Field(None, description="federated.split (client_first, client_last), if any.")
    clients: dict[int, int] = Field(description="user id -> the client that holds the user's data.")
    strategy_allows: list[Forgetting] = Field(description="The exact forgetting the strategy leaves open.")


class StudentManifest(_Manifest):
    kind: Literal["student"] = "student"
    method: str = Field(description="The privrec unlearn method (privrec.unlearning.UNLEARNING_METHODS).")
    exact: bool = Field(description="True only when no forgotten sample ever reached its weights.")
    original: str = Field(description="The model directory it was unlearnt from.")
    forgotten_users: list[int]


Manifest = Annotated[SingleManifest | ShardsManifest | ClientsManifest | StudentManifest,
                     Field(discriminator="kind")]
_ADAPTER = TypeAdapter(Manifest)


# --- records of the adapters on disk ------------------------------------------------------------------------
def record_of(run: Path, folder: Path) -> AdapterRecord:
    """The manifest's record of a saved adapter folder, from its ``privrec.json``."""
    meta = read_meta(folder)
    return AdapterRecord(name=folder.name, path=str(folder.relative_to(run)),
                         sample_ids=list(meta.get("sample_ids") or []), lineage_sha256=meta.get("lineage_sha256"),
                         tensors_sha256=meta.get("tensors_sha256"))


def adapter_folders(run: Path, prefix: str) -> list[Path]:
    """The complete adapter folders ``adapters/{prefix}N`` of a run, by N."""
    base = Path(run) / ADAPTERS_DIR
    found = [p for p in base.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()
             and is_adapter(p)] if base.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(prefix):]))


def folders_of(run: Path, kind: str) -> list[Path]:
    """The adapter folders a model of ``kind`` holds now."""
    prefix = KINDS[kind].prefix
    return adapter_folders(run, prefix) if prefix else [single_adapter_dir(run)]


def single_forgetting(cfg) -> list[str]:
    """What a one-adapter model of this config can do to forget: for like-prediction models retrain-all (their
    counted features, if any, carry their lineage and are recomputed by the retrain) and approximate unlearning
    (which recounts them over its retained set)."""
    if cfg.task != "like-prediction":
        return []
    # features counted from labels (METHODS §12) carry their lineage: retraining recomputes them without the
    # deleted data, and the approximate methods recount them over their retained set
    return ["retrain-all", "approximate"]


def strategy_allows(strategy: str) -> list[str]:
    """The exact forgetting a federated strategy leaves open (which adapters a user's data reached): one client's
    adapter (local, mixture: every client adapter saw only its own users), or every adapter (every other
    strategy, the centralised reference included: it pools every client's data into each adapter)."""
    return ["retrain-client"] if strategy in ("local", "mixture") else ["retrain-federation"]


def clients_forgetting(strategy: str) -> list[str]:
    """What ``privrec forget`` does on a clients model of ``strategy``: retrain the client that held the data,
    or retrain the whole federation without it (asked for with ``--retrain-federation``): what the strategy
    allows (the manifest's ``forget`` and ``strategy_allows`` agree)."""
    return strategy_allows(strategy)


def exact_route(manifest: _Manifest) -> str | None:
    """The exact route ``privrec forget`` takes on this model (its manifest's ``forget``), None: it cannot."""
    return next((w for w in manifest.forget if w in EXACT), None)


def refusal(manifest: _Manifest, shows_labels: bool, task: str, path) -> str:
    """The one line refusing ``forget`` on a model that cannot forget exactly, naming what can (``shows_labels``,
    ``task``: its config's :attr:`~privrec.config.ExperimentConfig.shows_labels` and ``task``)."""
    if manifest.kind == "student":
        return (f"{path} is {manifest.describe()}: forget from the model it was unlearnt from, privrec forget "
                f"{manifest.original} --users ...")
    if manifest.inferred:
        why = "it was written before lineage hashes covered sample content, so nothing it forgets can be certified"
    elif shows_labels:
        why = ("its prompts show other users' labels (prompt.item_stats, prompt.cf_score or collab.inject), so "
               "retraining cannot erase a label")
    else:
        why = f"task {task} models cannot forget exactly yet"
    return (f"{path} is {manifest.describe()} that cannot forget exactly: {why}; train it again with privrec "
            "train (prompt.item_stats=false, task like-prediction), or use privrec shard-train")


# --- writing ------------------------------------------------------------------------------------------------
def _common(cfg, run: Path, kind: str, command: str) -> dict:
    records = [record_of(run, f) for f in folders_of(run, kind)]
    meta = read_meta(run / records[0].path) if records else {}
    return {"command": command, "task": cfg.task, "base_model": cfg.model.name,
            "base_fingerprint": meta.get("base_fingerprint"), "config_digest": cfg.digest(), "adapters": records}


def build(cfg, run: str | Path, kind: str, **fields) -> _Manifest:
    """The manifest of the model in ``run`` as its adapter folders are now, plus the kind's ``fields``."""
    run = Path(run)
    command = fields.pop("command", KINDS[kind].trained_by)
    if "data_files" not in fields:  # the source as it is now, which it was trained on (an inferred one: None)
        from privrec.data.digest import source_record

        fields["data_files"] = source_record(cfg.data.source, cfg.data.path)
    return _ADAPTER.validate_python({"kind": kind, **_common(cfg, run, kind, command), **fields})


def write(run: str | Path, manifest: _Manifest) -> None:
    d = manifest.model_dump(mode="json")
    atomic_write_json(Path(run) / MANIFEST_FILE, {k: d.pop(k) for k in ("format", "version", "kind")} | d)


def refresh(run: str | Path) -> _Manifest:
    """Rewrite the manifest's adapter records from the folders on disk (after forget swapped adapters in)."""
    run = Path(run)
    m = load(run)
    fresh = m.model_copy(update={"adapters": [record_of(run, f) for f in folders_of(run, m.kind)]})
    write(run, fresh)
    return fresh


# --- reading ------------------------------------------------------------------------------------------------
def load(run: str | Path) -> _Manifest:
    """The validated manifest of a model directory; inferred for a directory written before manifests.

    Raises:
        RunError: no such directory, not a model directory, a manifest that does not validate or comes from
            a newer privrec, or an old directory whose files cannot say what it is.
    """
    run = Path(run)
    if not run.is_dir():
        raise RunError(f"model directory not found: {run}")
    path = run / MANIFEST_FILE
    if not path.is_file():
        return infer(run)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RunError(f"{path} is not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise RunError(f"{path} is not a privrec model manifest")
    if raw.get("version") != VERSION:
        raise RunError(f"{path} has manifest version {raw.get('version')!r}; this privrec reads version {VERSION}")
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:] or first["loc"])
        raise RunError(f"{path}: invalid manifest ({where}: {first['msg']})") from None


def infer(run: Path) -> _Manifest:
    """The manifest of a directory written before manifests existed, from its files.

    - ``adapter/`` + a ``config.yaml`` (``privrec train`` or, with an ``unlearn`` section, ``privrec
      unlearn``): single or student; its lineage hash covered ids only, so it is left out (None) and the model
      cannot forget until it is trained again.
    - ``adapters/shard-K`` + a ``shards`` section: shards (their lineage hash always covered content).
    - ``adapters/client-C``: refused (the user -> client assignment was not kept).

    Raises:
        RunError: not a model directory, or one that cannot be read this way.
    """
    cfg_path = run / CONFIG_FILE
    if not cfg_path.is_file():
        raise RunError(f"{run} has no {CONFIG_FILE}: not a privrec model directory")
    raw = yaml.safe_load(cfg_path.read_text()) or {}
    if adapter_folders(run, CLIENT_PREFIX):
        raise RunError(f"{run} is a federate run written before model manifests (it did not keep which client "
                       "holds which user); run privrec federate again")
    if adapter_folders(run, SHARD_PREFIX) and "shards" in raw:
        from privrec.config import parse_config

        sh = raw["shards"] or {}
        cfg = _loose_config(raw, parse_config)
        return build(cfg, run, "shards", partition=sh.get("partition", "semantic"),
                     aggregations=sh.get("aggregations", ["uniform", "apa-d", "apa-nd", "sisa"]),
                     primary=sh.get("primary", "apa-nd"), forget=["retrain-shards"], inferred=True,
                     data_files=None)
    if is_adapter(run / LEGACY_ADAPTER_DIR):
        from privrec.config import parse_config

        cfg = _loose_config(raw, parse_config)
        m = build(cfg, run, "student" if "unlearn" in raw else "single", forget=[], inferred=True, data_files=None,
                  **(_legacy_student(run, raw) if "unlearn" in raw else {}))
        legacy = [a.model_copy(update={"lineage_sha256": None}) for a in m.adapters]  # an ids-only hash
        return m.model_copy(update={"adapters": legacy})
    if is_adapter(run / ADAPTERS_DIR / SINGLE_ADAPTER):
        raise RunError(f"{run} has an adapter but no {MANIFEST_FILE}: training did not finish; run it again")
    raise RunError(f"{run} holds no trained model ({MANIFEST_FILE} missing): did training finish?")


def _loose_config(raw: dict, parse_config):
    """The experiment part of an old config (the sections every kind shares), validated."""
    from privrec.config import ExperimentConfig

    keep = {k: v for k, v in raw.items() if k in ExperimentConfig.model_fields}
    return parse_config(keep, ExperimentConfig)


def _legacy_student(run: Path, raw: dict) -> dict:
    meta = read_meta(run / LEGACY_ADAPTER_DIR)
    return {"method": meta.get("method") or (raw.get("unlearn") or {}).get("method", "e2urec"),
            "exact": bool(meta.get("exact")), "original": str(meta.get("original_run", "")),
            "forgotten_users": list(meta.get("forgotten_users") or [])}
