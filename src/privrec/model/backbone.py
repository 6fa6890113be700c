"""Backbone loading: the embedded SmolLM2, the tiny test model, a local HF folder, a GGUF file or a hub id."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

import torch

from privrec.errors import ModelError


def resolve_model_path(name: str) -> str:
    """Map a config's ``model.name`` to something ``from_pretrained`` accepts."""
    from privrec import assets

    if name == assets.DEFAULT_MODEL:
        return str(assets.fetch_smollm2())
    if name == assets.TINY_MODEL:
        return str(assets.tiny_random_model())
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model.name {name!r} is a file; give the folder (and model.gguf_file for GGUF)")
        return str(p)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model folder not found: {name}")
    return name  # a hub id; from_pretrained reports if it is unknown or unreachable


CPU_BF16_ENV = "PRIVREC_CPU_BF16"


def supports_bf16(device: torch.device) -> bool:
    """Native bf16 matmuls: a CUDA device that has them, or a CPU with AVX512-BF16 or AMX tiles.

    ``PRIVREC_CPU_BF16=1`` or ``0`` overrides the CPU detection (a virtual machine that hides the flags; the
    test suite's ``--cpu-bf16``, which must reach the processes a test starts)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    forced = os.environ.get(CPU_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``model.precision`` runs bf16 autocast on ``device``: ``auto`` exactly where
    :func:`supports_bf16` says the hardware has it; ``bf16`` anywhere (emulated, slower, on CPUs without
    it); ``fp32`` never."""
    if precision == "auto":
        return supports_bf16(device)
    return precision == "bf16"


def load_backbone(name: str, gguf_file: str | None = None, device: torch.device | None = None):
    """Return (model, tokenizer) in fp32, in eval mode, with a pad token.

    Raises:
        ModelError: unknown hub id, missing folder, unreadable weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model, "hf_quantizer", None) is not None:  # dequantised GGUF: drop the leftover quantizer
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.config.use_cache = False
    model.eval()
    if device is not None:
        model.to(device)
    model.name_or_path = path
    return model, tok


def fingerprint(model: torch.nn.Module) -> str:
    """Content hash of the frozen base weights (names, shapes, bytes): keys caches and adapter metadata."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
