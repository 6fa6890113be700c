"""The LLM recommender: a causal LM with LoRA adapters, read as a Yes/No classifier (METHODS §0).

One forward for everything (training, scoring, every method): the decoder runs over right-padded prompts,
the hidden state at each prompt's last real token goes through the final norm and the two LM-head rows of
"Yes" and "No" in fp32, and the model's output is the logit difference ``z = z_yes - z_no``, so
``P(Yes) = softmax([z_yes, z_no])[0] = sigmoid(z)``. No vocabulary-sized matrix is ever computed.

With LoRA on the top L layers only, the frozen bottom layers are run once per prompt and their output is
kept in a :class:`FrozenCache` keyed by (base weights, cut layer, token ids); training and scoring then run
the top L layers on the cached states (DESIGN.md performance habits).

Ranking (METHODS §1) scores many candidates after one shared prompt prefix: :meth:`RecLM.score_groups` runs
each prefix once, keeps its key-value cache, and scores all the candidates' suffixes in batches against it,
either as P(Yes) logits (``mode="yes"``, the head above) or as the summed log-probability of the suffix
tokens (``mode="title"``). ``shared=False`` scores every full prompt instead (the reference the shared path
must equal).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from privrec.errors import ModelError, UserError
from privrec.model import backbone
from privrec.model.backbone import default_threads, fingerprint, load_backbone
from privrec.progress import track
from privrec.prompts import PromptBuilder, answer_token_ids


@dataclass(frozen=True)
class Encoded:
    """A tokenised sample: what the model and the training loop see.

    ``ids = ids(prefix text) + ids(suffix text)`` (prompts.PromptBuilder.split); ``prefix_len`` counts the
    prefix's tokens, the part every candidate of a user shares."""

    sample_id: str
    ids: tuple[int, ...]
    label: float
    key: str  # content hash of the token ids (cache key part)
    prefix_len: int = 0
    user_id: int | None = None  # the sample's user (within-user metrics: UAUC); None when not a user's sample

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def prefix(self) -> tuple[int, ...]:
        return self.ids[: self.prefix_len]

    @property
    def suffix(self) -> tuple[int, ...]:
        return self.ids[self.prefix_len:]


@dataclass(frozen=True)
class PrefixGroup:
    """Candidates sharing one prompt prefix: candidate i's prompt is ``prefix + suffixes[i]``."""

    prefix: tuple[int, ...]
    suffixes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, items: list[Encoded]) -> PrefixGroup:
        """The group of encoded like-prompts of one user's candidates.

        Raises:
            ValueError: the items do not share their prefix."""
        if not items:
            raise ValueError("an empty candidate group")
        prefix = items[0].prefix
        if any(e.prefix != prefix for e in items):
            raise ValueError(f"{items[0].sample_id}: candidates of one group have different prompt prefixes")
        return cls(prefix, tuple(e.suffix for e in items))


@dataclass
class Batch:
    items: list[Encoded]
    input_ids: torch.Tensor | None  # (B, T) right-padded, or None when `hidden` is given
    hidden: torch.Tensor | None  # (B, T, H) cached states at the cut, or None
    attention_mask: torch.Tensor  # (B, T)
    last: torch.Tensor  # (B,) index of each prompt's last real token
    labels: torch.Tensor  # (B,) float


class FrozenCache:
    """Hidden states after the frozen bottom layers, one (T, H) tensor per prompt, in memory and on disk.

    Keyed by the base-model fingerprint, the cut layer, the compute precision and the prompt's token ids:
    a different base model, template or sample never reuses a stale entry.
    """

    def __init__(self, namespace: str, directory: Path | None = None):
        self.namespace = namespace
        self.mem: dict[str, torch.Tensor] = {}
        self.dir = directory / namespace if directory is not None else None
        self.hits = 0
        self.computed = 0

    def _path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / key[:2] / f"{key}.pt"

    def get(self, key: str) -> torch.Tensor | None:
        t = self.mem.get(key)
        if t is None and self.dir is not None:
            p = self._path(key)
            if p.is_file():
                try:
                    t = torch.load(p, weights_only=True)
                except Exception:  # a torn file from a killed run: recompute it
                    t = None
                if t is not None:
                    self.mem[key] = t
        if t is not None:
            self.hits += 1
        return t

    def put(self, key: str, value: torch.Tensor) -> None:
        self.mem[key] = value
        self.computed += 1
        if self.dir is not None:
            p = self._path(key)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            torch.save(value, tmp)
            tmp.replace(p)

    def discard(self, key: str) -> bool:
        """Drop one prompt's entry from memory and disk (e.g. the prompt of a deleted sample).

        Returns whether anything was removed."""
        found = self.mem.pop(key, None) is not None
        if self.dir is not None:
            p = self._path(key)
            if p.is_file():
                p.unlink()
                found = True
        return found


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


