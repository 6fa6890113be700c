"""The projector of CF vectors into the backbone's hidden states, and where they enter (METHODS §12).

CoLLM (arXiv 2310.19488) maps a CF model's user and item embeddings with a two-layer MLP into the LLM's
token-embedding space and puts them at placeholder tokens of the prompt. privrec keeps the MLP and changes
where its output enters, so that the top-L LoRA path over cached bottom layers stays exact and fast:

- **the slot is the prompt's last token** (the answer position, whose state the Yes/No head reads), and
- **the vector enters at the cut**: it is added to that token's hidden state at the input of decoder layer
  ``N - L`` (layer 0 when LoRA covers every layer).

Why there: the bottom layers' states are cached by token ids (:mod:`privrec.model.frozen_cache`); a vector
entering at the input would change every cached state after its slot, so each (user, item) pair would need
its own cache entries, and a vector that changes with every retrain (features are data, METHODS §12) would
void them. At the cut nothing below changes, and the last token is always in each prompt's own part (never in
a prefix shared by several prompts: a training batch's common prefix, a user's prefix in ranking), so every
shared-prefix path stays valid. The layers above the cut carry LoRA and attend from the slot to the whole
prompt, which is where the text and the CF signal meet. No token is added, so a prompt costs what it did.

The projector is ``Linear(n_in, hidden) -> GELU -> Linear(hidden, H)`` with the last layer initialised to zero:
a fresh adapter scores exactly as the text-only model, and the gradient of the last layer is non-zero from the
first step (it is the slot's gradient times the hidden activations). It lives on the decoder as
``collab_proj`` and is saved with the LoRA tensors through peft's ``modules_to_save`` (so every place that
reads, writes, checkpoints, hashes or combines an adapter's tensors handles it), and it carries the adapter's
lineage.
"""

from __future__ import annotations

import torch
from torch import nn

MODULE_NAME = "collab_proj"


class CollabProjector(nn.Module):
    """(B, n_in) CF inputs -> (B, H) vectors added to the slot's hidden state."""

    def __init__(self, n_in: int, hidden: int, out: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(n_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out)
        with torch.no_grad():
            bound = 1.0 / n_in ** 0.5
            self.fc1.weight.uniform_(-bound, bound, generator=g)
            self.fc1.bias.uniform_(-bound, bound, generator=g)
            self.fc2.weight.zero_()  # a fresh projector adds nothing: the text-only model's scores
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (B, H)


def add_at(hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``hidden`` (B, T, H) with ``vectors`` (B, H) added at positions (rows, cols), out of place (grad flows
    into both)."""
    return hidden.index_put((rows, cols), vectors.to(hidden.dtype), accumulate=True)
