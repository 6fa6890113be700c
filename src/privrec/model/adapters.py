"""Adapters are data: LoRA tensors plus metadata, saved as peft-compatible safetensors folders.

A saved adapter folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (what
``PeftModel.from_pretrained(base, folder)`` reads) and ``privrec.json``: the base-model fingerprint, the
ids of the samples that trained it (its lineage) and a hash of their content.

The lineage hash has ONE definition for the whole project (:func:`lineage_of`, METHODS §7): sha256 over
the sorted (sample id, content) pairs of the original samples that reached the adapter, where the content is
everything a sample contributes to training (user, item, timestamp, rating, label, history). Augmented
copies are derived from their originals and the run's seed, so the originals stand for them. The hash is
recomputable from the data source at any time, so a lineage that was edited, or data that changed under it,
shows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from privrec.data import Sample
from privrec.errors import RunError
from privrec.rundir import swap_in

ADAPTER_META = "privrec.json"


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a peft model, as a plain name -> tensor dict (copies, on CPU)."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: LoRA never trains the embeddings, and peft's "auto" looks for the base
    # model's config.json to decide, warning "Could not find a config file" in a GGUF folder, which has none
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter tensors do not fit the model: {unexpected[:3]}")


def sample_content(s: Sample) -> str:
    """What a sample contributes to training, canonically: the content its lineage hash covers."""
    return json.dumps([s.user_id, s.item_id, s.timestamp, s.rating, s.label, [list(h) for h in s.history]])


def lineage_of(samples: Sequence[Sample]) -> str:
    """THE lineage hash: sha256 over the samples' sorted (id, content) pairs (order-independent).

    Pass the original samples (``sample_id == source_id``); augmented copies are derived from them."""
    h = hashlib.sha256()
    for sid, content in sorted((s.sample_id, sample_content(s)) for s in samples):
        h.update(sid.encode())
        h.update(b"\0")
        h.update(content.encode())
        h.update(b"\n")
    return h.hexdigest()


def originals(samples: Sequence[Sample]) -> list[Sample]:
    """The original samples among ``samples`` (augmented copies dropped), order kept."""
    return [s for s in samples if s.sample_id == s.source_id]


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_adapter(model, folder: Path, meta: dict) -> None:
    """Write a peft adapter folder plus ``privrec.json``, atomically (temp folder, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, save_embedding_layers=False)  # as in adapter_state
        meta = dict(meta, tensors_sha256=tensors_digest(adapter_state(model)))
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=1))
        swap_in(tmp, folder)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial new adapter (it holds nothing the old one did not)
        raise


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA tensors as saved by peft, privrec metadata) of an adapter folder."""
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors"), read_meta(folder)


def read_meta(folder: Path) -> dict:
    """The privrec metadata (``privrec.json``) of an adapter folder ({} when it has none)."""
    path = Path(folder) / ADAPTER_META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunError(f"{path} is not valid JSON: the adapter's metadata is corrupt; train it again") from None
    if not isinstance(meta, dict):
        raise RunError(f"{path} is not an adapter's metadata; train it again")
    return meta


def install_adapter(model, folder: Path, state: dict[str, torch.Tensor], meta: dict, base_name: str) -> None:
    """Load a saved adapter (``read_adapter(folder)``) into a RecLM that has LoRA attached, after checking
    that it was trained on the same base weights.

    Raises:
        RunError: the adapter's base fingerprint differs, or its tensors do not fit the model.
    """
    if meta.get("base_fingerprint") not in (None, model.fingerprint):
        raise RunError(f"{folder} was trained on different base weights than {base_name}")
    try:
        load_adapter_state(model.model, state)
    except ValueError as e:
        raise RunError(f"{folder}: {e}") from None
