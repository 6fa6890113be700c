"""Shared prompt prefixes: the part of a prompt that many prompts share runs once, and its key-value cache is
reused (DESIGN.md performance habits; METHODS §0 for the P(Yes) head, §1 for ranking).

One move, three users. The prefix's per-layer keys/values are kept, spread over the rows of a batch by
:func:`cache_from` (expanded without a copy, or gathered per owner), and each prompt's remaining tokens run
against them with the attention mask covering the prefix and position ids continuing after it:

- filling the frozen-layer cache (:func:`fill_after_prefix`): the bottom layers run over the prompts'
  common prefix once; the prefix's states and every prompt's states after it are stored as separate pieces;
- the one forward (``RecLM._last_state`` on a ``Batch`` with a ``SharedPrefix``, :func:`run_after_prefix`):
  the layers above the cut (or every layer, without a cache) run over the prefix once per scoring call, or
  once per training batch with grad (the expanded keys/values send each row's gradient back into the one
  prefix forward), then the batch's suffixes;
- ranking (:func:`score_shared`): each user's prefix once, all of the user's candidates against it.

Why the scores are the full prompts' scores: with causal attention, position t's state depends on tokens
<= t only, so the prefix's keys/values are the rows the whole prompt computes, and a suffix token at position
P + s sees exactly the keys of the whole prompt; only the order of the float sums changes (fp32: ~1e-6).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from privrec.model.encoding import Batch, Encoded, PrefixGroup, SharedPrefix, prompt_key
from privrec.progress import track

if TYPE_CHECKING:
    from privrec.model.recmodel import RecLM

# a shorter common prefix is not worth a second pass; like-prompts share the system text and the instruction
MIN_SHARED_PREFIX = 8

KV = list[tuple[torch.Tensor, torch.Tensor] | None]  # per decoder layer: (U, kv_heads, P, d) keys, values


def common_prefix(seqs: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The longest token prefix of every sequence, leaving each at least one token of its own."""
    first, n = seqs[0], min(len(x) for x in seqs) - 1
    for x in seqs[1:]:
        i = 0
        while i < n and x[i] == first[i]:
            i += 1
        n = i
    return tuple(first[:max(n, 0)])


def new_cache(model: RecLM):
    from transformers import DynamicCache

    return DynamicCache(config=model._inner().config)


def kv_of(cache, start: int, end: int) -> KV:
    """The keys/values a forward over layers [start, end) left in ``cache``, None for the other layers."""
    return [(layer.keys, layer.values) if start <= i < end else None for i, layer in enumerate(cache.layers)]


def cache_from(model: RecLM, kv: KV, rows: int | torch.Tensor):
    """A DynamicCache holding prefix keys/values for the rows of a batch.

    ``rows``: an int B (one prefix, U = 1, expanded to B rows: a view, no copy) or a (B,) index of each row's
    prefix among U (gathered). Layers without keys/values (they do not run in this forward) get zero-stride
    placeholders of the prefix's length: HF sizes the attention mask from layer 0's cache, which must count
    the prefix when only the top layers run."""
    pick = (lambda t: t.expand(rows, -1, -1, -1)) if isinstance(rows, int) else (lambda t: t.index_select(0, rows))
    real = [None if p is None else (pick(p[0]), pick(p[1])) for p in kv]
    k0, v0 = next(p for p in real if p is not None)
    hole = (k0.new_zeros(()).expand_as(k0), v0.new_zeros(()).expand_as(v0))
    cache = new_cache(model)
    for layer, pair in zip(cache.layers, real):
        k, v = pair if pair is not None else hole
        # set the tensors directly: DynamicLayer.update would copy them once more (a cat with an empty tensor)
        # before the forward's own cat of prefix and suffix
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def prefix_kv(model: RecLM, prefix: SharedPrefix, start: int) -> KV:
    """The prefix's keys/values in layers [start, N), computed on first use (with grad when it is enabled)
    with the adapter as it is now, and kept in ``prefix.kv``."""
    assert (prefix.hidden is None) == (start == 0), "states at the cut exactly when the bottom layers are cached"
    if prefix.kv is None:
        past = new_cache(model)
        if prefix.hidden is not None:
            model._run_layers(start, model.n_layers, hidden=prefix.hidden[None], cache=past)  # (1, P, H)
        else:
            model._run_layers(0, model.n_layers, input_ids=torch.tensor([prefix.ids], device=model.device),
                              cache=past)
        prefix.kv = kv_of(past, start, model.n_layers)
    return prefix.kv


