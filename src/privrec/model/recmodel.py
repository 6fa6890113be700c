"""The LLM recommender: a causal LM with LoRA adapters, read as a Yes/No classifier (METHODS §0).

One forward for everything (training, scoring, every method): the decoder runs over right-padded prompts,
the hidden state at each prompt's last real token goes through the final norm and the two LM-head rows of
"Yes" and "No" in fp32, and the model's output is the logit difference ``z = z_yes - z_no``, so
``P(Yes) = softmax([z_yes, z_no])[0] = sigmoid(z)``. No vocabulary-sized matrix is ever computed.

With LoRA on the top L layers only, the frozen bottom layers are run once per prompt and their output is
kept in a :class:`~privrec.model.frozen_cache.FrozenCache` keyed by (base weights, cut layer, token ids);
training and scoring then run the top L layers on the cached states (DESIGN.md performance habits).

The token prefix that a batch's prompts all start with (the chat template's system text and the
instruction: ~57 of ~180 tokens of a like-prompt) runs once per training batch, or once per scoring call,
through the layers above the cache (every layer without one), and the prompts' remaining tokens run against
its key-value cache (``model.share_prefix``; :mod:`privrec.model.prefix_scoring`). Scores and gradients
equal the whole prompts' to float rounding. Under ``auto`` (the default) a training batch shares its prefix
only when no dropout is drawn (each row's prefix would draw its own mask); ``true`` shares it there too.

Ranking (METHODS §1) scores many candidates after one shared prompt prefix: :meth:`RecLM.score_groups` runs
each prefix once, keeps its key-value cache, and scores all the candidates' suffixes in batches against it,
either as P(Yes) logits (``mode="yes"``, the head above) or as the summed log-probability of the suffix
tokens (``mode="title"``). ``shared=False`` scores every full prompt instead (the reference the shared path
must equal).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from privrec.errors import ModelError, UserError
from privrec.model import backbone, prefix_scoring
from privrec.model.backbone import default_threads, fingerprint, load_backbone
from privrec.model.collab import MODULE_NAME as COLLAB_MODULE
from privrec.model.collab import CollabProjector, add_at
from privrec.model.encoding import Batch, Encoded, PrefixGroup, SharedPrefix, prompt_key
from privrec.model.frozen_cache import FrozenCache
from privrec.model.prefix_scoring import MIN_SHARED_PREFIX, common_prefix
from privrec.progress import track
from privrec.prompts import PromptBuilder, answer_token_ids

__all__ = ["Batch", "Encoded", "FrozenCache", "PrefixGroup", "RecLM", "SharedPrefix"]


@contextlib.contextmanager
def _layer_window(inner: nn.Module, start: int, end: int):
    """Temporarily make the decoder run only layers[start:end] and skip its final norm."""
    layers, norm = inner.layers, inner.norm
    inner.layers = nn.ModuleList(list(layers)[start:end])
    inner.norm = nn.Identity()
    try:
        yield
    finally:
        inner.layers, inner.norm = layers, norm


@functools.cache
def _cache_kwarg_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_kwarg(inner: nn.Module) -> str:
    """The decoder's name for its key-value cache argument: transformers 5 renames ``past_key_values`` to
    ``cache`` (and warns on the old name where the new one exists)."""
    return _cache_kwarg_of(type(inner).forward)


def lora_model(model: nn.Module, lora_cfg, seed: int, n_layers: int,
               modules_to_save: list[str] | None = None) -> nn.Module:
    """``model`` wrapped with a fresh peft LoRA adapter, initialised from ``seed`` without moving the global
    random stream. With ``lora_cfg.top_layers`` = L, LoRA goes on layers[N-L:] only. The initial weights of a
    layer do not depend on which other layers are materialised: peft creates every LoRA weight on the CPU in
    module order, and moves those of a meta-device layer to the meta device afterwards.

    Raises:
        UserError: top_layers above the model's layer count, or target modules the model does not have.
    """
    from peft import LoraConfig, get_peft_model

    if lora_cfg.top_layers is not None and lora_cfg.top_layers > n_layers:
        raise UserError(f"lora.top_layers={lora_cfg.top_layers} but the model has {n_layers} layers")
    layers = None
    if lora_cfg.top_layers is not None:
        layers = list(range(n_layers - lora_cfg.top_layers, n_layers))
    pcfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=list(lora_cfg.target_modules), layers_to_transform=layers,
                      layers_pattern="layers" if layers else None, bias="none", task_type="CAUSAL_LM",
                      modules_to_save=modules_to_save)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks the model for `is_gradient_checkpointing`, which transformers 5 deprecates in favour
        # of `is_activation_checkpointing`: a FutureWarning about peft's code, not ours (no checkpointing here)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, pcfg)
        except ValueError as e:
            raise UserError(f"lora: {str(e).splitlines()[0]}") from None


class LayerStack:
    """What runs decoder layers of ``self.model`` (an HF causal LM, peft-wrapped or not) on ``self.device``
    with bf16 autocast when ``self.bf16``: the recommender, and the federated split's server (which holds only
    its own layers)."""

    model: nn.Module
    device: torch.device
    bf16: bool

    def _inner(self) -> nn.Module:
        """The decoder stack (embed_tokens, layers, norm) under any peft wrapping."""
        m = self.model
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        inner = getattr(m, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
            raise ModelError(f"{type(m).__name__}: expected a decoder with .model.layers and .model.norm")
        return inner

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def base_model(self) -> nn.Module:
        """The HF causal LM under any peft wrapping."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _run_layers(self, start: int, end: int, input_ids=None, hidden=None, attention_mask=None, cache=None,
                    position_ids=None) -> torch.Tensor:
        """Decoder layers [start, end) over token ids or hidden states: (B, T, H) before the final norm.

        With ``cache`` (a DynamicCache, which grows): after the keys/values already in it, ``attention_mask``
        then covering cache + new tokens and ``position_ids`` continuing after the cached ones."""
        inner = self._inner()
        with _layer_window(inner, start, end), self._autocast():
            out = inner(input_ids=input_ids, inputs_embeds=hidden, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=cache is not None, **{_cache_kwarg(inner): cache})
        return out.last_hidden_state

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the untuned base model (zero-shot) while a LoRA adapter is attached."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            yield


