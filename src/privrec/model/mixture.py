"""Per-sample mixtures of K LoRA adapters inside ONE batched forward pass (METHODS §4, APA inference).

Every sample ``b`` of a batch carries its own weights ``omega[b]`` (K,) over K adapter state dicts. For each
LoRA-wrapped linear layer ``W0`` with adapters ``(A_k, B_k)`` (A_k: (r, in), B_k: (out, r)) and scaling s:

- ``mode="d"``  (APA(D), mix the factors):   y_b = W0 x_b + s * (sum_k w_bk B_k) (sum_k w_bk A_k) x_b
- ``mode="nd"`` (APA(ND), mix the outputs):  y_b = W0 x_b + s * sum_k w_bk B_k A_k x_b

Both are computed for the whole batch with einsum (per-sample A and B for D; a rank-K*r product scaled per
sample for ND), never by merging weights one sample at a time. Uniform weights (1/K each) in ND form give
the mean of the adapters' low-rank updates.

The mixture is a context manager around a :class:`~privrec.model.recmodel.RecLM`: inside it, the model's
own adapter is switched off, every LoRA layer adds the mixed update through a forward hook, and the weights
of each batch are looked up through ``RecLM.batch_hooks`` just before its forward. The one scorer
(``RecLM.score``) then scores mixtures exactly as it scores a single adapter. Inference only (eval mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from privrec.errors import AggregationError
from privrec.model.recmodel import Batch, Encoded, RecLM

Mode = Literal["d", "nd"]


def mixed_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, omega: torch.Tensor, mode: Mode, scaling: float
) -> torch.Tensor:
    """The mixed LoRA update for a batch: (Bsz, T, in) -> (Bsz, T, out). Pure tensor maths.

    Args:
        x: (Bsz, T, in) layer input.
        A: (K, r, in) stacked ``lora_A`` weights; B: (K, out, r) stacked ``lora_B`` weights.
        omega: (Bsz, K) per-sample adapter weights.
        mode: ``"d"`` mixes A and B then applies B_b A_b; ``"nd"`` mixes the K products B_k A_k x.
    """
    assert A.dim() == 3 and B.dim() == 3 and A.shape[0] == B.shape[0], "A: (K, r, in), B: (K, out, r)"
    assert omega.shape == (x.shape[0], A.shape[0]), f"omega {tuple(omega.shape)} != (batch, K)"
    omega = omega.to(x.dtype)
    A, B = A.to(x.dtype), B.to(x.dtype)
    if mode == "d":
        A_b = torch.einsum("bk,kri->bri", omega, A)  # (Bsz, r, in)
        B_b = torch.einsum("bk,kor->bor", omega, B)  # (Bsz, out, r)
        ax = torch.einsum("bti,bri->btr", x, A_b)  # (Bsz, T, r)
        out = torch.einsum("btr,bor->bto", ax, B_b)  # (Bsz, T, out)
    elif mode == "nd":
        ax = torch.einsum("bti,kri->btkr", x, A)  # (Bsz, T, K, r)
        ax = ax * omega[:, None, :, None]  # weight each adapter's rank-r code per sample
        out = torch.einsum("btkr,kor->bto", ax, B)  # (Bsz, T, out)
    else:
        raise AggregationError(f"mode must be 'd' or 'nd', got {mode!r}")
    return out * scaling


def lora_layers(model: RecLM) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every peft LoRA linear layer, names as in the adapter state dict keys."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.model.named_modules() if isinstance(m, LoraLayer) and len(m.lora_A)]


def stack_states(
    model: RecLM, states: Sequence[dict[str, torch.Tensor]]
) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]]:
    """Per LoRA layer: (module, A (K, r, in), B (K, out, r), scaling) from K adapter state dicts.

    Raises:
        AggregationError: no adapters, a state lacks a layer's tensors, or the shapes disagree.
    """
    if not states:
        raise AggregationError("a mixture needs at least one adapter")
    out = []
    for name, module in lora_layers(model):
        adapter = module.active_adapters[0]
        ka, kb = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        missing = [i for i, s in enumerate(states) if ka not in s or kb not in s]
        if missing:
            raise AggregationError(f"adapter {missing[0]} has no tensors for {name}")
        A = torch.stack([s[ka] for s in states]).to(module.lora_A[adapter].weight.device)  # (K, r, in)
        B = torch.stack([s[kb] for s in states]).to(module.lora_B[adapter].weight.device)  # (K, out, r)
        out.append((module, A, B, float(module.scaling[adapter])))
    if not out:
        raise AggregationError("the model has no LoRA layers to mix")
    return out


@contextlib.contextmanager
def lora_mixture(
    model: RecLM,
    states: Sequence[dict[str, torch.Tensor]],
    mode: Mode,
    weights: Callable[[Batch], torch.Tensor],
) -> Iterator[None]:
    """Inside this context every forward of ``model`` computes the per-sample mixture of ``states``.

    ``weights(batch)`` returns the (B, K) weights of the batch's samples, in the batch's row order; it is
    called once per batch through ``RecLM.batch_hooks``. The model's own adapter is disabled meanwhile and
    restored on exit (its tensors are never modified).
    """
    layers = stack_states(model, states)
    current: dict[str, torch.Tensor] = {}

    def on_batch(batch: Batch) -> None:
        w = torch.as_tensor(weights(batch), dtype=torch.float32, device=model.device)  # (B, K)
        assert w.shape == (len(batch.items), len(states)), (
            f"weights {tuple(w.shape)} for {len(batch.items)} rows"
        )
        current["omega"] = w

    def make_hook(A: torch.Tensor, B: torch.Tensor, scaling: float):
        def hook(module, args, output):
            if module.training:
                raise RuntimeError("LoRA mixtures are for inference: put the model in eval mode")
            omega = current.get("omega")
            assert omega is not None, "mixture forward without batch weights (RecLM.batch_hooks bypassed)"
            x = args[0]
            return output + mixed_delta(x, A, B, omega, mode, scaling).to(output.dtype)

        return hook

    handles = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(model.adapter_disabled())
        model.batch_hooks.append(on_batch)
        stack.callback(model.batch_hooks.remove, on_batch)
        for module, A, B, scaling in layers:
            handles.append(module.register_forward_hook(make_hook(A, B, scaling)))
        stack.callback(lambda: [h.remove() for h in handles])
        yield


def score_mixture(
    model: RecLM,
    items: list[Encoded],
    states: Sequence[dict[str, torch.Tensor]],
    omega: np.ndarray,
    mode: Mode,
    batch_size: int = 16,
    progress: bool = True,
) -> np.ndarray:
    """P(Yes) of every item under its own mixture ``omega[i]`` (N, K) of ``states``: one forward per batch.

    Raises:
        AggregationError: ``omega`` is not (N, K), or one sample id is given two different weight rows.
    """
    omega = np.asarray(omega, dtype=np.float32)
    if omega.shape != (len(items), len(states)):
        raise AggregationError(f"omega has shape {omega.shape}, expected ({len(items)}, {len(states)})")
    table: dict[str, np.ndarray] = {}
    for e, w in zip(items, omega):
        if e.sample_id in table and not np.array_equal(table[e.sample_id], w):
            raise AggregationError(f"sample {e.sample_id} appears twice with different mixture weights")
        table[e.sample_id] = w

    def weights(batch: Batch) -> torch.Tensor:
        return torch.from_numpy(np.stack([table[e.sample_id] for e in batch.items]))

    with lora_mixture(model, states, mode, weights):
        return model.score(items, batch_size, progress)