def run_after_prefix(model: RecLM, batch: Batch, start: int) -> torch.Tensor:
    """Layers [start, N) over the batch's suffixes after its shared prefix: (B, S, H) before the final norm."""
    assert batch.prefix is not None
    P, (B, S), dev = len(batch.prefix), batch.attention_mask.shape, model.device
    cache = cache_from(model, prefix_kv(model, batch.prefix, start), B)
    mask = torch.cat([batch.attention_mask.new_ones(B, P), batch.attention_mask], 1)  # (B, P + S)
    pos = (P + torch.arange(S, device=dev))[None].expand(B, -1)  # (B, S)
    return model._run_layers(start, model.n_layers, input_ids=batch.input_ids, hidden=batch.hidden,
                             attention_mask=mask, cache=cache, position_ids=pos)


def padded(model: RecLM, seqs: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S) right-padded token ids, (B, S) mask and (B,) lengths of token sequences, on the model's device."""
    dev = model.device
    lengths = torch.tensor([len(s) for s in seqs], device=dev)
    S = int(lengths.max())
    ids = torch.full((len(seqs), S), model.tokenizer.pad_token_id, dtype=torch.long, device=dev)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, device=dev)
    mask = (torch.arange(S, device=dev)[None] < lengths[:, None]).long()
    return ids, mask, lengths


def fill_after_prefix(model: RecLM, todo: list[Encoded], prefix: tuple[int, ...], cut: int, batch_size: int,
                      progress: bool) -> None:
    """Fill the frozen cache for prompts that all start with ``prefix``: the bottom ``cut`` layers run over
    the prefix once (stored as the prefix's own entry), then every prompt's remaining tokens against its
    key-value cache (stored as the prompt's entry after the prefix)."""
    assert model.cache is not None
    P, pkey = len(prefix), prompt_key(prefix)
    past = new_cache(model)
    h = model._run_layers(0, cut, input_ids=torch.tensor([prefix], device=model.device), cache=past)  # (1, P, H)
    model.cache.put(pkey, h[0].detach().to("cpu").clone())
    kv = kv_of(past, 0, cut)
    batches = model.length_batches(todo, batch_size)
    for idx in track(batches, len(batches), "caching frozen layers", progress):
        ids, smask, lengths = padded(model, [todo[i].ids[P:] for i in idx])
        B, S = ids.shape
        h = model._run_layers(0, cut, input_ids=ids, attention_mask=torch.cat([smask.new_ones(B, P), smask], 1),
                              position_ids=(P + torch.arange(S, device=model.device))[None].expand(B, -1),
                              cache=cache_from(model, kv, B))  # (B, S, H)
        h = h.detach().to("cpu")
        for r, i in enumerate(idx):
            model.cache.put(todo[i].key, h[r, : lengths[r]].clone(), pkey, P)


