"""Backbone loading: the embedded SmolLM2, the tiny test model, a local HF folder, a GGUF file or a hub id.

:func:`load_backbone` with ``keep`` builds a model of which only the parameters ``keep`` names are
materialised (the federated split's two sides, METHODS §2 flexible storage): the architecture is built on the
meta device (accelerate's ``init_empty_weights``), then each kept tensor is read on its own from the
checkpoint's safetensors files (``safe_open(...).get_tensor(name)``); the others stay meta tensors (shape and
dtype only, no storage). :func:`checkpoint_fingerprint` gives such a model the whole model's
:func:`fingerprint` by reading the checkpoint one tensor at a time, once per checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable
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


def layer_count(name: str, gguf_file: str | None = None) -> int:
    """The number of decoder layers of ``model.name``, from its config alone (no weights read).

    Raises:
        ModelError: the config cannot be read.
    """
    from transformers import AutoConfig

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with _quiet_hf():
            return int(AutoConfig.from_pretrained(resolve_model_path(name), **kwargs).num_hidden_layers)
    except (OSError, ValueError, KeyError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from None


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


@contextlib.contextmanager
def _quiet_hf():
    """Transformers' loading chatter (progress bars, GGUF notes) silenced for the block."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def checkpoint_files(path: str) -> dict[str, Path] | None:
    """Tensor name -> the safetensors file holding it, for a local folder with ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``; None for anything else (a GGUF file, a hub id, .bin weights)."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def _tensor_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Every parameter name -> all the names of that parameter (tied weights: the LM head and the embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def _checkpoint_name(name: str, groups: dict[str, list[str]], files: dict[str, Path]) -> str | None:
    """The checkpoint's name for model tensor ``name`` (itself, or a tied alias the checkpoint stores)."""
    return next((n for n in groups.get(name, [name]) if n in files), None)


def _load_weights(name: str, path: str, gguf_file: str | None, device: torch.device | None,
                  keep: Callable[[str], bool] | None) -> torch.nn.Module:
    """The causal LM in fp32; with ``keep``, only the parameters it names are materialised (see the module
    docstring), read one by one from the checkpoint's safetensors files. A source without safetensors files
    (a GGUF file, a hub id) is loaded whole, hashed (:func:`checkpoint_fingerprint` returns that hash) and the
    other parameters are then replaced by meta tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    files = None if (keep is None or gguf_file) else checkpoint_files(path)
    if files is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
        if keep is not None:
            model.whole_fingerprint = fingerprint(model)  # what checkpoint_fingerprint cannot read from a GGUF
            _keep_only(model, keep, device or torch.device("cpu"))
        return model
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    with init_empty_weights():  # parameters on the meta device, buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.tie_weights()  # the head shares the embeddings' parameter, so it is read (or kept meta) once
    groups = _tensor_groups(model)
    wanted = [n for n, _ in model.named_parameters() if keep(n)]
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for n in wanted:
        ck = _checkpoint_name(n, groups, files)
        if ck is None:
            raise ModelError(f"cannot load model {name!r}: its checkpoint has no tensor {n!r}")
        by_file.setdefault(files[ck], []).append((n, ck))
    target = device or torch.device("cpu")
    for file, pairs in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for n, ck in pairs:
                set_module_tensor_to_device(model, n, target, value=f.get_tensor(ck), dtype=torch.float32)
    for n, _ in list(model.named_buffers()):  # the rotary frequencies, computed at construction
        set_module_tensor_to_device(model, n, target)
    model.tie_weights()  # re-point the head at the embeddings just read
    return model


def _keep_only(model: torch.nn.Module, keep: Callable[[str], bool], device: torch.device) -> None:
    """A whole model cut to what ``keep`` names, on ``device``: every other parameter becomes a meta tensor."""
    from accelerate.utils import set_module_tensor_to_device

    for n, _ in list(model.named_parameters()):
        set_module_tensor_to_device(model, n, device if keep(n) else "meta")
    for n, _ in list(model.named_buffers()):
        set_module_tensor_to_device(model, n, device)
    model.tie_weights()


def load_backbone(name: str, gguf_file: str | None = None, device: torch.device | None = None,
                  keep: Callable[[str], bool] | None = None, tokenizer: bool = True):
    """Return (model, tokenizer) in fp32, in eval mode, with a pad token (tokenizer None with
    ``tokenizer=False``).

    ``keep``: parameter name -> whether to materialise it; the others are left on the meta device and their
    tensors are never read from a safetensors checkpoint (the federated split's client and server).

    Raises:
        ModelError: unknown hub id, missing folder, unreadable weights.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = None
    try:
        with _quiet_hf():
            if tokenizer:
                tok = AutoTokenizer.from_pretrained(path, **kwargs)
            model = _load_weights(name, path, gguf_file, device, keep)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from None
    if getattr(model, "hf_quantizer", None) is not None:  # dequantised GGUF: drop the leftover quantizer
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tok is not None:
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
    model.config.use_cache = False
    model.eval()
    if device is not None and keep is None:
        model.to(device)
    model.name_or_path = path
    return model, tok


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    h.update(name.encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def fingerprint(model: torch.nn.Module) -> str:
    """Content hash of the frozen base weights (names, shapes, bytes): keys caches and adapter metadata."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        _hash_tensor(h, name, t)
    return h.hexdigest()


def checkpoint_fingerprint(model: torch.nn.Module) -> str:
    """:func:`fingerprint` of the whole model for a model loaded with ``keep`` (some tensors left meta), read
    from its checkpoint one tensor at a time, each released before the next: the fingerprint of the published
    base weights, which a deployment would ship beside them. Memoised under ``<cache>/fingerprints`` per
    checkpoint (files, sizes, modification times) and tensor names, so a client reads the other side's
    tensors at most once per checkpoint, never to keep them. Call it before LoRA is attached.

    Raises:
        ModelError: the checkpoint is not local safetensors, or lacks a tensor the model has.
    """
    from safetensors import safe_open

    from privrec import assets

    if getattr(model, "whole_fingerprint", None):  # hashed before the cut (a source without safetensors)
        return model.whole_fingerprint
    path = str(getattr(model, "name_or_path", ""))
    files = checkpoint_files(path)
    names = sorted(k for k in model.state_dict() if "lora_" not in k)
    if files is None:
        raise ModelError(f"{path or 'this model'}: the fingerprint of a partly loaded model is read from its "
                         "safetensors checkpoint, and there is none")
    key = hashlib.blake2b(digest_size=16)
    for f in sorted(set(files.values())):
        st = f.stat()
        key.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key.update("\n".join(names).encode())
    memo = assets.cache_dir() / "fingerprints" / key.hexdigest()
    if memo.is_file():
        return memo.read_text().strip()
    groups = _tensor_groups(model)
    own = model.state_dict()
    h = hashlib.blake2b(digest_size=16)
    handles: dict[Path, object] = {}
    with contextlib.ExitStack() as stack:
        for name in names:
            ck = _checkpoint_name(name, groups, files)
            if ck is not None:
                f = files[ck]
                if f not in handles:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                t = handles[f].get_tensor(ck).to(torch.float32)
            elif own[name].device.type != "meta":  # a persistent buffer the model computes itself
                t = own[name]
            else:
                raise ModelError(f"{path}: the checkpoint has no tensor {name!r}")
            _hash_tensor(h, name, t)
            del t
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(digest + "\n")
    os.replace(tmp, memo)
    return digest


def default_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
