"""Client-local data (METHODS §2; docs/federated.md): one folder per client, what a Flower SuperNode reads.

``privrec federate-split-data CONFIG --out DIR`` cuts the federation ``privrec federate`` runs with CONFIG (the
same samples and the same partition: :func:`privrec.federated.runner.plan_federation`) into

- ``DIR/client-{c}/``: the files of the config's ``data.source`` (the folder is a ``data.path`` that source
  reads; a ``table`` source's clients get the table format, ``schema.yaml`` and three TSV files) holding only
  client c's rows: its users' interactions and user records, and the whole item catalogue
  (prompts name the items; ranking negatives are drawn from it); and ``privrec-client.json``: the client id,
  the fingerprint of the settings that decide the samples (:func:`samples_fingerprint`) and the protocol's
  cut of the client's samples: their ids per split, in the run's order. The cut is decided when the data is
  split because it is not the client's own: TALLRec's time cut and the seeded draws (``data.n_train``, ...)
  order every user's samples together;
- ``DIR/assignment.json``: which user is on which client, for the operator; it is never given to a node.

A node builds its samples from its folder alone (:func:`load_client_data`): the windows of its own users'
interactions (a window only reads its user's ratings), picked by the ids in ``privrec-client.json``. They are
exactly the samples the embedded run gives that client: :func:`split_data` rebuilds every folder's samples
and compares them before it publishes ``DIR``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from privrec.data import Dataset, Sample, load_dataset, windows
from privrec.data.export import write_table
from privrec.data.movielens import SOURCE_FILES
from privrec.data.ranking import RankingSplits, build_ranking_splits, like_splits
from privrec.errors import DataError, RunError, UserError
from privrec.federated.config import FederatedConfig
from privrec.rundir import atomic_write_text, written_folder

META = "privrec-client.json"
ASSIGNMENT = "assignment.json"
CLIENT_DIR = "client-{}"
FORMAT = 1
PARTS = ("train", "valid", "test")
POOL = "pool"  # with counted features: the samples the client's features count (its users' training windows)
# the federated settings that decide which user is on which client
PARTITION_FIELDS = ("clients", "partition", "attribute", "mf_dim", "mf_epochs")


def samples_fingerprint(cfg: FederatedConfig) -> str:
    """Hash of every setting that decides a client's samples: ``data`` (but its ``path``), ``seed``, ``task``,
    ``ranking`` and the partition's settings. A folder split with another fingerprint holds other samples."""
    d = json.loads(cfg.model_dump_json())
    keep = {"data": {k: v for k, v in d["data"].items() if k != "path"}, "seed": d["seed"], "task": d["task"],
            "ranking": d["ranking"], "federated": {k: d["federated"][k] for k in PARTITION_FIELDS}}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def sample_ids(fed, c: int) -> dict[str, list[str]]:
    """The ids ``privrec-client.json`` lists for client ``c`` of a :class:`~privrec.federated.runner.Federation`:
    its samples per split in the run's order (with ``task: ranking``, its rankings, which the node expands into
    the like-samples)."""
    rs = fed.splits.ranking
    if fed.cfg.task == "ranking":
        return {k: [r.sample_id for r in rs.get(k) if fed.assignment[r.user_id] == c] for k in PARTS}
    ids = {k: [s.sample_id for s in part] for k, part in zip(PARTS, fed.samples(c))}
    if fed.cfg.shows_labels:  # what its counted features count (METHODS §12): its users' share of the pool
        ids[POOL] = [s.sample_id for s in fed.counted(c)]
    return ids


def ids_sha256(ids: dict[str, list[str]]) -> str:
    """Hash of a client's sample ids (what a node reports in its query reply and the server checks)."""
    return hashlib.sha256(json.dumps({k: ids[k] for k in (*PARTS, POOL) if k in ids}).encode()).hexdigest()


@dataclass
class ClientData:
    """What a node holds: its client id, its users' dataset and its samples."""

    client: int
    dataset: Dataset
    train: list[Sample]
    valid: list[Sample]
    test: list[Sample]
    fingerprint: str  # samples_fingerprint of the config the folder was split with
    pool: list[Sample] | None = None  # what its counted features count (a config whose prompts read them)


