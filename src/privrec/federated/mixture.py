"""The ``mixture`` strategy (METHODS §10): federated learning that can forget exactly by construction.

Training: every client trains its own adapter on its own samples only, every round (no weights are mixed, so a
client adapter's lineage is that client's samples and nothing else;
:class:`~privrec.federated.strategies.Mixture` aggregates like ``local``). Inference: a client scores its
prompts with an APA mixture (METHODS §4) of *all* clients' adapters, the weights of each prompt computed from
the adapters' errors on its nearest validation samples of that client alone (the untuned model's last hidden
states, cosine similarity, ``softmax(-tau * error)``): the adapters travel, as in FedAvg; no sample leaves its
client.

Forgetting follows (``privrec forget``, :mod:`privrec.federated.forget`): a user leaving retrains their
client's adapter alone; a client leaving drops its adapter. The other adapters stay bit-identical.

:func:`mixture_scores` is the one definition, used by the runner's clients
(:meth:`privrec.federated.client.FederatedClient.predict_mixture`) and by a saved model's scorer
(:class:`privrec.recommender.ClientMixture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from privrec.model.mixture import score_mixture
from privrec.model.recmodel import Encoded, RecLM
from privrec.unlearning.exact.apa import apa_weights, score_each, uniform_weights


def untuned_features(model: RecLM, items: list[Encoded], batch_size: int, progress: bool) -> np.ndarray:
    """(N, H) last-layer, last-token hidden states of the untuned model (APA's neighbour features)."""
    if not items:
        return np.zeros((0, 1), dtype=np.float32)
    with model.adapter_disabled():
        return model.last_hidden(items, "final", batch_size, progress)


@dataclass
class Pool:
    """One client's neighbour pool: its validation samples' untuned features, every adapter's P(Yes) on them,
    and their labels (computed once per set of adapters)."""

    features: np.ndarray  # (M, H)
    probs: np.ndarray  # (M, K)
    labels: np.ndarray  # (M,)


def client_pool(model: RecLM, valid: list[Encoded], states: Sequence[dict[str, torch.Tensor]], batch_size: int,
                progress: bool, features: np.ndarray | None = None) -> Pool:
    f = untuned_features(model, valid, batch_size, progress) if features is None else features
    probs = score_each(model, valid, states, batch_size, progress) if valid else np.zeros((0, len(states)))
    return Pool(f, probs, np.array([e.label for e in valid], dtype=np.float64))


def mixture_weights(fcfg, query: np.ndarray, pool: Pool, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """(N, K) weights over the K adapters for each query prompt (uniform when the client has no validation
    sample to weigh them on; ``exclude``: each query's own pool row, so a validation sample is not its own
    neighbour, :func:`~privrec.unlearning.exact.apa.self_in_pool`)."""
    if len(pool.labels) == 0:
        return uniform_weights(len(query), k)
    return apa_weights(query, pool.features, pool.probs, pool.labels, fcfg.mixture_neighbours, fcfg.mixture_tau,
                       "abs", exclude)


def mixture_scores(model: RecLM, items: list[Encoded], pool: Pool, states: Sequence[dict[str, torch.Tensor]],
                   fcfg, batch_size: int, progress: bool, features: np.ndarray | None = None,
                   exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(P(Yes) of ``items`` under the mixture of ``states`` weighted on ``pool``, the (N, K) weights)."""
    if not items:
        return np.zeros(0), np.zeros((0, len(states)))
    f = untuned_features(model, items, batch_size, progress) if features is None else features
    omega = mixture_weights(fcfg, f, pool, len(states), exclude)
    mode = "d" if fcfg.mixture_aggregation == "apa-d" else "nd"
    return score_mixture(model, items, list(states), omega, mode, batch_size, progress), omega


def own_weight(omega: np.ndarray, cids: list[int], cid: int) -> float:
    """Mean mixture weight a client's prompts give its own adapter (columns of ``omega`` in ``cids`` order)."""
    return float(omega[:, cids.index(cid)].mean()) if len(omega) else float("nan")