# a shorter common prefix is not worth a second pass; like-prompts share the system text and the instruction
MIN_SHARED_PREFIX = 8


def _common_prefix(seqs: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The longest token prefix of every sequence, leaving each at least one token of its own."""
    first, n = seqs[0], min(len(x) for x in seqs) - 1
    for x in seqs[1:]:
        i = 0
        while i < n and x[i] == first[i]:
            i += 1
        n = i
    return tuple(first[:max(n, 0)])




class RecLM:
    """A causal LM read as a Yes/No recommender, with optional LoRA and a frozen-layer cache.

    Build it with :meth:`from_config`. ``self.model`` is the (peft-wrapped once LoRA is attached) HF model.
    """

    def __init__(self, model, tokenizer, builder: PromptBuilder, precision: str = "auto",
                 max_length: int = 512, cache_dir: Path | None = None):
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
        # Called with every batch right before its forward: per-batch state that the layers read, such as
        # per-sample adapter mixture weights (privrec.model.mixture). Empty by default.
        self.batch_hooks: list[Callable[[Batch], None]] = []

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, dataset, device: torch.device | None = None, item_stats=None) -> RecLM:
        """Load the backbone of ``cfg.model`` and wire the prompt builder of ``cfg.prompt``.

        ``item_stats``: the :class:`privrec.data.ItemStats` that ``prompt.item_stats`` shows (the caller
        counts them from training labels only); required when that option is on.

        Raises:
            ModelError: the model cannot be loaded or has no decoder layers to run.
        """
        from privrec import assets

        default_threads(cfg.model.threads)
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, tok = load_backbone(cfg.model.name, cfg.model.gguf_file, device)
        builder = PromptBuilder(dataset, cfg.prompt, cfg.data.like_threshold, item_stats)
        return cls(model, tok, builder, cfg.model.precision, cfg.prompt.max_length,
                   cache_dir=assets.cache_dir() / "frozen")

    def _inner(self) -> nn.Module:
        """The decoder stack (embed_tokens, layers, norm) under any peft wrapping."""
        m = self.model
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
        inner = getattr(m, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
            raise ModelError(f"{type(m).__name__}: expected a decoder with .model.layers and .model.norm")
        return inner

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self._fingerprint = fingerprint(base)
        return self._fingerprint

    def attach_lora(self, lora_cfg, seed: int) -> None:
        """Wrap the model with a fresh peft LoRA adapter (METHODS §0: r=8, alpha=16, q/v by default).

        With ``lora_cfg.top_layers`` = L, LoRA goes on layers[N-L:] only, and with ``cache_frozen`` the
        bottom N-L layers are cached. Initialisation is seeded.
        """
        from peft import LoraConfig, get_peft_model

        if lora_cfg.top_layers is not None and lora_cfg.top_layers > self.n_layers:
            raise UserError(f"lora.top_layers={lora_cfg.top_layers} but the model has {self.n_layers} layers")
        layers = None
        if lora_cfg.top_layers is not None:
            layers = list(range(self.n_layers - lora_cfg.top_layers, self.n_layers))
        _ = self.fingerprint  # hash the base weights before peft adds its own
        pcfg = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=list(lora_cfg.target_modules), layers_to_transform=layers,
                          layers_pattern="layers" if layers else None, bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft asks the model for `is_gradient_checkpointing`, which transformers 5 deprecates in favour
            # of `is_activation_checkpointing`: a FutureWarning about peft's code, not ours (no checkpointing here)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            torch.manual_seed(seed)
            try:
                self.model = get_peft_model(self.model, pcfg)
            except ValueError as e:
                raise UserError(f"lora: {str(e).splitlines()[0]}") from None
        self.lora_config = lora_cfg
        if lora_cfg.top_layers is not None and lora_cfg.cache_frozen:
            self.enable_cache(self.n_layers - lora_cfg.top_layers)

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
            key = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
            out.append(Encoded(s.sample_id, ids, float(s.label), key, len(p_ids), s.user_id))
        return out

    # --- batching ----------------------------------------------------------------------------------
    def collate(self, items: list[Encoded]) -> Batch:
        lengths = [len(e) for e in items]
        T = max(lengths)
        mask = torch.zeros(len(items), T, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        last = torch.tensor(lengths) - 1
        labels = torch.tensor([e.label for e in items], dtype=torch.float32)
        if self.cut > 0:
            assert self.cache is not None
            H = self._inner().norm.weight.shape[0]
            states = [self.cache.get(e.key) for e in items]
            missing = [e.sample_id for e, s in zip(items, states) if s is None]
            assert not missing, f"frozen cache lacks {len(missing)} prompts (call prepare() first): {missing[:3]}"
            hidden = torch.zeros(len(items), T, H, dtype=states[0].dtype)
            for i, s in enumerate(states):
                hidden[i, : s.shape[0]] = s
            return Batch(items, None, hidden.to(self.device), mask.to(self.device), last.to(self.device),
                         labels.to(self.device))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(items), T), pad, dtype=torch.long)
        for i, e in enumerate(items):
            ids[i, : len(e)] = torch.tensor(e.ids)
        return Batch(items, ids.to(self.device), None, mask.to(self.device), last.to(self.device),
                     labels.to(self.device))

    @staticmethod
    def length_batches(items: list[Encoded], batch_size: int) -> list[list[int]]:
        """Indices grouped into batches of similar length (longest first), to waste little on padding."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]

    # --- forward -----------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _run_layers(self, start: int, end: int, input_ids=None, hidden=None, attention_mask=None):
        inner = self._inner()
        with _layer_window(inner, start, end), self._autocast():
            out = inner(input_ids=input_ids, inputs_embeds=hidden, attention_mask=attention_mask,
                        use_cache=False)
        return out.last_hidden_state  # (B, T, H), before the final norm

    def _head(self, h_last: torch.Tensor, pair: bool = False) -> torch.Tensor:
        """(B, H) last-token states -> (B,) fp32 logit difference z_yes - z_no, or with ``pair`` the (B, 2)
        raw LM-head logits [z_yes, z_no] (what a per-class logit formula such as E2URec's teacher needs)."""
        inner = self._inner()
        h = inner.norm(h_last.float())  # (B, H) final norm in fp32
        out_emb = (self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model)
        w = out_emb.get_output_embeddings().weight[[self.yes_id, self.no_id]].float()  # (2, H)
        z = h @ w.T  # (B, 2)
        return z if pair else z[:, 0] - z[:, 1]

    def _last_state(self, batch: Batch) -> torch.Tensor:
        """(B, H) last decoder layer's output at each prompt's last real token (before the final norm)."""
        for hook in self.batch_hooks:
            hook(batch)
        if batch.hidden is not None:
            h = self._run_layers(self.cut, self.n_layers, hidden=batch.hidden,
                                 attention_mask=batch.attention_mask)
        else:
            h = self._run_layers(0, self.n_layers, input_ids=batch.input_ids,
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
            return np.stack([self.cache.get(e.key)[-1].float().numpy() for e in items]).astype(np.float32)
        was_training = self.model.training
        self.model.eval()
        out = np.zeros((len(items), self._inner().norm.weight.shape[0]), dtype=np.float32)
        try:
            batches = self.length_batches(items, batch_size)
            for idx in track(batches, len(batches), "hidden states", progress):
                h = self._inner().norm(self._last_state(self.collate([items[i] for i in idx])).float())
                out[idx] = h.cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    @torch.no_grad()
    def prepare(self, items: list[Encoded], batch_size: int = 16, progress: bool = True,
                share_prefix: bool = True) -> None:
        """Fill the frozen cache for these prompts (no-op without a cache). Computed once per prompt; the
        token prefix all of them share runs once (``share_prefix=False``: every prompt whole)."""
        if self.cut == 0:
            return
        assert self.cache is not None
        todo, seen = [], set()
        for e in items:
            if e.key not in seen and self.cache.get(e.key) is None:
                todo.append(e)
                seen.add(e.key)
        if not todo:
            return
        was_training = self.model.training
        self.model.eval()
        saved_cut, self.cut = self.cut, 0  # collate token ids, not cached states
        try:
            shared = _common_prefix([e.ids for e in todo]) if share_prefix else ()
            if len(shared) >= MIN_SHARED_PREFIX:
                self._prepare_after_prefix(todo, shared, saved_cut, batch_size, progress)
                return
            batches = self.length_batches(todo, batch_size)
            for idx in track(batches, len(batches), "caching frozen layers", progress):
                b = self.collate([todo[i] for i in idx])
                h = self._run_layers(0, saved_cut, input_ids=b.input_ids, attention_mask=b.attention_mask)
                for j, i in enumerate(idx):
                    n = len(todo[i])
                    self.cache.put(todo[i].key, h[j, :n].detach().to("cpu").clone())
        finally:
            self.cut = saved_cut
            self.model.train(was_training)

    def _prepare_after_prefix(self, todo: list[Encoded], prefix: tuple[int, ...], cut: int, batch_size: int,
                              progress: bool) -> None:
        """:meth:`prepare` when every prompt starts with the same ``prefix`` (the chat template's system text
        and the instruction: ~57 of ~180 tokens of a like-prompt): the frozen layers run over the prefix
        once, and every prompt's remaining tokens run against its key-value cache. Each cache entry is the
        same (T, H) tensor as from the whole prompt (to float rounding: the attention sums split in two)."""
        from transformers import DynamicCache

        inner, dev, P = self._inner(), self.device, len(prefix)
        with _layer_window(inner, 0, cut), self._autocast():
            past = DynamicCache(config=inner.config)
            h_prefix = inner(input_ids=torch.tensor([prefix], device=dev), use_cache=True,
                             past_key_values=past).last_hidden_state[0]  # (P, H)
            kv = [(layer.keys, layer.values) for layer in past.layers[:cut]]  # per layer (1, kv_heads, P, d)
            h_prefix = h_prefix.detach().to("cpu")
            batches = self.length_batches(todo, batch_size)
            for idx in track(batches, len(batches), "caching frozen layers", progress):
                B, lengths = len(idx), [len(todo[i]) - P for i in idx]
                S = max(lengths)
                ids = torch.full((B, S), self.tokenizer.pad_token_id, dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : lengths[r]] = torch.tensor(todo[i].ids[P:])
                smask = (torch.arange(S)[None] < torch.tensor(lengths)[:, None]).long()  # (B, S)
                cache = DynamicCache(config=inner.config)
                for layer, (k, v) in enumerate(kv):
                    cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), layer)
                h = inner(input_ids=ids.to(dev), attention_mask=torch.cat([torch.ones(B, P, dtype=torch.long),
                          smask], 1).to(dev), position_ids=(P + torch.arange(S))[None].expand(B, -1).to(dev),
                          past_key_values=cache, use_cache=True).last_hidden_state  # (B, S, H)
                h = h.detach().to("cpu")
                for r, i in enumerate(idx):
                    self.cache.put(todo[i].key, torch.cat([h_prefix, h[r, : lengths[r]]]).clone())

    @torch.no_grad()
    def score_logits(self, items: list[Encoded], batch_size: int = 16, progress: bool = True,
                     pair: bool = False) -> np.ndarray:
        """z_yes - z_no for every item, in input order (the one scorer; eval mode, no dropout).

        ``pair=True``: the (N, 2) raw logits [z_yes, z_no] instead of their difference."""
        if not items:
            return np.zeros((0, 2) if pair else 0)
        self.prepare(items, batch_size, progress)
        was_training = self.model.training
        self.model.eval()
        out = np.zeros((len(items), 2) if pair else len(items), dtype=np.float64)
        try:
            batches = self.length_batches(items, batch_size)
            for idx in track(batches, len(batches), "scoring", progress):
                z = self.logits(self.collate([items[i] for i in idx]), pair)
                out[idx] = z.double().cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def score(self, items: list[Encoded], batch_size: int = 16, progress: bool = True) -> np.ndarray:
        """P(Yes) = sigmoid(z_yes - z_no) for every item, in input order."""
        z = self.score_logits(items, batch_size, progress)
        return 1.0 / (1.0 + np.exp(-z))

    # --- ranking: many candidates after one shared prefix -------------------------------------------
    @property
    def can_share_prefix(self) -> bool:
        """Whether :meth:`score_groups` may run prefixes once: not when a subclass changes the forward (the
        split model's channel) or batch hooks need whole prompts (per-sample adapter mixtures)."""
        return type(self).logits is RecLM.logits and not self.batch_hooks

    def _run_cached(self, input_ids, attention_mask, position_ids, past) -> torch.Tensor:
        """All decoder layers over ``input_ids`` after the keys/values already in ``past`` (which grows);
        (B, T, H) last layer's output before the final norm."""
        inner = self._inner()
        with _layer_window(inner, 0, self.n_layers), self._autocast():
            out = inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past, use_cache=True)
        return out.last_hidden_state

    def _title_logprob(self, states: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """sum_t mask * log softmax(lm_head(norm(states[:, t])))[targets[:, t]]: (B, S, H), (B, S), (B, S) -> (B,),
        in fp32, computed only at the real target positions."""
        sel = mask.bool()
        h = self._inner().norm(states[sel].float())  # (N, H) real positions only
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        w = base.get_output_embeddings().weight.float()  # (V, H)
        logits = h @ w.T  # (N, V)
        lp = logits.gather(1, targets[sel][:, None])[:, 0] - torch.logsumexp(logits, dim=1)  # (N,)
        out = torch.zeros(states.shape[0], dtype=torch.float32, device=states.device)
        rows = torch.arange(states.shape[0], device=states.device)[:, None].expand_as(sel)[sel]
        return out.index_add_(0, rows, lp)

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
        length. Otherwise every ``prefix + suffix`` is scored as a full prompt.
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
                return self._score_shared(groups, mode, prefix_batch, max_suffixes, progress)
            return self._score_full(groups, mode, batch_size, progress)
        finally:
            self.model.train(was_training)

    def _score_shared(self, groups: list[PrefixGroup], mode: str, prefix_batch: int, max_suffixes: int,
                      progress: bool) -> list[np.ndarray]:
        from transformers import DynamicCache

        out = [np.zeros(len(g.suffixes), dtype=np.float64) for g in groups]
        pad, dev = self.tokenizer.pad_token_id, self.device
        order = sorted(range(len(groups)), key=lambda g: -len(groups[g].prefix))  # similar prefix lengths together
        blocks = [order[i: i + prefix_batch] for i in range(0, len(order), prefix_batch)]
        for block in track(blocks, len(blocks), "ranking", progress):
            # 1. the block's prefixes, once: (U, P) right-padded -> per-layer keys/values (U, kv_heads, P, d)
            plens = torch.tensor([len(groups[g].prefix) for g in block], device=dev)  # (U,)
            P = int(plens.max())
            pids = torch.full((len(block), P), pad, dtype=torch.long, device=dev)
            for u, g in enumerate(block):
                pids[u, : plens[u]] = torch.tensor(groups[g].prefix, device=dev)
            pmask = (torch.arange(P, device=dev)[None] < plens[:, None]).long()  # (U, P)
            past = DynamicCache(config=self._inner().config)
            h = self._run_cached(pids, pmask, None, past)  # (U, P, H)
            p_last = h[torch.arange(len(block), device=dev), plens - 1]  # (U, H) predicts the suffix's 1st token
            kv = [(layer.keys, layer.values) for layer in past.layers]
            # 2. every suffix of the block's users, in chunks, against its owner's cache rows
            jobs = sorted(((u, g, j) for u, g in enumerate(block) for j in range(len(groups[g].suffixes))),
                          key=lambda t: len(groups[t[1]].suffixes[t[2]]))
            for c in range(0, len(jobs), max_suffixes):
                chunk = jobs[c: c + max_suffixes]
                owner = torch.tensor([u for u, _, _ in chunk], device=dev)  # (B,)
                sl = torch.tensor([len(groups[g].suffixes[j]) for _, g, j in chunk], device=dev)  # (B,)
                S = int(sl.max())
                sids = torch.full((len(chunk), S), pad, dtype=torch.long, device=dev)
                for b, (_, g, j) in enumerate(chunk):
                    sids[b, : sl[b]] = torch.tensor(groups[g].suffixes[j], device=dev)
                smask = (torch.arange(S, device=dev)[None] < sl[:, None]).long()  # (B, S)
                cache = DynamicCache(config=self._inner().config)
                for i, (k, v) in enumerate(kv):
                    cache.update(k.index_select(0, owner), v.index_select(0, owner), i)
                attn = torch.cat([pmask.index_select(0, owner), smask], dim=1)  # (B, P + S)
                pos = plens.index_select(0, owner)[:, None] + torch.arange(S, device=dev)[None]  # (B, S)
                hs = self._run_cached(sids, attn, pos, cache)  # (B, S, H)
                if mode == "yes":
                    scores = self._head(hs[torch.arange(len(chunk), device=dev), sl - 1])  # (B,)
                else:
                    states = torch.cat([p_last.index_select(0, owner)[:, None], hs[:, :-1]], dim=1)  # (B, S, H)
                    scores = self._title_logprob(states, sids, smask)
                vals = scores.double().cpu().numpy()  # one device -> host copy per chunk
                for b, (_, g, j) in enumerate(chunk):
                    out[g][j] = vals[b]
        return out

    def _score_full(self, groups: list[PrefixGroup], mode: str, batch_size: int, progress: bool,
                    ) -> list[np.ndarray]:
        """The reference: every candidate's whole prompt through the ordinary forward."""
        flat = [(g, j) for g in range(len(groups)) for j in range(len(groups[g].suffixes))]
        out = [np.zeros(len(g.suffixes), dtype=np.float64) for g in groups]
        items = []
        for g, j in flat:
            ids = groups[g].prefix + groups[g].suffixes[j]
            key = hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()
            items.append(Encoded(f"g{g}-c{j}", ids, 0.0, key, len(groups[g].prefix)))
        if mode == "yes":
            z = self.score_logits(items, batch_size, progress)
            for (g, j), v in zip(flat, z):
                out[g][j] = float(v)
            return out
        saved_cut, self.cut = self.cut, 0  # token ids through every layer (the frozen cache holds none of these)
        try:
            batches = self.length_batches(items, batch_size)
            for idx in track(batches, len(batches), "ranking (full prompts)", progress):
                b = self.collate([items[i] for i in idx])
                h = self._run_layers(0, self.n_layers, input_ids=b.input_ids, attention_mask=b.attention_mask)
                S = max(len(items[i].suffix) for i in idx)
                states = torch.zeros(len(idx), S, h.shape[-1], dtype=h.dtype, device=h.device)
                targets = torch.zeros(len(idx), S, dtype=torch.long, device=h.device)
                mask = torch.zeros(len(idx), S, dtype=torch.long, device=h.device)
                for r, i in enumerate(idx):
                    e = items[i]
                    n = len(e.suffix)
                    states[r, :n] = h[r, e.prefix_len - 1: e.prefix_len - 1 + n]  # position t predicts token t+1
                    targets[r, :n] = torch.tensor(e.suffix, device=h.device)
                    mask[r, :n] = 1
                lp = self._title_logprob(states, targets, mask)
                for r, i in enumerate(idx):
                    g, j = flat[i]
                    out[g][j] = float(lp[r])
        finally:
            self.cut = saved_cut
        return out

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the untuned base model (zero-shot) while a LoRA adapter is attached."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            yield
