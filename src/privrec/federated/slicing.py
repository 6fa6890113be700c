"""SISA slices inside a client (METHODS §9, §10): ``federated.slices: R`` for ``local`` and ``mixture``.

A client's training samples are cut into R ordered slices of whole users, oldest users first, with the same
cut the sliced shards use (:func:`privrec.unlearning.exact.slices.slice_map`), so a user sits in one slice and
the newest users, the likeliest to leave, in the last ones. The run's rounds are the stages: round t (from 0)
trains on slices 1..``slices_seen(t)`` = ceil((t + 1) R / rounds), so slice s + 1 enters at round
``first_round(s + 1)`` and the state just before it (the state after round ``first_round(s + 1) - 1``) is the
checkpoint ``stage-s``, whose lineage is slices 1..s. A federated round already starts a fresh AdamW with its
own schedule and seed (``federated.config``), so a checkpoint is the adapter alone (its ``optimizer.pt``
holds None) and the state after round t is a function of slices 1..slices_seen(t), the seeds and the config:
replaying rounds ``first_round(j)``.. from checkpoint ``stage-(j-1)`` without a deleted user of slice j gives
bit for bit what sliced training from scratch on the remaining samples (same slice map) gives.

With counted features (METHODS §12: ``prompt.item_stats``, ``prompt.cf_score``), round t's training prompts show
features counted over the client's data of the users of slices 1..slices_seen(t) (:func:`stage_pool`); the
rounds of the last stage, and scoring, show the client's whole data (users of its labelled pool with no training
sample too: they sit in no slice, so only the last stage counts them). A checkpoint records what its features
were counted over; a deletion reaches the first stage that counted or trained on the deleted data
(:meth:`privrec.federated.forget.RetrainClient.first_stage`) and every later one.

Checkpoints live at ``MODEL/slices/client-C/stage-S`` (``checkpoint_set(MODEL, C, CLIENT_PREFIX)``), recorded
in the client adapter's ``privrec.json`` (``slicing``, ``slices``, ``checkpoints``) and checked by ``forget
--verify`` like the sliced shards'.
"""

from __future__ import annotations

from pathlib import Path

from privrec.data import Sample
from privrec.rundir import CLIENT_PREFIX
from privrec.unlearning.exact.slices import (
    StageState,
    checkpoint_records,
    checkpoint_set,
    cumulative,
    save_checkpoint,
    slice_map,
    stage_dir,
    stage_meta,
)

CHECKPOINT_KIND = "client-checkpoint"


def slices_seen(rnd: int, r: int, rounds: int) -> int:
    """How many slices round ``rnd`` (from 0) trains on: ceil((rnd + 1) r / rounds)."""
    return -(-(rnd + 1) * r // rounds)


def first_round(s: int, r: int, rounds: int) -> int:
    """The first round (from 0) that trains on slice ``s`` (from 1)."""
    return next(t for t in range(rounds) if slices_seen(t, r, rounds) >= s)


def checkpoint_after(rnd: int, r: int, rounds: int) -> int | None:
    """The checkpoint stage the state after round ``rnd`` is (the last round before a new slice enters), or
    None. With r <= rounds a round adds at most one slice, so stages 1..r-1 each come once."""
    if rnd + 1 >= rounds:
        return None
    s = slices_seen(rnd, r, rounds)
    return s if slices_seen(rnd + 1, r, rounds) > s else None


def client_slices(samples: list[Sample], r: int) -> list[list[str]] | None:
    """A client's slice map (None unsliced)."""
    return slice_map(samples, r) if r > 1 else None


def in_slices(samples: list[Sample], slices: list[list[str]], s: int) -> list[Sample]:
    """The samples of slices 1..s, in ``samples``' order."""
    keep = set(cumulative(slices, s))
    return [x for x in samples if x.sample_id in keep]


def stage_pool(counted: list[Sample], samples: list[Sample], slices: list[list[str]], s: int) -> list[Sample]:
    """What stage ``s``'s counted features are counted over (METHODS §9, §12): the samples of ``counted`` (the
    client's :func:`~privrec.federated.client.client_pool`) whose user has a training sample (of ``samples``) in
    slices 1..s; for the last stage, all of ``counted``."""
    if s >= len(slices):
        return counted
    ids = set(cumulative(slices, s))
    users = {x.user_id for x in samples if x.sample_id in ids}
    return [x for x in counted if x.user_id in users]


def checkpoint_features(cfg, client: int, counted: list[Sample], s: int) -> dict | None:
    """A client checkpoint's ``features`` record (None when its prompts read none): as the client adapter's
    (:func:`~privrec.federated.client.features_record`), counted over stage ``s``'s :func:`stage_pool`."""
    from privrec.federated.client import features_record

    rec = features_record(cfg, {client: counted})
    return None if rec is None else dict(rec, counted_over=f"the client's data of the users of slices 1..{s}")


def slicing_record(cfg) -> dict | None:
    f = cfg.federated
    return {"r": f.slices, "rounds": f.rounds} if f.slices > 1 else None


def save_client_checkpoint(model, root: Path, client: int, s: int, samples: list[Sample], base_meta: dict,
                           features: dict | None = None) -> None:
    """Checkpoint ``stage-s`` of ``client`` under ``root`` (a model or a request's staging folder) from the
    adapter the model holds; ``samples``: slices 1..s (its lineage); ``features``: its own features record
    (:func:`checkpoint_features`), never the whole client's."""
    from privrec.model.adapters import adapter_state

    folder = stage_dir(checkpoint_set(root, client, CLIENT_PREFIX), s)
    folder.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, folder, StageState(adapter_state(model.model), None),
                    stage_meta(base_meta, s, samples, kind=CHECKPOINT_KIND, features=features))


def sliced_fields(cfg, client: int, slices: list[list[str]], root: Path) -> dict:
    """What a sliced client adapter's ``privrec.json`` adds: its slicing, slice map and checkpoint records."""
    return {"slicing": slicing_record(cfg), "slices": slices,
            "checkpoints": checkpoint_records(checkpoint_set(root, client, CLIENT_PREFIX), cfg.federated.slices)}
