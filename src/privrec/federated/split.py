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

Each side loads only its own tensors (:func:`privrec.model.backbone.load_backbone` with ``keep``): the
client's model has the whole architecture, with the middle layers' base weights left on the meta device
(shape only, never read from the checkpoint); the server's model has only layers [k, N - m) materialised. Both
attach LoRA from the same seed, so every layer's initial LoRA weights are the ones the whole model would get.
In this in-process runner the client's state carries the server's per-client LoRA weights, as the runner's
aggregation expects: the client's middle-layer LoRA modules are the server's own modules (one copy), so
loading a state, the optimiser step and the server's backward all act on the same tensors.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from privrec.errors import UserError
from privrec.model import backbone
from privrec.model.recmodel import Batch, LayerStack, RecLM, lora_model

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Decoder layer of a parameter / adapter tensor name, or None (embeddings, final norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def check_cut(client_first: int, client_last: int, n_layers: int) -> None:
    """Raises: UserError when the client's layers leave the server none."""
    if client_first + client_last >= n_layers:
        raise UserError(f"federated.split: client_first={client_first} + client_last={client_last} leaves "
                        f"no layer for the server (the model has {n_layers})")


def client_side(layer: int | None, client_first: int, client_last: int, n_layers: int) -> bool:
    """Embeddings, norm and head (layer None), layers [0, k) and [N - m, N) are the client's."""
    return layer is None or layer < client_first or layer >= n_layers - client_last


def on_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


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


class SplitServer(LayerStack):
    """Runs decoder layers ``[start, end)`` on hidden states received as bytes, with its own model.

    :meth:`load` materialises only those layers' tensors (the embeddings, norm, head and the client's layers
    stay on the meta device); :meth:`attach_lora` puts the same seeded LoRA on them as the whole model would
    get. Pending forward graphs are kept until their backward arrives (one per training step). Each forward
    message says whether the client is training (dropout on), and the server's layers follow it.
    """

    def __init__(self, model, start: int, end: int, device: torch.device, bf16: bool):
        self.model, self.start, self.end, self.device, self.bf16 = model, start, end, device, bf16
        self.n_layers = len(self._inner().layers)
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def load(cls, model_cfg, start: int, end: int, device: torch.device) -> SplitServer:
        """The server of ``model_cfg`` (a config's ``model`` section) for layers [start, end).

        Raises:
            ModelError: the model cannot be loaded.
        """
        def keep(name: str) -> bool:
            layer = layer_index(name)
            return layer is not None and start <= layer < end

        model, _ = backbone.load_backbone(model_cfg.name, model_cfg.gguf_file, device, keep=keep, tokenizer=False)
        return cls(model, start, end, device, backbone.use_bf16(model_cfg.precision, device))

    def attach_lora(self, lora_cfg, seed: int) -> None:
        """The LoRA adapter of :meth:`RecLM.attach_lora` (same config and seed), real on this side's layers."""
        self.model = lora_model(self.model, lora_cfg, seed, self.n_layers)

    def __call__(self, kind: str, payload: bytes) -> bytes:
        tensors, meta = decode_message(payload)
        if kind == "forward":
            return self._forward(tensors, meta)
        if kind == "backward":
            return self._backward(tensors, meta)
        raise ValueError(f"unknown message kind {kind!r}")

    def _forward(self, t: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
        dev = self.device
        h = t["hidden"].to(dev)  # (B, T, H)
        mask = t["mask"].to(dev).long()  # (B, T) padding mask, sent as bool
        training = meta.get("training") == "1"
        if self.model.training != training:
            self.model.train(training)  # dropout as on the client
        train = meta.get("train") == "1"
        if train:
            h.requires_grad_(meta.get("needs_grad") == "1")
            with torch.enable_grad():
                out = self._run_layers(self.start, self.end, hidden=h, attention_mask=mask)
            if len(self._pending) > 64:
                raise RuntimeError("split server: forward graphs are piling up without backward calls")
            self._pending[meta["step"]] = (h, out)
        else:
            with torch.no_grad():
                out = self._run_layers(self.start, self.end, hidden=h, attention_mask=mask)
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
                "training": "1" if client.model.training else "0", "step": ctx.step}
        out, _ = client.channel.call("forward", {"hidden": h.float(), "mask": client._mask.bool()}, meta)
        return out["hidden"].to(h.device)

    @staticmethod
    def backward(ctx, g):
        back, _ = ctx.client.channel.call("backward", {"grad": g.float()}, {"step": ctx.step})
        gh = back.get("grad") if ctx.needs_h_grad else None
        return (gh.to(g.device) if gh is not None else None), None, None


class SplitRecLM(RecLM):
    """A :class:`RecLM` whose forward crosses to a :class:`SplitServer` for the middle layers.

    Build with ``SplitRecLM.from_config(cfg, dataset)`` (``cfg.federated.split`` names the cut; only the
    client's tensors are read), then :meth:`configure_split` (before ``attach_lora``, which sets the cache cut
    and, with an in-process server, attaches the server's LoRA too). Training, scoring and the frozen cache go
    through the same ``train`` loop and scorer as the unsplit model; only :meth:`logits` differs.
    """

    split_first: int | None = None
    split_last: int | None = None
    server: SplitServer | None = None  # the in-process server; None when the transport reaches a remote one
    model_config = None  # the config's model section, which an in-process server loads its layers from
    _loaded_cut: tuple[int, int] | None = None  # the (client_first, client_last) whose tensors were loaded

    @classmethod
    def tensors_to_load(cls, cfg) -> Callable[[str], bool]:
        """The client's parameters of ``cfg.federated.split``: embeddings, norm, head and its layers.

        Raises:
            UserError: the cut leaves the server no layer.
        """
        split = cfg.federated.split
        n = backbone.layer_count(cfg.model.name, cfg.model.gguf_file)
        check_cut(split.client_first, split.client_last, n)
        return lambda name: client_side(layer_index(name), split.client_first, split.client_last, n)

    @classmethod
    def from_config(cls, cfg, dataset, device: torch.device | None = None, item_stats=None,
                    collab=None, plain: bool = False) -> SplitRecLM:
        model = super().from_config(cfg, dataset, device, item_stats, collab, plain)
        model.model_config = cfg.model
        model._loaded_cut = (cfg.federated.split.client_first, cfg.federated.split.client_last)
        return model

    def configure_split(self, client_first: int, client_last: int, record: bool = False,
                        handler: Callable[[str, bytes], bytes] | None = None) -> None:
        """Cut the model: ``handler`` is the transport to the server (bytes in, bytes out); None builds a
        :class:`SplitServer` in this process, which loads only its own layers.

        Raises: UserError when the client's layers leave the server none."""
        check_cut(client_first, client_last, self.n_layers)
        if self._loaded_cut not in (None, (client_first, client_last)):
            raise ValueError(f"configure_split({client_first}, {client_last}) on a client loaded for the cut "
                             f"{self._loaded_cut}")
        self.split_first, self.split_last = client_first, client_last
        if handler is None:
            self.server = SplitServer.load(self.model_config, client_first, self.n_layers - client_last,
                                           self.device)
            handler = self.server
        self.channel = Channel(handler, record=record)
        self._steps = 0
        self._anchor = torch.zeros((), requires_grad=True)
        if self.cut > client_first:
            self.enable_cache(self.cut)

    @property
    def fingerprint(self) -> str:
        """The whole base model's fingerprint (:func:`privrec.model.backbone.checkpoint_fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = backbone.checkpoint_fingerprint(self.base_model())
        return self._fingerprint

    def attach_lora(self, lora_cfg, seed: int) -> None:
        """:meth:`RecLM.attach_lora`, and the same LoRA on the in-process server, whose middle-layer LoRA
        modules then stand in the client's model for its meta placeholders (one copy of those weights)."""
        super().attach_lora(lora_cfg, seed)
        if self.server is None:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.server.attach_lora(lora_cfg, seed)
        theirs = dict(self.server.model.named_modules())
        for name, mod in self.model.named_modules():
            if not isinstance(mod, BaseTunerLayer) or self.is_client_layer(layer_index(name)):
                continue
            for attr in mod.adapter_layer_names:
                mine, server_side = getattr(mod, attr), getattr(theirs[name], attr)
                for adapter in list(mine.keys()):
                    mine[adapter] = server_side[adapter]  # same key order: the parameters' order is unchanged

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable weights this process holds (a remote server's LoRA stays meta here)."""
        return [p for p in super().trainable_parameters() if not on_meta(p)]

    @contextlib.contextmanager
    def adapter_disabled(self):
        """The untuned model on both sides (the in-process server's adapter off too).

        Raises:
            RuntimeError: the server is remote (no message turns its adapter off).
        """
        if self.server is None:
            raise RuntimeError("adapter_disabled on a split client needs the in-process server")
        with super().adapter_disabled(), self.server.adapter_disabled():
            yield

    def enable_cache(self, cut: int) -> None:
        if self.split_first is not None:
            cut = min(cut, self.split_first)  # the client caches only its own frozen layers
        super().enable_cache(cut)

    def is_client_layer(self, layer: int | None) -> bool:
        """Embeddings, norm and head (layer None), layers [0, k) and [N - m, N) are the client's."""
        assert self.split_first is not None and self.split_last is not None
        return client_side(layer, self.split_first, self.split_last, self.n_layers)

    def is_client_tensor(self, name: str) -> bool:
        return self.is_client_layer(layer_index(name))

    def logits(self, batch: Batch, pair: bool = False) -> torch.Tensor:
        """RecLM's one forward, with the middle layers run by the server across the channel.

        Raises:
            UserError: batch hooks are set (a per-sample adapter mixture would not reach the server's layers).
        """
        assert self.split_first is not None, "configure_split() first"
        if self.batch_hooks:
            raise UserError("federated.split: per-sample adapter mixtures do not run across the split")
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
