"""Aggregation strategies (METHODS §2): pure functions over LoRA tensor dicts, and one small class each.

A *state* is ``{tensor name: tensor}`` (an adapter, see :mod:`privrec.model.adapters`). The maths lives in
pure functions (``weighted_average``, ``pplr_mixing``, ``mix``), tested with no model. A strategy class
only says, for a round, what each client is told (:meth:`Strategy.instructions`) and how the states the
clients send back become the states they start the next round with (:meth:`Strategy.aggregate`).

Failed clients are simply absent from ``updates``: they are left out of that round's aggregation. A
personalised strategy leaves their state as it was; a global one sends them the new global state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from privrec.errors import AggregationError

State = dict[str, torch.Tensor]


# --- pure functions -------------------------------------------------------------------------------------
def _check_same_keys(states: list[State]) -> list[str]:
    if not states:
        raise AggregationError("no adapter states to aggregate")
    keys = sorted(states[0])
    for s in states[1:]:
        if sorted(s) != keys:
            raise AggregationError("the adapters hold different tensors (trained with different LoRA settings?)")
    return keys


def flatten(state: State) -> torch.Tensor:
    """All tensors of a state, in sorted-name order, as one float64 vector (for similarities)."""
    return torch.cat([state[k].detach().reshape(-1).double() for k in sorted(state)])


def weighted_average(states: list[State], weights: list[float]) -> State:
    """sum_i w_i theta_i / sum_i w_i, tensor by tensor (FedAvg with w_i = n_i, METHODS §2)."""
    keys = _check_same_keys(states)
    w = np.asarray(weights, dtype=np.float64)
    if not (len(w) == len(states) and (w >= 0).all() and w.sum() > 0):
        raise AggregationError(f"aggregation weights must be one non-negative weight per adapter, not all zero: "
                               f"{list(weights)}")
    w = w / w.sum()
    out = {}
    for k in keys:
        acc = torch.zeros_like(states[0][k], dtype=torch.float64)
        for wi, s in zip(w, states):
            acc += float(wi) * s[k].double()
        out[k] = acc.to(states[0][k].dtype)
    return out


def cosine_similarity_matrix(states: list[State]) -> np.ndarray:
    """S_ij = (cos(theta_i, theta_j) + 1) / 2 over the flattened states (METHODS §2 step 1); S_ii = 1."""
    _check_same_keys(states)
    X = torch.stack([flatten(s) for s in states])  # (C, P) float64
    norms = X.norm(dim=1).clamp_min(1e-300)
    cos = (X @ X.T) / (norms[:, None] * norms[None, :])  # (C, C)
    S = ((cos.clamp(-1.0, 1.0) + 1.0) / 2.0).numpy()
    np.fill_diagonal(S, 1.0)
    return S


def normalised_losses(losses: list[float], temperature: float) -> np.ndarray:
    """l~ = softmax(l / temperature) over clients (METHODS §2 step 2)."""
    z = np.asarray(losses, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def heating_weights(norm_losses: np.ndarray, rnd: int, alpha: float, beta: float) -> np.ndarray:
    """w_i = tanh(alpha / l~_i ^ (t + 1/beta)), t = the round index from 0 (METHODS §2 step 3).

    A client whose normalised loss is near 1 gets w ~ tanh(alpha) early; as t grows l~^(t + 1/beta) shrinks
    and w -> 1. A loss that underflows to l~ = 0 gives w = 1 (alpha / 0 = inf)."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.tanh(alpha / np.power(norm_losses, rnd + 1.0 / beta))


def pplr_mixing(states: list[State], losses: list[float], rnd: int, alpha: float, beta: float,
                temperature: float) -> np.ndarray:
    """The row-normalised PPLR mixing matrix M (METHODS §2 steps 1-5): theta_i <- sum_j M_ij theta_j.

    S_ij = (cos + 1) / 2; S_ij *= w_i for j != i (the curriculum weight is always applied, also when
    beta == 1); M_ij = S_ij / sum_j S_ij.
    """
    S = cosine_similarity_matrix(states)
    w = heating_weights(normalised_losses(losses, temperature), rnd, alpha, beta)
    off = ~np.eye(len(states), dtype=bool)
    S = np.where(off, S * w[:, None], S)
    return S / S.sum(axis=1, keepdims=True)


def mix(states: list[State], M: np.ndarray) -> list[State]:
    """theta_i <- sum_j M_ij theta_j for every row i of M (float64 accumulation, j in order)."""
    keys = _check_same_keys(states)
    out = []
    for i in range(M.shape[0]):
        new = {}
        for k in keys:
            acc = torch.zeros_like(states[0][k], dtype=torch.float64)
            for j in range(M.shape[1]):
                acc += float(M[i, j]) * states[j][k].double()
            new[k] = acc.to(states[0][k].dtype)
        out.append(new)
    return out


# --- strategies -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Update:
    """What a client reports after its local epochs: its state, last-epoch mean training loss, sample count."""

    state: State
    loss: float
    n_train: int


