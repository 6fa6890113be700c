"""Flexible storage, executed (METHODS §2): the client runs its layers, a server object runs the middle ones.

The client keeps the token embeddings, decoder layers ``[0, k)``, layers ``[N - m, N)``, the final norm and
the Yes/No head; the server runs layers ``[k, N - m)`` with its own (per-client) LoRA weights. Forward:

    client: ids -> embed -> layers[0:k] -> h_k ==channel==> server: layers[k:N-m] -> h_{N-m}
    ==channel==> client: layers[N-m:N] -> norm -> Yes/No rows -> z -> loss (labels stay here)

Backward sends dL/dh_{N-m} to the server, which backpropagates through its layers (accumulating its LoRA
gradients) and returns dL/dh_k when the client has trainable weights below the cut. Everything that
crosses is serialised to bytes (safetensors: float hidden states / gradients, a boolean padding mask,
a few string flags) by :class:`Channel`, which counts the bytes and can record every message. Token ids
and labels are never put on it.

The server's function is ``handle(kind, payload: bytes) -> bytes``, so the in-process :class:`Channel`
can be replaced by any transport that moves bytes. With LoRA on the top L layers only, the frozen-layer
cache is kept on the client and capped at the client's own layers (cut = min(N - L, k)): the server's
layers then run every step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from privrec.errors import UserError
from privrec.model.recmodel import Batch, RecLM

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder layer of a parameter / adapter tensor name, or None (embeddings, final norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


# --- the wire -------------------------------------------------------------------------------------------
def encode_message(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    meta = dict(meta or {})
    if not tensors:
        meta["empty"] = "1"  # safetensors writes a malformed header for no tensors and no metadata
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta or None)


def decode_message(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import json
    import struct

    from safetensors.torch import load

    n = struct.unpack("<Q", payload[:8])[0]
    header = json.loads(payload[8: 8 + n])
    return load(payload), dict(header.get("__metadata__", {}))


@dataclass
class Message:
    direction: str  # "up" (client -> server) or "down"
    kind: str  # "forward" / "backward"
    payload: bytes


@dataclass
class Channel:
    """Moves bytes between the client and ``handler`` (the server), counting them; ``record`` keeps them."""

    handler: object  # callable(kind, payload) -> payload
    record: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    messages: int = 0
    log: list[Message] = field(default_factory=list)

    def call(self, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]
             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        up = encode_message(tensors, meta)
        self.bytes_up += len(up)
        down = self.handler(kind, up)
        self.bytes_down += len(down)
        self.messages += 2
        if self.record:
            self.log += [Message("up", kind, up), Message("down", kind, down)]
        return decode_message(down)

    @property
    def total_bytes(self) -> int:
        return self.bytes_up + self.bytes_down


class SplitServer:
    """Runs decoder layers ``[start, end)`` of ``model`` on hidden states received as bytes.

    In this in-process runner the server's layers live in the same module object as the client's (one
    copy of the base weights in memory); the client code never calls them except through this handler.
    Pending forward graphs are kept until their backward arrives (one per training step).
    """

    def __init__(self, model: RecLM, start: int, end: int):
        self.model, self.start, self.end = model, start, end
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, kind: str, payload: bytes) -> bytes:
        tensors, meta = decode_message(payload)
        if kind == "forward":
            return self._forward(tensors, meta)
        if kind == "backward":
            return self._backward(tensors, meta)
        raise ValueError(f"unknown message kind {kind!r}")

    def _forward(self, t: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
        dev = self.model.device
        h = t["hidden"].to(dev)  # (B, T, H)
        mask = t["mask"].to(dev).long()  # (B, T) padding mask, sent as bool
        train = meta.get("train") == "1"
        if train:
            h.requires_grad_(meta.get("needs_grad") == "1")
            with torch.enable_grad():
                out = self.model._run_layers(self.start, self.end, hidden=h, attention_mask=mask)
            if len(self._pending) > 64:
                raise RuntimeError("split server: forward graphs are piling up without backward calls")
            self._pending[meta["step"]] = (h, out)
        else:
            with torch.no_grad():
                out = self.model._run_layers(self.start, self.end, hidden=h, attention_mask=mask)
        return encode_message({"hidden": out.detach().float()})

    def _backward(self, t: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
        h, out = self._pending.pop(meta["step"])
        torch.autograd.backward(out, t["grad"].to(out.device, out.dtype))
        if h.requires_grad and h.grad is not None:
            return encode_message({"grad": h.grad.float()})
        return encode_message({})

    def reset(self) -> None:
        self._pending.clear()


class _Cross(torch.autograd.Function):
    """h_k -> (server) -> h_{N-m}; backward sends the gradient at the far cut and returns the near one."""

    @staticmethod
    def forward(ctx, h, anchor, client):  # anchor: a scalar that requires grad, so backward always runs
        ctx.client = client
        ctx.needs_h_grad = h.requires_grad
        client._steps += 1
        ctx.step = str(client._steps)
        train = client._train_crossing
        meta = {"train": "1" if train else "0", "needs_grad": "1" if h.requires_grad else "0",
                "step": ctx.step}
        out, _ = client.channel.call("forward", {"hidden": h.float(), "mask": client._mask.bool()}, meta)
        return out["hidden"].to(h.device)

    @staticmethod
    def backward(ctx, g):
        back, _ = ctx.client.channel.call("backward", {"grad": g.float()}, {"step": ctx.step})
        gh = back.get("grad") if ctx.needs_h_grad else None
        return (gh.to(g.device) if gh is not None else None), None, None


class SplitRecLM(RecLM):
    """A :class:`RecLM` whose forward crosses to a :class:`SplitServer` for the middle layers.

    Build with ``SplitRecLM.from_config(cfg, dataset)``, then :meth:`configure_split` (before
    ``attach_lora``, which sets the cache cut). Training, scoring and the frozen cache go through the same
    ``train`` loop and scorer as the unsplit model; only :meth:`logits` differs.
    """

    split_first: int | None = None
    split_last: int | None = None

    def configure_split(self, client_first: int, client_last: int, record: bool = False) -> None:
        """Raises: UserError when the client's layers leave the server none."""
        if client_first + client_last >= self.n_layers:
            raise UserError(f"federated.split: client_first={client_first} + client_last={client_last} leaves "
                            f"no layer for the server (the model has {self.n_layers})")
        self.split_first, self.split_last = client_first, client_last
        self.server = SplitServer(self, client_first, self.n_layers - client_last)
        self.channel = Channel(self.server, record=record)
        self._steps = 0
        self._anchor = torch.zeros((), requires_grad=True)
        if self.cut > client_first:
            self.enable_cache(self.cut)

    def enable_cache(self, cut: int) -> None:
        if self.split_first is not None:
            cut = min(cut, self.split_first)  # the client caches only its own frozen layers
        super().enable_cache(cut)

    def is_client_layer(self, layer: int | None) -> bool:
        """Embeddings, norm and head (layer None), layers [0, k) and [N - m, N) are the client's."""
        assert self.split_first is not None and self.split_last is not None
        return layer is None or layer < self.split_first or layer >= self.n_layers - self.split_last

    def is_client_tensor(self, name: str) -> bool:
        return self.is_client_layer(layer_index(name))

    def logits(self, batch: Batch, pair: bool = False) -> torch.Tensor:
        """RecLM's one forward, with the middle layers run by the server across the channel."""
        assert self.split_first is not None, "configure_split() first"
        k, far = self.split_first, self.n_layers - self.split_last
        mask = batch.attention_mask
        if batch.hidden is not None:  # the client's frozen bottom layers, cached (cut <= k)
            h = batch.hidden
            if self.cut < k:
                h = self._run_layers(self.cut, k, hidden=h, attention_mask=mask)
        else:
            h = self._run_layers(0, k, input_ids=batch.input_ids, attention_mask=mask)  # (B, T, H)
        self._mask = mask
        self._train_crossing = torch.is_grad_enabled()
        h = _Cross.apply(h, self._anchor, self)  # (B, T, H) from the server
        h = self._run_layers(far, self.n_layers, hidden=h, attention_mask=mask)
        h_last = h[torch.arange(h.shape[0], device=h.device), batch.last]  # (B, H)
        return self._head(h_last, pair)


def parameter_counts(model: torch.nn.Module, is_client_layer) -> dict[str, int]:
    """Base + LoRA parameters on each side (tied weights counted once)."""
    client = server = 0
    for name, p in model.named_parameters():
        if is_client_layer(layer_index(name)):
            client += p.numel()
        else:
            server += p.numel()
    return {"client": client, "server": server, "total": client + server}