def read_meta(folder: str | Path) -> dict:
    """``privrec-client.json`` of a client folder.

    Raises:
        DataError: no such folder, or not a folder written by ``privrec federate-split-data``.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"client data folder not found: {folder}")
    path = folder / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{folder}: no {META}; not a client folder of privrec federate-split-data") from None
    except ValueError:
        raise DataError(f"{path}: not JSON") from None
    samples = meta.get("samples") if isinstance(meta, dict) else None
    if (not isinstance(samples, dict) or not all(isinstance(samples.get(k), list) for k in PARTS)
            or not isinstance(meta.get("client"), int) or not isinstance(meta.get("fingerprint"), str)):
        raise DataError(f"{path}: malformed (needs client, fingerprint and samples' {', '.join(PARTS)})")
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def _other_config(where: str | Path) -> DataError:
    return DataError(f"{where} was split for another config (its data, seed, task, ranking or partition settings "
                     "differ): write the folders with privrec federate-split-data and this config")


def load_client_data(folder: str | Path, cfg: FederatedConfig) -> ClientData:
    """The samples of the client whose folder this is, built from the folder alone (see the module docstring).

    Raises:
        DataError: a missing or malformed folder, one split for another config, or one that lacks a sample.
    """
    folder = Path(folder).expanduser()
    meta = read_meta(folder)
    if meta["fingerprint"] != samples_fingerprint(cfg):
        raise _other_config(folder)
    ds = load_dataset(cfg.data.source, str(folder))
    ids = meta["samples"]
    if cfg.task == "ranking":  # the node's own rankings: every user's train and test ranking, picked by id
        data = cfg.data.model_copy(update={"n_train": None, "n_valid": None, "n_test": None})
        try:
            rs = build_ranking_splits(ds, data, cfg.ranking.n_candidates, cfg.ranking.candidate_seed, cfg.seed)
        except ValueError as e:
            raise DataError(f"{folder}: {e}") from None
        universe: dict = {r.sample_id: r for r in rs.train + rs.test}
    else:
        d = cfg.data
        universe = {s.sample_id: s for seq in windows(ds, d.history_len, d.like_threshold, d.history_gap)
                    for s in seq}
    missing = [i for k in PARTS for i in ids[k] if i not in universe]
    if missing:
        raise DataError(f"{folder}: its interactions give no sample {missing[0]} ({len(missing)} missing)")
    parts = [[universe[i] for i in ids[k]] for k in PARTS]
    if cfg.task == "ranking":
        parts = list(like_splits(RankingSplits(ds, *parts, popularity={}), cfg.ranking.negatives))
    pool = None
    if cfg.shows_labels:
        if not isinstance(ids.get(POOL), list):
            raise DataError(f"{folder} was split for prompts without counted features (no {POOL} ids): write the "
                            "folders with privrec federate-split-data and this config")
        missing = [i for i in ids[POOL] if i not in universe]
        if missing:
            raise DataError(f"{folder}: its interactions give no sample {missing[0]} ({len(missing)} missing)")
        pool = [universe[i] for i in ids[POOL]]
    return ClientData(int(meta["client"]), ds, *parts, meta["fingerprint"], pool)


def source_folder(cfg: FederatedConfig) -> Path:
    """The folder the config's data is read from (the embedded copy when ``data.path`` is None)."""
    if cfg.data.path is None:
        from privrec.assets import fetch_movielens

        return fetch_movielens()
    return Path(cfg.data.path).expanduser()


def _rows_by_user(path: Path, sep: bytes, header: int) -> tuple[list[bytes], dict[int, list[bytes]]]:
    """(header lines, user id -> that user's lines in file order) of one table; blank lines dropped."""
    if not path.is_file():
        raise DataError(f"{path.parent}: missing {path.name}")
    lines = path.read_bytes().splitlines(keepends=True)
    rows: dict[int, list[bytes]] = {}
    for n, line in enumerate(lines[header:], header + 1):
        if not line.strip():
            continue
        try:
            user = int(line.split(sep, 1)[0])
        except ValueError:
            raise DataError(f"{path}:{n}: malformed row") from None
        rows.setdefault(user, []).append(line if line.endswith(b"\n") else line + b"\n")
    return lines[:header], rows