@dataclass(frozen=True)
class Instructions:
    """What a client is told for a round, besides the state it starts from."""

    rnd: int
    seed: int
    mu: float = 0.0  # FedProx proximal weight (0 = off)
    lr_scale: float = 1.0


class Strategy:
    """One interface: ``instructions`` before a round, ``aggregate`` after it.

    ``personalised``: one adapter per client (else all clients share one global state after aggregation).
    ``pooled``: training runs on one client holding the union of the data (the centralised reference).
    ``mixes``: aggregation puts other clients' weights into a client's adapter (its lineage is every
    contributing client's samples; else only its own).
    """

    name: ClassVar[str] = ""
    personalised: ClassVar[bool] = False
    pooled: ClassVar[bool] = False
    mixes: ClassVar[bool] = True

    def __init__(self, fcfg=None):
        self.cfg = fcfg

    def instructions(self, rnd: int, cid: int, seed: int, last_losses: Mapping[int, float]) -> Instructions:
        return Instructions(rnd=rnd, seed=seed)

    def aggregate(self, rnd: int, states: Mapping[int, State], updates: Mapping[int, Update]) -> dict[int, State]:
        """Next round's state for every client in ``states``; ``updates`` holds the clients that succeeded."""
        raise NotImplementedError


class Local(Strategy):
    """No aggregation: every client keeps what it trained."""

    name, personalised, mixes = "local", True, False

    def aggregate(self, rnd, states, updates):
        return {c: (updates[c].state if c in updates else states[c]) for c in states}


class Centralised(Local):
    """The reference: one adapter trained on the union of the clients' data (the runner pools the data)."""

    name, personalised, pooled = "centralised", False, True


class Mixture(Local):
    """METHODS §10: train like ``local`` (no weights mixed, ever); every client scores with an APA mixture of
    all clients' adapters weighted on its own validation samples (:mod:`privrec.federated.mixture`)."""

    name = "mixture"


class FedAvg(Strategy):
    """theta = sum_i n_i theta_i / sum_i n_i over the clients that reported; everyone gets theta."""

    name = "fedavg"

    def aggregate(self, rnd, states, updates):
        if not updates:
            return dict(states)
        cids = sorted(updates)
        theta = weighted_average([updates[c].state for c in cids], [updates[c].n_train for c in cids])
        return {c: theta for c in states}


class FedProx(FedAvg):
    """FedAvg plus one config value: clients add mu/2 * ||theta - theta_global||^2 to their loss."""

    name = "fedprox"

    def instructions(self, rnd, cid, seed, last_losses):
        return Instructions(rnd=rnd, seed=seed, mu=self.cfg.mu)


class PPLR(Strategy):
    """Dynamic aggregation, one personalised adapter per client (METHODS §2 steps 1-5)."""

    name, personalised = "pplr", True

    def mixing(self, rnd: int, cids: list[int], updates: Mapping[int, Update]) -> np.ndarray:
        return pplr_mixing([updates[c].state for c in cids], [updates[c].loss for c in cids], rnd,
                           self.cfg.alpha, self.cfg.beta, self.cfg.temperature)

    def aggregate(self, rnd, states, updates):
        out = dict(states)  # failed clients keep their state
        cids = sorted(updates)
        if not cids:
            return out
        mixed = mix([updates[c].state for c in cids], self.mixing(rnd, cids, updates))
        out.update(zip(cids, mixed))
        return out

    def instructions(self, rnd, cid, seed, last_losses):
        scale = 1.0
        if self.cfg.lr_scale and cid in last_losses and len(last_losses) > 1:
            cids = sorted(last_losses)
            nl = normalised_losses([last_losses[c] for c in cids], self.cfg.temperature)
            scale = float(1.0 + nl[cids.index(cid)] - 1.0 / len(cids))
        return Instructions(rnd=rnd, seed=seed, lr_scale=scale)


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Local, Centralised, Mixture, FedAvg, FedProx, PPLR)}


def make_strategy(fcfg) -> Strategy:
    return STRATEGIES[fcfg.strategy](fcfg)


def aggregate_parts(strategy: Strategy, rnd: int, states: Mapping[int, State], updates: Mapping[int, Update],
                    is_client_tensor=None) -> dict[int, State]:
    """Aggregate with ``strategy``; with a split, the client-side and the server-side tensors separately.

    Under the executed split the server keeps each client's middle-layer LoRA; those are aggregated with
    the same strategy as the client-side ones, each part on its own (for PPLR: its own similarities,
    the same losses and heating weights).
    """
    if is_client_tensor is None:
        return strategy.aggregate(rnd, states, updates)
    parts = []
    for side in (True, False):
        def pick(s: State, side=side) -> State:
            return {k: v for k, v in s.items() if bool(is_client_tensor(k)) == side}
        sub_states = {c: pick(s) for c, s in states.items()}
        if not next(iter(sub_states.values()), {}):
            continue  # nothing on this side (e.g. no LoRA on the server's layers)
        sub_updates = {c: Update(pick(u.state), u.loss, u.n_train) for c, u in updates.items()}
        parts.append(strategy.aggregate(rnd, sub_states, sub_updates))
    return {c: {k: v for p in parts for k, v in p[c].items()} for c in states}