# --- ranking: many candidates after each user's prefix -------------------------------------------------------
def title_logprob(model: RecLM, states: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t mask * log softmax(lm_head(norm(states[:, t])))[targets[:, t]]: (B, S, H), (B, S), (B, S) -> (B,),
    in fp32, computed only at the real target positions."""
    sel = mask.bool()
    h = model._inner().norm(states[sel].float())  # (N, H) real positions only
    w = model.base_model().get_output_embeddings().weight.float()  # (V, H)
    logits = h @ w.T  # (N, V)
    lp = logits.gather(1, targets[sel][:, None])[:, 0] - torch.logsumexp(logits, dim=1)  # (N,)
    out = torch.zeros(states.shape[0], dtype=torch.float32, device=states.device)
    rows = torch.arange(states.shape[0], device=states.device)[:, None].expand_as(sel)[sel]
    return out.index_add_(0, rows, lp)


def score_shared(model: RecLM, groups: list[PrefixGroup], mode: str, prefix_batch: int, max_suffixes: int,
                 progress: bool) -> list[np.ndarray]:
    """RecLM.score_groups' shared path: up to ``prefix_batch`` prefixes in one right-padded forward, their
    keys/values kept; their suffixes in chunks of at most ``max_suffixes``, each row against its owner's
    prefix (padding masked, positions continuing after the owner's real prefix length)."""
    out = [np.zeros(len(g.suffixes), dtype=np.float64) for g in groups]
    pad, dev, N = model.tokenizer.pad_token_id, model.device, model.n_layers
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
        past = new_cache(model)
        h = model._run_layers(0, N, input_ids=pids, attention_mask=pmask, cache=past)  # (U, P, H)
        p_last = h[torch.arange(len(block), device=dev), plens - 1]  # (U, H) predicts the suffix's 1st token
        kv = kv_of(past, 0, N)
        # 2. every suffix of the block's users, in chunks, against its owner's cache rows
        jobs = sorted(((u, g, j) for u, g in enumerate(block) for j in range(len(groups[g].suffixes))),
                      key=lambda t: len(groups[t[1]].suffixes[t[2]]))
        for c in range(0, len(jobs), max_suffixes):
            chunk = jobs[c: c + max_suffixes]
            owner = torch.tensor([u for u, _, _ in chunk], device=dev)  # (B,)
            sids, smask, sl = padded(model, [groups[g].suffixes[j] for _, g, j in chunk])  # (B, S)
            attn = torch.cat([pmask.index_select(0, owner), smask], dim=1)  # (B, P + S)
            pos = plens.index_select(0, owner)[:, None] + torch.arange(sids.shape[1], device=dev)[None]  # (B, S)
            with model.injecting(_chunk_cf(model, groups, chunk, mode), sl - 1):
                hs = model._run_layers(0, N, input_ids=sids, attention_mask=attn, position_ids=pos,
                                       cache=cache_from(model, kv, owner))  # (B, S, H)
            if mode == "yes":
                scores = model._head(hs[torch.arange(len(chunk), device=dev), sl - 1])  # (B,)
            else:
                states = torch.cat([p_last.index_select(0, owner)[:, None], hs[:, :-1]], dim=1)  # (B, S, H)
                scores = title_logprob(model, states, sids, smask)
            vals = scores.double().cpu().numpy()  # one device -> host copy per chunk
            for b, (_, g, j) in enumerate(chunk):
                out[g][j] = vals[b]
    return out


def _chunk_cf(model: RecLM, groups: list[PrefixGroup], chunk, mode: str) -> list | None:
    """The CF inputs of a chunk's candidates when the model injects them into P(Yes) scores (METHODS §12)."""
    if mode != "yes" or not model.injects:
        return None
    if any(groups[g].cf is None for _, g, _ in chunk):
        raise ValueError("a candidate group without CF inputs reached a model that injects them")
    return [groups[g].cf[j] for _, g, j in chunk]


def score_full(model: RecLM, groups: list[PrefixGroup], mode: str, batch_size: int, progress: bool,
               ) -> list[np.ndarray]:
    """The reference: every candidate's whole prompt through the ordinary forward, no prefix shared."""
    flat = [(g, j) for g in range(len(groups)) for j in range(len(groups[g].suffixes))]
    out = [np.zeros(len(g.suffixes), dtype=np.float64) for g in groups]
    items = []
    for g, j in flat:
        ids = groups[g].prefix + groups[g].suffixes[j]
        cf = groups[g].cf[j] if groups[g].cf is not None else None
        items.append(Encoded(f"g{g}-c{j}", ids, 0.0, prompt_key(ids), len(groups[g].prefix), cf=cf))
    if mode == "yes":
        with model.whole_prompts():
            z = model.score_logits(items, batch_size, progress)
        for (g, j), v in zip(flat, z):
            out[g][j] = float(v)
        return out
    saved_cut, model.cut = model.cut, 0  # token ids through every layer (the frozen cache holds none of these)
    try:
        batches = model.length_batches(items, batch_size)
        for idx in track(batches, len(batches), "ranking (full prompts)", progress):
            b = model.collate([items[i] for i in idx], prefix=None)
            h = model._run_layers(0, model.n_layers, input_ids=b.input_ids, attention_mask=b.attention_mask)
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
            lp = title_logprob(model, states, targets, mask)
            for r, i in enumerate(idx):
                g, j = flat[i]
                out[g][j] = float(lp[r])
    finally:
        model.cut = saved_cut
    return out