class RecLM(LayerStack):
    """A causal LM read as a Yes/No recommender, with optional LoRA and a frozen-layer cache.

    Build it with :meth:`from_config`. ``self.model`` is the (peft-wrapped once LoRA is attached) HF model.
    """

    def __init__(self, model, tokenizer, builder: PromptBuilder, precision: str = "auto",
                 max_length: int = 512, cache_dir: Path | None = None, share_prefix: bool | str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.builder = builder
        self.device = next(model.parameters()).device
        self.bf16 = backbone.use_bf16(precision, self.device)
        self.max_length = max_length
        self.yes_id, self.no_id = answer_token_ids(tokenizer)
        self.n_layers = len(self._inner().layers)
        self.cut = 0  # layers[:cut] are frozen and cached; 0 = no cache
        self.cache: FrozenCache | None = None
        self.cache_dir = cache_dir
        self._fingerprint: str | None = None
        self._encoded: dict[str, tuple[int, ...]] = {}
        self.lora_config = None
        # run the token prefix a batch's prompts share once: "auto", True or False (model.share_prefix)
        self.share_prefix = share_prefix
        # Called with every batch right before its forward: per-batch state that the layers read, such as
        # per-sample adapter mixture weights (privrec.model.mixture). Empty by default.
        self.batch_hooks: list[Callable[[Batch], None]] = []
        # collaborative signal (METHODS §12, privrec.model.collab): the features every prompt reads (set by
        # from_config), whether a projector injects them, the layer at whose input they enter, and the
        # (rows, positions, vectors) of the forward that is running
        self.collab = None
        self.injects = False
        self.collab_at = 0
        self._inject: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, dataset, device: torch.device | None = None, item_stats=None, collab=None,
                    plain: bool = False) -> RecLM:
        """Load the backbone of ``cfg.model`` and wire the prompt builder of ``cfg.prompt``.

        ``item_stats``: the :class:`privrec.data.ItemStats` that ``prompt.item_stats`` shows (the caller
        counts them from training labels only); required when that option is on. ``collab``: the
        :class:`privrec.features.CollabFeatures` that ``prompt.cf_score`` and ``collab.inject`` read.
        ``plain``: no features yet; prompts show no counted line until :meth:`set_features`.

        Raises:
            ModelError: the model cannot be loaded or has no decoder layers to run.
        """
        from privrec import assets

        default_threads(cfg.model.threads)
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, tok = load_backbone(cfg.model.name, cfg.model.gguf_file, device, keep=cls.tensors_to_load(cfg))
        builder = PromptBuilder(dataset, cfg.prompt, cfg.data.like_threshold, item_stats, collab, plain=plain)
        out = cls(model, tok, builder, cfg.model.precision, cfg.prompt.max_length,
                  cache_dir=assets.cache_dir() / "frozen", share_prefix=cfg.model.share_prefix)
        out.collab = collab
        return out

    @property
    def features(self) -> tuple | None:
        """(item statistics, CF features) the prompts read now (METHODS §12); None: plain prompts."""
        return None if self.builder.plain else (self.builder.item_stats, self.collab)

    def set_features(self, features: tuple | None) -> None:
        """Render and inject ``features`` ((item statistics, CF features)) from now on; None: render no counted
        line at all (plain prompts)."""
        self.builder.plain = features is None
        self.builder.item_stats, self.builder.collab = features or (None, None)
        self.collab = None if features is None else features[1]

    @contextlib.contextmanager
    def features_of(self, features: tuple | None):
        """Render and inject ``features`` ((item statistics, CF features); None: no counted line) inside the
        block, e.g. a shard's own, counted over its training samples alone; the model's own afterwards.
        Encodings are cached by text, so prompts rendered under other features are other entries."""
        kept = self.features
        self.set_features(features)
        try:
            yield self
        finally:
            self.set_features(kept)

    @classmethod
    def tensors_to_load(cls, cfg) -> Callable[[str], bool] | None:
        """Which of the checkpoint's parameters :meth:`from_config` materialises (None: all of them)."""
        return None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.base_model())
        return self._fingerprint

    def attach_lora(self, lora_cfg, seed: int) -> None:
        """Wrap the model with a fresh peft LoRA adapter (METHODS §0: r=8, alpha=16, q/v by default).

        With ``lora_cfg.top_layers`` = L, LoRA goes on layers[N-L:] only, and with ``cache_frozen`` the
        bottom N-L layers are cached. Initialisation is seeded (:func:`lora_model`).
        """
        _ = self.fingerprint  # hash the base weights before peft adds its own
        saved = [COLLAB_MODULE] if self.injects else None
        self.model = lora_model(self.model, lora_cfg, seed, self.n_layers, modules_to_save=saved)
        self.lora_config = lora_cfg
        if self.injects:
            self.collab_at = self.n_layers - lora_cfg.top_layers if lora_cfg.top_layers is not None else 0
            self._inner().layers[self.collab_at].register_forward_pre_hook(self._collab_hook, with_kwargs=True)
        if lora_cfg.top_layers is not None and lora_cfg.cache_frozen:
            self.enable_cache(self.n_layers - lora_cfg.top_layers)

    def attach_collab(self, hidden: int, seed: int) -> None:
        """Give the decoder a fresh :class:`CollabProjector` from ``self.collab``'s inputs to the hidden size
        (before :meth:`attach_lora`, which makes it part of the adapter and places its slot: METHODS §12)."""
        if self.collab is None:
            raise ValueError("collab.inject needs the collaborative features (from_config(collab=...))")
        _ = self.fingerprint  # the base weights' hash never covers the projector
        H = self._inner().norm.weight.shape[0]
        proj = CollabProjector(self.collab.size, hidden, H, seed).to(self.device)
        self._inner().add_module(COLLAB_MODULE, proj)
        self.injects = True

    def _projector(self) -> nn.Module:
        return getattr(self._inner(), COLLAB_MODULE)

    def _collab_hook(self, module, args, kwargs):
        """Forward pre-hook of layer ``collab_at``: add the running forward's CF vectors at its slots."""
        if self._inject is None:
            return None
        rows, cols, vectors = self._inject
        if args:
            return (add_at(args[0], rows, cols, vectors), *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=add_at(kwargs["hidden_states"], rows, cols, vectors))

    @contextlib.contextmanager
    def injecting(self, cf: list[tuple[float, ...] | None] | None, last: torch.Tensor):
        """Inside the block, the forward over a batch adds the projected ``cf`` of row b at position
        ``last[b]`` of layer ``collab_at``'s input (nothing when the model injects nothing)."""
        if not self.injects or cf is None:
            yield
            return
        if any(x is None for x in cf):
            raise ValueError("a prompt without its CF input reached a model that injects one")
        x = torch.tensor(cf, dtype=torch.float32, device=self.device)  # (B, n_in)
        with self._autocast():
            vectors = self._projector()(x)  # (B, H)
        self._inject = (torch.arange(len(cf), device=self.device), last, vectors)
        try:
            yield
        finally:
            self._inject = None

    def enable_cache(self, cut: int) -> None:
        self.cut = cut
        prec = "bf16" if self.bf16 else "fp32"
        self.cache = FrozenCache(f"{self.fingerprint}-c{cut}-{prec}", self.cache_dir)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- tokenisation ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> tuple[int, ...]:
        """Token ids of a piece of prompt text (no special tokens added), cached by text."""
        ids = self._encoded.get(text)
        if ids is None:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._encoded[text] = ids
        return ids

    def check_length(self, n_tokens: int, what: str) -> None:
        """Raises: UserError for a prompt longer than prompt.max_length (never silently truncated)."""
        if n_tokens > self.max_length:
            raise UserError(f"{what}: prompt has {n_tokens} tokens > prompt.max_length={self.max_length}")

    def encode(self, samples) -> list[Encoded]:
        """Render and tokenise samples once (cached by text), as ids(prefix) + ids(suffix).

        Raises:
            UserError: a prompt longer than prompt.max_length (never silently truncated).
        """
        out = []
        for s in samples:
            prefix, suffix = self.builder.split(s, self.tokenizer)
            p_ids = self.tokenize(prefix)
            ids = p_ids + self.tokenize(suffix)
            self.check_length(len(ids), f"sample {s.sample_id}")
            cf = tuple(float(v) for v in self.collab.vector(s)) if self.injects else None
            out.append(Encoded(s.sample_id, ids, float(s.label), prompt_key(ids), len(p_ids), s.user_id, cf))
        return out

    # --- batching ----------------------------------------------------------------------------------
    @property
    def can_share_prefix(self) -> bool:
        """Whether a prompt prefix may run once for many prompts: not when a subclass changes the forward
        (the split model's channel) or batch hooks need whole prompts (per-sample adapter mixtures)."""
        return type(self).logits is RecLM.logits and not self.batch_hooks

    @contextlib.contextmanager
    def whole_prompts(self):
        """Run every prompt whole inside the block (the reference the shared-prefix paths must equal)."""
        saved, self.share_prefix = self.share_prefix, False
        try:
            yield
        finally:
            self.share_prefix = saved

    def _dropout_active(self) -> bool:
        """Whether a training forward now draws dropout (LoRA dropout, or attention dropout of the decoder)."""
        if not (self.model.training and torch.is_grad_enabled()):
            return False
        return getattr(self._inner().config, "attention_dropout", 0.0) > 0 or any(
            isinstance(mod, nn.Dropout) and mod.p > 0 for mod in self.model.modules())

    def shared_prefix(self, items: list[Encoded]) -> SharedPrefix | None:
        """The token prefix all ``items`` start with, to run once for all of them; None when sharing is off
        (``model.share_prefix: false``), not possible (:attr:`can_share_prefix`), or not exact under
        ``auto`` (a training forward with dropout: each row's prefix tokens would draw their own mask), for a
        single item, or when the common prefix is shorter than MIN_SHARED_PREFIX tokens. Needs the items
        prepared (cached states)."""
        if self.share_prefix is False or not self.can_share_prefix or len(items) < 2:
            return None
        if self.share_prefix == "auto" and self._dropout_active():
            return None
        ids = common_prefix([e.ids for e in items])
        if len(ids) < MIN_SHARED_PREFIX:
            return None
        hidden = None
        if self.cut > 0:
            assert self.cache is not None
            states = self.cache.states(items[0].key)
            assert states is not None, f"frozen cache lacks {items[0].sample_id} (call prepare() first)"
            hidden = states[: len(ids)].to(self.device)  # (P, H)
        return SharedPrefix(ids, hidden)

    def collate(self, items: list[Encoded], prefix: SharedPrefix | None | Literal["auto"] = "auto") -> Batch:
        """Right-padded batch of ``items``: token ids, or their cached states at the cut.

        ``prefix="auto"``: the items' own :meth:`shared_prefix` (training: each batch runs its common prefix
        once, with grad); a :class:`SharedPrefix`: that one (a scoring call's, shared by all its batches);
        None: whole prompts. With a prefix the batch holds each prompt's tokens after it."""
        if isinstance(prefix, str):
            prefix = self.shared_prefix(items)
        P = len(prefix) if prefix is not None else 0
        assert prefix is None or all(e.ids[:P] == prefix.ids for e in items), "items do not share the prefix"
        lengths = [len(e) - P for e in items]
        T = max(lengths)
        mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()  # (B, T)
        last = torch.tensor(lengths) - 1
        labels = torch.tensor([e.label for e in items], dtype=torch.float32)
        dev = self.device
        if self.cut > 0:
            assert self.cache is not None
            H = self._inner().norm.weight.shape[0]
            states = [self.cache.states(e.key, P) for e in items]
            missing = [e.sample_id for e, s in zip(items, states) if s is None]
            assert not missing, f"frozen cache lacks {len(missing)} prompts (call prepare() first): {missing[:3]}"
            hidden = torch.zeros(len(items), T, H, dtype=states[0].dtype)
            for i, s in enumerate(states):
                hidden[i, : s.shape[0]] = s
            return Batch(items, None, hidden.to(dev), mask.to(dev), last.to(dev), labels.to(dev), prefix)
        ids = torch.full((len(items), T), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, e in enumerate(items):
            ids[i, : lengths[i]] = torch.tensor(e.ids[P:])
        return Batch(items, ids.to(dev), None, mask.to(dev), last.to(dev), labels.to(dev), prefix)

    @staticmethod
    def length_batches(items: list[Encoded], batch_size: int) -> list[list[int]]:
        """Indices grouped into batches of similar length (longest first), to waste little on padding."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]

    # --- forward -----------------------------------------------------------------------------------
    def _head(self, h_last: torch.Tensor, pair: bool = False) -> torch.Tensor:
        """(B, H) last-token states -> (B,) fp32 logit difference z_yes - z_no, or with ``pair`` the (B, 2)
        raw LM-head logits [z_yes, z_no] (what a per-class logit formula such as E2URec's teacher needs)."""
        h = self._inner().norm(h_last.float())  # (B, H) final norm in fp32
        w = self.base_model().get_output_embeddings().weight[[self.yes_id, self.no_id]].float()  # (2, H)
        z = h @ w.T  # (B, 2)
        return z if pair else z[:, 0] - z[:, 1]

    def _last_state(self, batch: Batch) -> torch.Tensor:
        """(B, H) last decoder layer's output at each prompt's last real token (before the final norm)."""
        for hook in self.batch_hooks:
            hook(batch)
        start = self.cut if batch.hidden is not None else 0
        if batch.prefix is not None:
            prefix_scoring.prefix_kv(self, batch.prefix, start)  # before any injection: the prefix has no slot
        with self.injecting([e.cf for e in batch.items] if self.injects else None, batch.last):
            if batch.prefix is not None:
                h = prefix_scoring.run_after_prefix(self, batch, start)
            else:
                h = self._run_layers(start, self.n_layers, input_ids=batch.input_ids, hidden=batch.hidden,
                                     attention_mask=batch.attention_mask)
        return h[torch.arange(h.shape[0], device=h.device), batch.last]  # (B, H)

    def logits(self, batch: Batch, pair: bool = False) -> torch.Tensor:
        """The one forward: (B,) fp32 z_yes - z_no for a batch (grad flows into trainable LoRA weights);
        ``pair=True`` returns the (B, 2) logits [z_yes, z_no] instead."""
        return self._head(self._last_state(batch), pair)

    @torch.no_grad()
    def last_hidden(self, items: list[Encoded], at: str = "final", batch_size: int = 16,
                    progress: bool = True) -> np.ndarray:
        """(N, H) fp32 hidden state at each prompt's last real token, in input order.

        ``at="final"``: the last decoder layer's output after the final norm (what HF returns as the last
        hidden state), computed with the model as it is: wrap the call in :meth:`adapter_disabled` for the
        untuned model. ``at="cut"``: the frozen bottom layers' output read from the frozen-layer cache (no
        LoRA there, so it is the untuned model's by construction; needs a cache).
        """
        if at not in ("final", "cut"):
            raise ValueError(f"at must be 'final' or 'cut', got {at!r}")
        if not items:
            return np.zeros((0, self._inner().norm.weight.shape[0]), dtype=np.float32)
        self.prepare(items, batch_size, progress)
        if at == "cut":
            if self.cut == 0:
                raise ValueError("at='cut' needs the frozen-layer cache (lora.top_layers with cache_frozen)")
            assert self.cache is not None
            return np.stack([self.cache.states(e.key, len(e) - 1)[0].float().numpy() for e in items])
        was_training = self.model.training
        self.model.eval()
        out = np.zeros((len(items), self._inner().norm.weight.shape[0]), dtype=np.float32)
        try:
            prefix = self.shared_prefix(items)
            batches = self.length_batches(items, batch_size)
            for idx in track(batches, len(batches), "hidden states", progress):
                h = self._last_state(self.collate([items[i] for i in idx], prefix))
                out[idx] = self._inner().norm(h.float()).cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def prepare(self, items: list[Encoded], batch_size: int = 16, progress: bool = True,
                share_prefix: bool | None = None) -> None:
        """Fill the frozen cache for these prompts (no-op without a cache): computed once per prompt, the
        token prefix all of them share once and stored once (``share_prefix``, default: unless
        ``model.share_prefix`` is false; False: every prompt whole). A prompt whose stored prefix piece was
        discarded gets that piece back."""
        if self.cut == 0:
            return
        assert self.cache is not None
        need: dict[str, Encoded] = {}
        for e in items:
            piece = self.cache.missing(e.ids, e.key) if e.key not in need else None
            if piece is not None:
                ids, key = piece
                need.setdefault(key, e if key == e.key else Encoded(f"prefix of {e.sample_id}", ids, 0.0, key))
        todo = list(need.values())
        if not todo:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            share = self.share_prefix is not False if share_prefix is None else share_prefix
            shared = common_prefix([e.ids for e in todo]) if share and len(todo) > 1 else ()
            if len(shared) >= MIN_SHARED_PREFIX:
                prefix_scoring.fill_after_prefix(self, todo, shared, self.cut, batch_size, progress)
                return
            batches = self.length_batches(todo, batch_size)
            for idx in track(batches, len(batches), "caching frozen layers", progress):
                ids, mask, lengths = prefix_scoring.padded(self, [todo[i].ids for i in idx])
                h = self._run_layers(0, self.cut, input_ids=ids, attention_mask=mask).detach().to("cpu")
                for j, i in enumerate(idx):
                    self.cache.put(todo[i].key, h[j, : lengths[j]].clone())
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def score_logits(self, items: list[Encoded], batch_size: int = 16, progress: bool = True,
                     pair: bool = False) -> np.ndarray:
        """z_yes - z_no for every item, in input order (the one scorer; eval mode, no dropout).

        The items' common prompt prefix runs once per call, with the adapter as it is now, and every batch
        reuses its key-value cache (:meth:`shared_prefix`). ``pair=True``: the (N, 2) raw logits [z_yes, z_no]
        instead of their difference."""
        if not items:
            return np.zeros((0, 2) if pair else 0)
        self.prepare(items, batch_size, progress)
        was_training = self.model.training
        self.model.eval()
        out = np.zeros((len(items), 2) if pair else len(items), dtype=np.float64)
        try:
            prefix = self.shared_prefix(items)
            batches = self.length_batches(items, batch_size)
            for idx in track(batches, len(batches), "scoring", progress):
                z = self.logits(self.collate([items[i] for i in idx], prefix), pair)
                out[idx] = z.double().cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def score(self, items: list[Encoded], batch_size: int = 16, progress: bool = True) -> np.ndarray:
        """P(Yes) = sigmoid(z_yes - z_no) for every item, in input order."""
        z = self.score_logits(items, batch_size, progress)
        return 1.0 / (1.0 + np.exp(-z))

    # --- ranking: many candidates after one shared prefix -------------------------------------------
    @torch.no_grad()
    def score_groups(self, groups: list[PrefixGroup], mode: str = "yes", shared: bool = True, prefix_batch: int = 8,
                     max_suffixes: int = 64, batch_size: int = 16, progress: bool = True) -> list[np.ndarray]:
        """One score per suffix of every group, as a list of (n_suffixes,) float64 arrays in input order.

        ``mode="yes"``: z_yes - z_no at the suffix's last token (the one scorer's head); ``mode="title"``: the
        sum of the log-probabilities of the suffix tokens given the prefix and the suffix tokens before them.

        Shared path (``shared`` and :attr:`can_share_prefix`): up to ``prefix_batch`` prefixes run in one
        right-padded batch and their per-layer keys/values are kept; the suffixes of those users are then
        scored in chunks of at most ``max_suffixes``, each chunk against the cache rows of its owners
        (gathered per chunk with ``index_select``), with the attention mask covering the owner's prefix
        (its padding masked) plus the suffix, and position ids continuing after the owner's real prefix
        length (:func:`privrec.model.prefix_scoring.score_shared`). Otherwise every ``prefix + suffix`` is
        scored as a whole prompt.
        """
        if mode not in ("yes", "title"):
            raise ValueError(f"mode must be 'yes' or 'title', got {mode!r}")
        for g in groups:
            self.check_length(len(g.prefix) + max((len(x) for x in g.suffixes), default=0), "ranking prompt")
            if not g.prefix or any(not x for x in g.suffixes):
                raise ValueError("empty prefix or suffix in a ranking group")
        was_training = self.model.training
        self.model.eval()
        try:
            if shared and self.can_share_prefix:
                return prefix_scoring.score_shared(self, groups, mode, prefix_batch, max_suffixes, progress)
            return prefix_scoring.score_full(self, groups, mode, batch_size, progress)
        finally:
            self.model.train(was_training)
