"""The frozen-layer cache: hidden states after the frozen bottom layers, per prompt, in memory and on disk.

With LoRA on the top layers only, the bottom layers' output for a prompt never changes, so it is computed
once and reused across epochs, shards, clients and teachers (DESIGN.md performance habits). Entries are
keyed by the content hash of the prompt's token ids inside a namespace of (base weights, cut layer,
precision): a different base model, template or sample never reuses a stale entry.

When many prompts start with the same tokens (the chat template's system text and the instruction, ~57 of
~180 tokens of a like-prompt), those prefix states are stored once: a prompt's entry then holds only its
rows after the prefix and names the prefix's own entry (the prefix is a prompt of its own, so its entry may
in turn be split). :meth:`FrozenCache.states` joins the pieces; :meth:`FrozenCache.discard` removes a
prompt's entry together with the prefix entries it leans on, so forgetting a sample leaves nothing computed
from its tokens (other prompts recompute the shared prefix, one short forward, at their next prepare).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Entry:
    """One stored piece: the prompt's states from position ``prefix_len`` on, after the prefix entry
    ``prefix`` (None with ``prefix_len`` 0: the whole prompt)."""

    states: torch.Tensor  # (T - prefix_len, H)
    prefix: str | None = None
    prefix_len: int = 0


class FrozenCache:
    """Hidden states after the frozen bottom layers, one :class:`Entry` per prompt key.

    On disk an entry of a whole prompt is a (T, H) tensor, a split one a dict of its states, prefix key and
    prefix length (both read with ``weights_only``)."""

    def __init__(self, namespace: str, directory: Path | None = None):
        self.namespace = namespace
        self.mem: dict[str, Entry] = {}
        self.dir = directory / namespace if directory is not None else None
        self.hits = 0
        self.computed = 0

    def _path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / key[:2] / f"{key}.pt"

    def entry(self, key: str) -> Entry | None:
        e = self.mem.get(key)
        if e is None and self.dir is not None:
            p = self._path(key)
            if p.is_file():
                try:
                    raw = torch.load(p, weights_only=True)
                    e = Entry(raw) if isinstance(raw, torch.Tensor) else Entry(
                        raw["states"], raw["prefix"], int(raw["prefix_len"]))
                except Exception:  # a torn file from a killed run: recompute it
                    e = None
                if e is not None:
                    self.mem[key] = e
        if e is not None:
            self.hits += 1
        return e

    def states(self, key: str, start: int = 0) -> torch.Tensor | None:
        """(T - start, H) states of the prompt ``key`` from position ``start`` on, the split pieces joined;
        None when a piece is missing."""
        e = self.entry(key)
        if e is None:
            return None
        if start >= e.prefix_len:
            return e.states[start - e.prefix_len:]
        head = self.states(e.prefix, start)
        return None if head is None else torch.cat([head, e.states])

    def missing(self, ids: tuple[int, ...], key: str) -> tuple[tuple[int, ...], str] | None:
        """The (ids, key) of the first piece that prompt ``ids`` lacks (itself or a prefix it leans on, e.g.
        after a :meth:`discard` of another prompt), or None when :meth:`states` can join it."""
        e = self.entry(key)
        if e is None:
            return ids, key
        if e.prefix is None:
            return None
        return self.missing(ids[: e.prefix_len], e.prefix)

    def put(self, key: str, states: torch.Tensor, prefix: str | None = None, prefix_len: int = 0) -> None:
        """Store a prompt's states (its rows after the prefix entry ``prefix`` of ``prefix_len`` tokens)."""
        assert (prefix is None) == (prefix_len == 0), "a split entry names its prefix and the prefix's length"
        self.mem[key] = Entry(states, prefix, prefix_len)
        self.computed += 1
        if self.dir is not None:
            p = self._path(key)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            torch.save(states if prefix is None else {"states": states, "prefix": prefix, "prefix_len": prefix_len},
                       tmp)
            tmp.replace(p)

    def discard(self, key: str) -> bool:
        """Drop one prompt's entry from memory and disk (e.g. the prompt of a deleted sample), and the prefix
        entries it leans on (computed from its first tokens too).

        Returns whether anything was removed."""
        e = self.entry(key)
        found = self.mem.pop(key, None) is not None
        if self.dir is not None:
            p = self._path(key)
            if p.is_file():
                p.unlink()
                found = True
        if e is not None and e.prefix is not None:
            self.discard(e.prefix)
        return found
