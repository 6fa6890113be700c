"""What the model reads: tokenised samples, candidate groups and batches (METHODS §0, §1).

A like-prompt is tokenised once as ``ids(prefix text) + ids(suffix text)`` (prompts.PromptBuilder.split) and
carried as an :class:`Encoded`; a user's candidates that share their prompt prefix form a
:class:`PrefixGroup`; the forward reads a :class:`Batch` of right-padded prompts, or of the prompts' parts
after a :class:`SharedPrefix` that all of them start with (DESIGN.md performance habits: the part of a
prompt that many prompts share runs once and its key-value cache is reused).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch


def prompt_key(ids: tuple[int, ...]) -> str:
    """Content hash of a prompt's token ids: its frozen-layer cache key part."""
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Encoded:
    """A tokenised sample: what the model and the training loop see.

    ``ids = ids(prefix text) + ids(suffix text)`` (prompts.PromptBuilder.split); ``prefix_len`` counts the
    prefix's tokens, the part every candidate of a user shares."""

    sample_id: str
    ids: tuple[int, ...]
    label: float
    key: str  # content hash of the token ids (cache key part): prompt_key(ids)
    prefix_len: int = 0
    user_id: int | None = None  # the sample's user (within-user metrics: UAUC); None when not a user's sample
    cf: tuple[float, ...] | None = None  # the CF input of its (user, item) when the model injects one (METHODS §12)

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
    cf: tuple[tuple[float, ...], ...] | None = None  # per suffix: its CF input (privrec.model.collab), or None

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
        cf = tuple(e.cf for e in items) if all(e.cf is not None for e in items) else None
        return cls(prefix, tuple(e.suffix for e in items), cf)


@dataclass
class SharedPrefix:
    """The token prefix that every prompt of a batch (training) or of a scoring call starts with.

    ``hidden`` holds its states at the frozen-layer cut when the bottom layers are cached (the layers above
    run on them); otherwise the prefix runs from its token ids through every layer. ``kv`` is filled by the
    first forward that needs it (RecLM._prefix_kv): per decoder layer the prefix's keys and values, (1,
    kv_heads, P, d), None below the cut. A scoring call keeps one for all its batches (no grad, the adapter
    as it is during the call); training makes a new one per batch, so gradients flow through the prefix."""

    ids: tuple[int, ...]
    hidden: torch.Tensor | None = None  # (P, H) states at the cut, or None
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Batch:
    """Right-padded prompts for one forward. With ``prefix`` set, every tensor covers only the part of each
    prompt after the shared prefix (the forward attends to the prefix's key-value cache first)."""

    items: list[Encoded]
    input_ids: torch.Tensor | None  # (B, T) right-padded, or None when `hidden` is given
    hidden: torch.Tensor | None  # (B, T, H) cached states at the cut, or None
    attention_mask: torch.Tensor  # (B, T)
    last: torch.Tensor  # (B,) index of each prompt's last real token (within the part after `prefix`)
    labels: torch.Tensor  # (B,) float
    prefix: SharedPrefix | None = None  # the prefix every item starts with, run once; None: whole prompts
