"""Adapters are data: LoRA tensors plus metadata, saved as peft-compatible safetensors folders.

A saved adapter folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (what
``PeftModel.from_pretrained(base, folder)`` reads) and ``privrec.json``: the base-model fingerprint, the
ids of the samples that trained it (its lineage) and a hash of their content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from privrec.errors import RunError

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


def lineage_digest(sample_ids: list[str], contents: list[str] | None = None) -> str:
    """sha256 over the sorted sample ids (and their rendered content when given)."""
    h = hashlib.sha256()
    pairs = sorted(zip(sample_ids, contents or [""] * len(sample_ids)))
    for sid, content in pairs:
        h.update(sid.encode())
        h.update(b"\0")
        h.update(content.encode())
        h.update(b"\n")
    return h.hexdigest()


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
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA tensors as saved by peft, privrec metadata) of an adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state = load_file(folder / "adapter_model.safetensors")
    meta_path = folder / ADAPTER_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return state, meta


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
