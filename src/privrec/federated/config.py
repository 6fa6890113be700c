"""The ``federated`` config section (METHODS §2 PPLR, §3 FedABC), added to the core experiment config.

``train.epochs`` is the number of local epochs a client runs per round (the paper: 5); every client round
starts a fresh AdamW with ``train.lr`` and the ``train.schedule`` over that round's steps (the usual
federated choice: optimizer state is not carried across aggregations).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from privrec.config import ExperimentConfig, _Section
from privrec.model.mf import DEFAULT_DIM, DEFAULT_EPOCHS


class SplitSection(_Section):
    client_first: int = Field(
        ..., ge=1, description="Decoder layers the client runs after the token embeddings (k). At least one, "
        "so what leaves the client is never the embedding of the raw tokens.")
    client_last: int = Field(
        1, ge=1, description="Decoder layers the client runs before the final norm and the Yes/No head.")


class FederatedSection(_Section):
    clients: int = Field(5, ge=1, description="Number of clients C (METHODS §2: 5).")
    partition: Literal["kmeans", "random", "by-attribute"] = Field(
        "kmeans", description="kmeans: k-means over matrix-factorisation user embeddings (the paper); random: "
        "users dealt evenly at random; by-attribute: one group per value of `attribute`.")
    attribute: str = Field(
        "occupation", description="by-attribute: the user field (a key of the data's user records: MovieLens "
        "occupation, age or gender; a table source's users fields) that groups users (a numeric age is banded).")
    mf_dim: int = Field(DEFAULT_DIM, ge=2,
                        description="kmeans: user/item embedding size of the matrix factorisation.")
    mf_epochs: int = Field(DEFAULT_EPOCHS, ge=1,
                           description="kmeans: full-batch Adam epochs of the matrix factorisation.")
    strategy: Literal["local", "fedavg", "fedprox", "pplr", "mixture", "centralised"] = Field(
        "pplr", description="local: no aggregation; fedavg: sample-weighted mean; fedprox: fedavg + proximal "
        "term `mu`; pplr: similarity x curriculum-heating aggregation, one adapter per client (METHODS §2); "
        "mixture: clients train only on their own data, each scores with an APA mixture of all clients' "
        "adapters weighted on its own validation samples (METHODS §10: forgets exactly by construction); "
        "centralised: one adapter trained on the union of the clients' data (the reference).")
    mixture_neighbours: int = Field(20, ge=1, description="mixture: n nearest validation samples of the client "
                                    "whose errors weigh each adapter (METHODS §4).")
    mixture_tau: float = Field(1000.0, ge=0, description="mixture: softmax temperature of the weights "
                               "softmax(-tau * error) (0 = uniform).")
    mixture_aggregation: Literal["apa-nd", "apa-d"] = Field(
        "apa-nd", description="mixture: mix the adapters' updates B_k A_k x (apa-nd) or their A and B (apa-d).")
    rounds: int = Field(3, ge=1, description="Communication rounds; each runs train.epochs local epochs.")
    slices: int = Field(
        1, ge=1, description="SISA slices R inside each client (METHODS §9, §10; local and mixture only, R <= "
        "rounds): the client's training samples cut into R slices of whole users, oldest users first; round t "
        "(from 0) trains on slices 1..ceil((t + 1) R / rounds), and the adapter before the first round that sees "
        "slice s + 1 is kept as checkpoint stage-s (MODEL/slices/client-C/stage-S, with its own lineage), so a "
        "user's deletion replays only the rounds from the first one that saw their slice. 1 = unsliced.")
    mu: float = Field(0.01, ge=0, description="fedprox: weight of mu/2 * ||theta - theta_global||^2.")
    alpha: float = Field(0.7, gt=0, description="pplr: curriculum heating w_i = tanh(alpha / l~_i^(t + 1/beta)).")
    beta: float = Field(1.0, gt=0, description="pplr: heating speed (paper: 1..5); 1/beta is added to the "
                        "round index in the exponent. Always applied, also at beta = 1.")
    temperature: float = Field(0.05, gt=0, description="pplr: normalised loss l~ = softmax(loss / temperature).")
    lr_scale: bool = Field(
        False, description="pplr: scale each client's learning rate by 1 + l~_i - 1/C from the previous "
        "round's normalised losses (high-loss clients learn faster; mean scale 1). Off by default: the "
        "released code adapts learning speed only through the heating weight.")
    loss: Literal["bce", "fedabc"] = Field(
        "bce", description="Client loss: bce (the core's 2-way cross-entropy) or fedabc (METHODS §3: minority "
        "label kept, majority under-sampled to `fedabc_ratio`, hardest majority samples preferred).")
    fedabc_ratio: float = Field(1.0, gt=0, description="fedabc: kept majority : minority samples (r), per epoch "
                                "and per batch.")
    fedabc_hard: float = Field(0.5, ge=0, le=1, description="fedabc: fraction h of the kept majority taken as "
                               "the highest-loss majority samples; the rest drawn at random.")
    split: SplitSection | None = Field(
        None, description="Flexible storage, executed: the client keeps the embeddings, the first "
        "`client_first` and last `client_last` decoder layers and the head; a server object runs the middle "
        "layers. None: the client holds the whole model.")
    pooled_scores: bool = Field(
        False, description="Flower runner: evaluation replies carry every sample's P(Yes), label and user id, and "
        "the server pools them (overall AUC and UAUC as the in-process runner computes them). Off: each client "
        "replies with its own metrics only (AUC, LogLoss, accuracy, UAUC; HR@K / NDCG@K for ranking) and "
        "metrics.json's overall is computed from them (`overall_kind: client-weighted`): LogLoss, accuracy, "
        "UAUC, HR@K and NDCG@K equal the pooled values, AUC (and each round's valid_auc) is the sample-weighted "
        "mean of the client AUCs. The in-process runner holds every score and always pools.")
    valid_every_round: bool = Field(True, description="Score every client's validation samples after each "
                                    "round (the `rounds` record's overall valid AUC).")
    keep: Literal["last", "best-valid"] = Field(
        "last", description="The adapters the run ends with: those of the last round, or (best-valid) those of the "
        "round with the highest overall validation AUC (ties: the earliest), so that `rounds` is an upper bound "
        "chosen on validation, never on test. best-valid needs valid_every_round and a strategy that mixes "
        "clients (fedavg, fedprox, pplr, centralised): its forget retrains the whole federation and chooses the "
        "round again without the deleted data; a mixture or local client retrains alone, so choose their "
        "rounds on validation instead.")


class FederatedConfig(ExperimentConfig):
    federated: FederatedSection = FederatedSection()

    @model_validator(mode="after")
    def _check_federated(self) -> FederatedConfig:
        f = self.federated
        if self.collab.inject:  # prompt.item_stats / prompt.cf_score: each client counts its own (METHODS §12)
            raise ValueError("collab.inject cannot be used with federate: each client's CF vectors come from its "
                             "own MF, so one projector cannot read them all; use prompt.cf_score or set "
                             "collab.inject=false")
        if self.train.early_stopping is not None:
            raise ValueError("train.early_stopping is not used by federate (clients train train.epochs local "
                             "epochs per round); remove it")
        if f.strategy == "centralised" and f.split is not None:
            raise ValueError("federated.split needs clients; the centralised reference has none")
        if f.partition == "by-attribute" and f.attribute == "gender" and f.clients > 2:
            raise ValueError(f"federated.attribute=gender gives 2 groups; federated.clients={f.clients}")
        if f.strategy == "mixture" and f.split is not None:
            raise ValueError("federated.strategy=mixture with federated.split is not built (the mixture scores "
                             "every client adapter in one forward, on the whole model); remove federated.split")
        if f.strategy == "mixture" and self.task != "like-prediction":
            raise ValueError("federated.strategy=mixture scores like-prompts (task: like-prediction)")
        if f.slices > 1 and f.strategy not in ("local", "mixture"):
            raise ValueError(f"federated.slices needs a strategy that never mixes clients' weights (local, mixture), "
                             f"not {f.strategy}: aggregation carries every slice into every adapter")
        if f.slices > f.rounds:
            raise ValueError(f"federated.slices={f.slices} exceeds federated.rounds={f.rounds} (each slice enters at "
                             "the start of a round)")
        if f.keep == "best-valid":
            why = [w for w, bad in [
                (f"a {f.strategy} client retrains alone when it forgets", f.strategy in ("local", "mixture")),
                ("a sliced client's checkpoints follow the rounds", f.slices > 1),
                ("it needs federated.valid_every_round=true", not f.valid_every_round)] if bad]
            if why:
                raise ValueError("federated.keep=best-valid chooses a round on the whole federation's validation AUC "
                                 f"({'; '.join(why)}): use it with fedavg, fedprox, pplr or centralised, unsliced, or "
                                 "set federated.rounds from a validation curve instead")
        if f.lr_scale and f.strategy != "pplr":
            raise ValueError("federated.lr_scale is PPLR's learning-speed option: set federated.strategy=pplr")
        return self