def split_data(cfg: FederatedConfig, out: str | Path) -> dict:
    """Write one folder per client and the operator's assignment file under ``out`` (module docstring);
    returns the assignment file's content. ``out`` appears whole or not at all.

    Raises:
        UserError: ``out`` exists and is not empty; bad data or config (as ``privrec federate``).
    """
    from privrec.federated.runner import plan_federation

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; give --out a new folder")
    fed = plan_federation(cfg)
    table = cfg.data.source == "table"
    if table:  # a table source's clients get the table format: schema.yaml + their rows (privrec.data.export)
        ds = load_dataset("table", cfg.data.path)
    else:
        src = source_folder(cfg)
        (inter_f, inter_sep, inter_h), (user_f, user_sep, user_h), (item_f, _, _) = SOURCE_FILES[cfg.data.source]
        inter_head, inter_rows = _rows_by_user(src / inter_f, inter_sep.encode(), inter_h)
        user_head, user_rows = _rows_by_user(src / user_f, user_sep.encode(), user_h)
        if not (src / item_f).is_file():
            raise DataError(f"{src}: missing {item_f}")
    fingerprint = samples_fingerprint(cfg)
    with written_folder(out) as tmp:
        shas = {}
        for c in fed.clients:
            users = sorted(u for u, cc in fed.assignment.items() if cc == c)
            folder = tmp / CLIENT_DIR.format(c)
            if table:
                mine = set(users)
                write_table(Dataset(ds.name, ds.inter[ds.inter["user_id"].isin(mine)], ds.items,
                                    {u: r for u, r in ds.users.items() if u in mine}, ds.schema), folder)
            else:
                folder.mkdir()
                (folder / inter_f).write_bytes(b"".join(inter_head + [r for u in users
                                                                      for r in inter_rows.get(u, [])]))
                (folder / user_f).write_bytes(b"".join(user_head + [r for u in users for r in user_rows.get(u, [])]))
                shutil.copyfile(src / item_f, folder / item_f)
            tr, va, te = fed.samples(c)
            ids = sample_ids(fed, c)
            meta = {"format": FORMAT, "client": c, "clients": len(fed.clients), "source": cfg.data.source,
                    "task": cfg.task, "fingerprint": fingerprint, "samples": ids}
            atomic_write_text(folder / META, json.dumps(meta, indent=1) + "\n")
            local = load_client_data(folder, cfg)
            if (local.client, local.train, local.valid, local.test) != (c, tr, va, te):  # a bug, never input
                raise RunError(f"client {c}: the samples rebuilt from its folder differ from the run's")
            shas[str(c)] = ids_sha256(ids)
        content = {"format": FORMAT, "fingerprint": fingerprint, "clients": len(fed.clients),
                   "partition": cfg.federated.partition, "source": cfg.data.source,
                   "folders": {str(c): CLIENT_DIR.format(c) for c in fed.clients}, "samples_sha256": shas,
                   "assignment": {str(u): c for u, c in sorted(fed.assignment.items())}}
        atomic_write_text(tmp / ASSIGNMENT, json.dumps(content, indent=1) + "\n")
        atomic_write_text(tmp / "config.yaml", cfg.to_yaml())
    return content


def client_folders(root: str | Path, cfg: FederatedConfig) -> dict[int, Path]:
    """client id -> folder of a ``federate-split-data`` output written with this config.

    Raises:
        DataError: a missing folder, no assignment file, a folder split for another config or client count.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"client data folder not found: {root}")
    try:
        content = json.loads((root / ASSIGNMENT).read_text())
        fingerprint, folders = content["fingerprint"], content["folders"]
    except FileNotFoundError:
        raise DataError(f"{root}: no {ASSIGNMENT}; not a folder written by privrec federate-split-data") from None
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{root / ASSIGNMENT}: malformed") from None
    if fingerprint != samples_fingerprint(cfg):
        raise _other_config(root)
    out = {int(c): root / f for c, f in folders.items()}
    if sorted(out) != list(range(cfg.federated.clients)):
        raise DataError(f"{root}: folders for clients {sorted(out)}; federated.clients={cfg.federated.clients}")
    for c, folder in out.items():
        meta = read_meta(folder)
        if meta["fingerprint"] != fingerprint:
            raise _other_config(folder)
        if meta["client"] != c:
            raise DataError(f"{folder} holds client {meta['client']}'s data, not client {c}'s")
    return out
