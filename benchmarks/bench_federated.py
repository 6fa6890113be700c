"""Federated LLMRec on ML-100K with SmolLM2 (METHODS §2, §3): the results table and the split's costs.

    python benchmarks/bench_federated.py table [--runs runs/federated]   # -> docs/results.md, docs/img/
    python benchmarks/bench_federated.py split [--runs runs/federated]   # -> docs/benchmarks.md
    python benchmarks/bench_federated.py all                             # both
    python benchmarks/bench_federated.py forget [--runs runs/federated]  # -> docs/federated.md
    python benchmarks/bench_federated.py features --runs runs/federated-features   # -> docs/results.md

``table``: centralised, local, FedAvg, FedProx, PPLR and PPLR + FedABC on exactly the same samples and the
same C = 5 k-means clients (configs/pplr-ml100k.yaml): overall AUC, per-client AUC, std / min / gap, the
history like-rate reference per client on the same test samples, and a plot of per-client AUC by method.
Each method is one ``privrec federate`` run directory under ``--runs``; a method whose run directory already
holds metrics.json for the same config is not run again (an interrupted benchmark continues).

``features``: FedAvg, PPLR and mixture with client-local counted features (:data:`FEATURES`; METHODS §12):
each client's prompts show the target item's like-rate counted over its own users' share of the training pool.

``forget``: federated forgetting (METHODS §10) on the mixture and PPLR runs of the table (the same clients
and samples): their quality side by side with the like-rate reference; then, each on a fresh copy of its run
with ``privrec forget``'s own code, single-user requests drawn as METHODS §8 says (core: the most training
samples, edge: the fewest, random: seeded; PPLR, whose every request is a full federated retrain, only the
random one) and one client leaving (the client of the random user), against a full federated retrain of the
mixture without the random user timed in the same process; then the same users on a mixture whose clients are
cut into 4 slices (``federated.slices=4``, METHODS §9: a request replays from the checkpoint before the user's
slice), against that model's own full retrain; certificate and ``--verify`` for each. Results go into
``RUNS/forget.json`` as they are measured (an interrupted benchmark continues; ``--part sliced`` /
``unsliced`` runs one half).

``split``: the executed layer split (client: embeddings, first k layers, last m layers, head):
client parameters vs the whole model; client resident memory before training and at its peak during training
steps, measured in a process that loads only the client's tensors and reaches a server process (which loads
only the middle layers' tensors) over a pipe, vs a process training the whole model, both whole and minus what
the process holds before its model is built; bytes crossing per training sample; seconds per round split vs
unsplit (in-process runner, same samples). Sizes are printed next to every table.

    python benchmarks/bench_federated.py memory [--set KEY=VALUE ...]

prints the memory rows alone (JSON: the two processes' measurements, and the client's shares), without the
runs of the split table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import re
import sys
import time
from pathlib import Path

import numpy as np
from cachekeep import kept_cache
from mdsection import publish

from privrec.config import load_config
from privrec.federated.config import FederatedConfig
from privrec.federated.runner import plan_federation, run_federate
from privrec.metrics import auc
from privrec.prepare import machine
from privrec.rundir import CONFIG_FILE, METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]
ARGS = argparse.Namespace(config=ROOT / "configs" / "pplr-ml100k.yaml", set=[])  # set by main()
METHODS = [  # (row name, --set overrides on top of the config)
    ("centralised", ["federated.strategy=centralised"]),
    ("local", ["federated.strategy=local"]),
    ("FedAvg", ["federated.strategy=fedavg"]),
    ("FedProx", ["federated.strategy=fedprox"]),
    ("PPLR", ["federated.strategy=pplr"]),
    ("PPLR + FedABC", ["federated.strategy=pplr", "federated.loss=fedabc"]),
    ("mixture", ["federated.strategy=mixture"]),
]
# client-local counted features (METHODS §12, issue 35): the history summary (the user's own data) and the target
# item's like-rate counted over the client's own users' share of the training pool (no label crosses clients)
FEATURES = ["prompt.history_summary=true", "prompt.item_stats=true"]
# rounds chosen on validation (issue 35): FedAvg's and PPLR's validation AUC still rose at round 4 of 4, so they run
# up to 8 and keep the round that validates best (federated.keep=best-valid, which their federated retrain repeats);
# a mixture client retrains alone, so its rounds come from the 4-round run's validation curve (peak at round 3)
FEATURE_ROUNDS = {"FedAvg": ["federated.rounds=8", "federated.keep=best-valid"],
                  "PPLR": ["federated.rounds=8", "federated.keep=best-valid"],
                  "mixture": ["federated.rounds=3"]}
FEATURE_METHODS = [(name, ov + FEATURE_ROUNDS[name]) for name, ov in METHODS if name in FEATURE_ROUNDS]
SLICED = ("mixture, 4 slices", ["federated.strategy=mixture", "federated.slices=4"])  # forget: METHODS §9 in a client
# The split table: a smaller sample, one round, k = 2 client layers at the bottom, m = 1 at the top.
SPLIT_SIZES = ["data.n_train=160", "data.n_valid=40", "data.n_test=100", "federated.rounds=1",
               "federated.valid_every_round=false", "federated.strategy=pplr"]
SPLIT = ["federated.split.client_first=2", "federated.split.client_last=1"]
MEMORY_SAMPLES = 32


def config(overrides: list[str]) -> FederatedConfig:
    return load_config(ARGS.config, ARGS.set + overrides, cls=FederatedConfig)


def run_once(name: str, overrides: list[str], runs: Path, progress: bool) -> dict:
    """One federate run directory per row; reused when it already holds metrics for the same config."""
    cfg = config(overrides)
    out = runs / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    done = (out / METRICS_FILE).is_file() and (out / CONFIG_FILE).is_file()
    if done and load_config(out / CONFIG_FILE, cls=FederatedConfig).digest() == cfg.digest():
        print(f"{name}: reusing {out}", file=sys.stderr)
        return json.loads((out / METRICS_FILE).read_text())
    print(f"{name}: running -> {out}", file=sys.stderr)
    return run_federate(cfg, out, progress=progress)


def fmt(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


# --- the results table ----------------------------------------------------------------------------------
def like_rate_reference(cfg) -> tuple[float, list[float]]:
    """The history like-rate (METHODS §0 reference a) on the same test samples: overall and per client."""
    fed = plan_federation(cfg)
    thr = cfg.data.like_threshold
    overall = auc([s.label for s in fed.splits.test], [s.history_like_rate(thr) for s in fed.splits.test])
    per = []
    for c in fed.clients:
        te = fed.samples(c)[2]
        per.append(auc([s.label for s in te], [s.history_like_rate(thr) for s in te]))
    return overall, per


def plot(rows: list[tuple[str, dict]], ref: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows[0][1]["clients"])
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(rows)
    for i, (name, m) in enumerate(rows):
        vals = [c["auc"] if c["auc"] is not None else np.nan for c in m["clients"]]
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=name)
    ax.plot(x, ref, "k_", markersize=28, markeredgewidth=2, label="history like-rate (reference)")
    ax.set_xticks(x, [f"client {c}" for c in range(n)])
    ax.set_ylabel("test AUC")
    ax.set_ylim(0.3, 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title("Per-client test AUC by method (ML-100K, SmolLM2-135M, 5 k-means clients)")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def results_table(runs: Path, progress: bool, methods=METHODS, features: bool = False) -> str:
    """The table of ``methods``; ``features``: every run with :data:`FEATURES` (client-local counted features)."""
    t0 = time.perf_counter()
    extra = FEATURES if features else []
    rows = [(name, run_once(name, ov + extra, runs, progress)) for name, ov in methods]
    cfg = config(extra)
    ref_overall, ref_clients = like_rate_reference(cfg)
    n = len(rows[0][1]["clients"])
    head = ["method", "overall AUC", "LogLoss"] + [f"client {c}" for c in range(n)] + ["std", "min", "gap",
                                                                                      "rounds (kept)", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows:
        b = m["balance"]
        lines.append("| " + " | ".join([name, fmt(m["overall"]["auc"]), fmt(m["overall"]["logloss"])]
                                       + [fmt(c["auc"]) for c in m["clients"]]
                                       + [fmt(b["std"]), fmt(b["min"]), fmt(b["gap"]),
                                          f"{len(m['rounds'])} ({m.get('kept_round', len(m['rounds']))})",
                                          f"{m['train_seconds']:.0f}"]) + " |")
    ra = np.array(ref_clients, dtype=float)
    lines.append("| " + " | ".join(["reference: history like-rate", fmt(ref_overall), "-"]
                                   + [fmt(v) for v in ref_clients]
                                   + [fmt(np.nanstd(ra)), fmt(np.nanmin(ra)), fmt(np.nanmax(ra) - np.nanmin(ra)),
                                      "-", "-"]) + " |")
    clients = rows[0][1]["clients"]
    f = cfg.federated
    sizes = (f"Sizes: all-users protocol, {cfg.data.n_train} training / {cfg.data.n_valid} validation / "
             f"{cfg.data.n_test} test samples (the same for every row), {f.clients} k-means clients "
             f"(MF dim {f.mf_dim}) with " + ", ".join(f"{c['n_train']}/{c['n_test']}" for c in clients)
             + f" train/test samples; {' / '.join(sorted({str(len(m['rounds'])) for _, m in rows}))} rounds x "
             f"{cfg.train.epochs} local epoch(s) (a row's kept round in brackets), batch "
             f"{cfg.train.batch_size}, lr {cfg.train.lr:g}, LoRA r={cfg.lora.r} on the top {cfg.lora.top_layers} "
             f"layers (bottom layers cached); PPLR alpha {f.alpha}, beta {f.beta}, T {f.temperature}; FedProx mu "
             f"{f.mu}; FedABC r {f.fedabc_ratio}, h {f.fedabc_hard}. Centralised trains one adapter on the union "
             "for the same rounds x epochs.")
    most = max(len(m["rounds"]) for _, m in rows)
    rounds = ["| method | " + " | ".join(f"valid AUC r{r + 1}" for r in range(most)) + " |", "|" + "---|" * (1 + most)]
    rounds += ["| " + " | ".join([name] + [("**" + fmt(r.get("valid_auc")) + "**") if r.get("kept") else
                                           fmt(r.get("valid_auc")) for r in m["rounds"]]
                                 + ["-"] * (most - len(m["rounds"]))) + " |" for name, m in rows]
    title, what, img = ("Federated LLMRec: quality and balance across clients (METHODS §2, §3)", "table",
                        "federated_client_auc.png")
    if features:
        title, what, img = ("Federated LLMRec with client-local counted features (METHODS §2, §10, §12)",
                            "features", "federated_client_auc_features.png")
    body = "\n".join([
        f"### {title}", "",
        (f"Config `{Path(ARGS.config).name}`{' with ' + ' '.join(ARGS.set + extra) if ARGS.set + extra else ''}; "
         f"command `python benchmarks/bench_federated.py {what}`; machine: "
         f"{machine()}; wall time {time.perf_counter() - t0:.0f}s."), "", sizes, "",
        *lines, "",
        "Validation AUC after each round (the overall valid AUC the runs record; what picks the rounds):", "",
        *rounds, "",
        f"![per-client AUC by method](img/{img})",
    ])
    plot(rows, ref_clients, Path(ARGS.docs) / "img" / img)
    return body


# --- the split's costs ----------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _before_model_kb(cfg) -> int:
    """VmRSS of this process with the libraries its model needs imported and the data loaded: what a process
    holds before its model is built (the part of its memory that no split can shrink)."""
    import peft  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from privrec.model.backbone import resolve_model_path

    kwargs = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
    _ = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(resolve_model_path(cfg.model.name), **kwargs))]
    gc.collect()
    return _status_kb("VmRSS")


def _train_steps(model, cfg, items, seed: int = 0) -> None:
    """One epoch over ``items`` (tokenised beforehand), filling the frozen cache first."""
    from privrec.train import train

    model.prepare(items, cfg.train.eval_batch_size, progress=False)
    train(model, items, cfg.train.model_copy(update={"epochs": 1, "checkpoint": False}), seed, progress=False)


def _whole_worker(cfg_yaml: str, q) -> None:
    import yaml

    from privrec.config import parse_config
    from privrec.federated.runner import build_model
    from privrec.prepare import setup_data

    cfg = parse_config(yaml.safe_load(cfg_yaml), FederatedConfig)
    splits = setup_data(cfg)
    base = _before_model_kb(cfg)
    model = build_model(cfg, splits)
    items = model.encode(splits.train[:MEMORY_SAMPLES])
    del splits
    gc.collect()
    ok = _reset_peak()
    rss0 = _status_kb("VmRSS")
    _train_steps(model, cfg, items)
    q.put({"base_mb": base / 1024, "rss_before_mb": rss0 / 1024, "peak_mb": _status_kb("VmHWM") / 1024,
           "reset": ok, "parameters_held": sum(p.numel() for p in model.model.parameters())})


def _server_worker(cfg_yaml: str, conn) -> None:
    """The server alone: it loads only the middle layers' tensors, with the same seeded LoRA init."""
    import torch
    import yaml

    from privrec.config import parse_config
    from privrec.federated.split import SplitServer
    from privrec.model.backbone import default_threads, layer_count

    cfg = parse_config(yaml.safe_load(cfg_yaml), FederatedConfig)
    default_threads(cfg.model.threads)
    split, n = cfg.federated.split, layer_count(cfg.model.name, cfg.model.gguf_file)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    server = SplitServer.load(cfg.model, split.client_first, n - split.client_last, device)
    server.attach_lora(cfg.lora, cfg.seed)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        kind, payload = msg
        conn.send(server(kind, payload))


def _client_worker(cfg_yaml: str, conn, q) -> None:
    """The client alone: it loads only its own tensors (the middle layers stay meta) and reaches the server
    over the pipe."""
    import yaml

    from privrec.config import parse_config
    from privrec.federated.split import SplitRecLM
    from privrec.prepare import build_model, setup_data

    def over_pipe(kind: str, payload: bytes) -> bytes:
        conn.send((kind, payload))
        return conn.recv()

    cfg = parse_config(yaml.safe_load(cfg_yaml), FederatedConfig)
    splits = setup_data(cfg)
    base = _before_model_kb(cfg)
    split = cfg.federated.split
    model = build_model(cfg, splits.dataset, cls=SplitRecLM, before_lora=lambda m: m.configure_split(
        split.client_first, split.client_last, handler=over_pipe))
    items = model.encode(splits.train[:MEMORY_SAMPLES])
    del splits
    assert conn.recv() == "ready"
    gc.collect()
    ok = _reset_peak()
    rss0 = _status_kb("VmRSS")
    held = sum(p.numel() for p in model.model.parameters() if p.device.type != "meta")
    _train_steps(model, cfg, items)
    conn.send(None)
    q.put({"base_mb": base / 1024, "rss_before_mb": rss0 / 1024, "peak_mb": _status_kb("VmHWM") / 1024,
           "reset": ok, "parameters_held": held, "bytes": model.channel.total_bytes})


def memory_shares(whole: dict, client: dict) -> dict:
    """Client / whole model, of the resident memory before training and at the peak, each whole and minus
    what the process held before its model was built."""
    out = {}
    for key in ("rss_before_mb", "peak_mb"):
        out[key] = client[key] / whole[key]
        out[key + "_model_only"] = (client[key] - client["base_mb"]) / (whole[key] - whole["base_mb"])
    return out


def measure_memory(split_overrides: list[str]) -> tuple[dict, dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    cfg_yaml = config(SPLIT_SIZES).to_yaml()
    p = ctx.Process(target=_whole_worker, args=(cfg_yaml, q))
    p.start()
    whole = q.get()
    p.join()
    split_yaml = config(SPLIT_SIZES + split_overrides).to_yaml()
    a, b = ctx.Pipe()
    server = ctx.Process(target=_server_worker, args=(split_yaml, b))
    client = ctx.Process(target=_client_worker, args=(split_yaml, a, q))
    server.start()
    client.start()
    split = q.get()
    client.join()
    server.join()
    return whole, split


def split_table(runs: Path, progress: bool) -> str:
    t0 = time.perf_counter()
    cfg = config(SPLIT_SIZES + SPLIT)
    L = cfg.lora.top_layers
    variants = [  # (run directory, row, overrides)
        ("split-cost-unsplit-cached", f"unsplit, frozen bottom layers cached (top {L} tuned; the fast path)", []),
        ("split-cost-unsplit-nocache", "unsplit, no cache (the split's compute, without the channel)",
         ["lora.cache_frozen=false"]),
        ("split-cost-split", ("split k=2 / m=1 (the client caches its 2 bottom layers; the server runs the "
         "middle layers every step)"), SPLIT),
    ]
    runs_m = [(row, run_once(d, SPLIT_SIZES + ov, runs, progress)) for d, row, ov in variants]
    whole_mem, client_mem = measure_memory(SPLIT)
    share = memory_shares(whole_mem, client_mem)

    def model_only(m: dict) -> str:
        return f"{m['rss_before_mb'] - m['base_mb']:.0f} / {m['peak_mb'] - m['base_mb']:.0f}"

    s = runs_m[2][1]
    lines = [
        "| | client (split) | whole model | client / whole |", "|---|---|---|---|",
        (f"| parameters (base + LoRA) | {s['client_parameters']:,} | {s['total_parameters']:,} | "
        f"{100 * s['client_parameter_share']:.1f}% |"),
        (f"| resident memory before training steps (MB) | {client_mem['rss_before_mb']:.0f} | "
        f"{whole_mem['rss_before_mb']:.0f} | {100 * share['rss_before_mb']:.0f}% |"),
        (f"| peak resident memory during {MEMORY_SAMPLES} training samples (MB) | {client_mem['peak_mb']:.0f} | "
        f"{whole_mem['peak_mb']:.0f} | {100 * share['peak_mb']:.0f}% |"),
        (f"| the same two, minus the process before its model is built ({client_mem['base_mb']:.0f} / "
        f"{whole_mem['base_mb']:.0f} MB: libraries, data) | {model_only(client_mem)} | {model_only(whole_mem)} | "
        f"{100 * share['rss_before_mb_model_only']:.0f}% / {100 * share['peak_mb_model_only']:.0f}% |"),
        (f"| bytes crossing the split per training sample (hidden states + gradients, fp32) | "
        f"{s['bytes_per_training_sample']:,.0f} | - | - |"),
        "", "| run (in-process, same samples, 1 round) | seconds per round | test AUC | adapter bytes / round |",
        "|---|---|---|---|",
    ]
    for name, m in runs_m:
        lines.append(f"| {name} | {m['seconds_per_round']:.1f} | {fmt(m['overall']['auc'])} | "
                     f"{m['bytes_per_round'][0]['adapters']:,} |")
    sizes = (f"Sizes: {cfg.data.n_train} training samples over {cfg.federated.clients} k-means clients, 1 round x "
             f"{cfg.train.epochs} local epoch, batch {cfg.train.batch_size}, LoRA r={cfg.lora.r} on the top "
             f"{cfg.lora.top_layers} layers, {cfg.data.n_test} test samples. Memory: separate processes; the "
             f"client process loads only its own layers' tensors (the middle layers stay on the meta device) "
             f"and talks to a server process, which loads only the middle layers', over a pipe; peak = "
             "VmHWM reset after loading (reset "
             f"{'ok' if client_mem['reset'] else 'unavailable: peak includes loading'})"
             f", {MEMORY_SAMPLES} samples; the client process held {client_mem['parameters_held']:,} parameters "
             f"and exchanged {client_mem['bytes']:,} bytes with the server.")
    return "\n".join([
        "### Federated split: what the client holds, sends and waits for (METHODS §2 flexible storage)", "",
        (f"Command `python benchmarks/bench_federated.py split`; machine: {machine()}; wall time "
        f"{time.perf_counter() - t0:.0f}s."), "", sizes, "", *lines])


# --- federated forgetting (METHODS §10) ------------------------------------------------------------------
def _forget_on_copy(run: Path, **kw) -> dict:
    import shutil

    from privrec.commands.forget import run_forget, run_verify

    copy = run.parent / "copies" / run.name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy)
    with kept_cache(run.parent / "copies"):  # the purge reaches only this copy, not the cache other runs read
        t0 = time.perf_counter()
        cert = run_forget(copy, progress=False, **kw)
        wall = time.perf_counter() - t0
    ok = run_verify(copy)["ok"]
    shutil.rmtree(copy, ignore_errors=True)
    body = cert["body"]
    replay = [a["slices"] for a in body["adapters"] if "slices" in a]
    return {"wall_seconds": wall, "retrain_seconds": cert["record"]["retrain_seconds"],
            "replay": replay[0] if replay else None,
            "affected": body["affected_shards"], "removed": len(body["removed"]["samples"]),
            "removed_train": sum(x["split"] == "train" for x in body["removed"]["samples"]),
            "passed": body["lineage_check"]["passed"], "verified": ok}


def forget_users(cfg) -> dict[str, int]:
    """core / edge / random user by training samples (METHODS §8), over the run's training samples."""
    fed = plan_federation(cfg)
    counts: dict[int, int] = {}
    for s_ in fed.splits.train:
        counts[s_.user_id] = counts.get(s_.user_id, 0) + 1
    ranked = sorted(counts, key=lambda u: (-counts[u], u))
    rng = np.random.default_rng([cfg.seed, 10])
    return {"core": ranked[0], "edge": ranked[-1], "random": int(rng.choice(ranked[1:-1]))}


def forget_table(runs: Path, progress: bool, part: str = "all", features: bool = False) -> str:
    """``part``: ``unsliced`` (the mixture and PPLR requests), ``sliced`` (the 4-slice mixture's) or ``all``; the
    table shows what ``RUNS/forget.json`` holds. ``features``: the runs of the ``features`` table (client-local
    counted features, :data:`FEATURES`, with its rounds), so a request also recounts its client's features."""
    from privrec import models
    from privrec.unlearning.exact.forget import resolve_interactions

    path = runs / "forget.json"
    rec = json.loads(path.read_text()) if path.is_file() else {}

    def put(key, value):
        rec[key] = value
        path.write_text(json.dumps(rec, indent=1))

    methods = dict(FEATURE_METHODS if features else METHODS)
    extra = FEATURES if features else []
    sliced_ov = SLICED[1] + extra
    cfg = config(methods["mixture"] + extra)
    users = forget_users(cfg)
    tomb = {(u, i) for u, i, _ in resolve_interactions(plan_federation(cfg).splits.dataset, [users["random"]])}

    def requests(key: str, run: Path, full_cfg) -> None:
        """core / edge / random users on ``run``, then the same strategy trained again without the random user."""
        assignment = models.load(run).clients
        for how, u in users.items():
            if f"{key}:{how}" not in rec:
                print(f"{key}: forget user {u} ({how})", file=sys.stderr)
                put(f"{key}:{how}", dict(_forget_on_copy(run, users=[u]), user=u, client=assignment[u]))
        if f"{key}:full" not in rec:  # the same strategy trained again without the random user, timed here
            print(f"{key}: full federated retrain without the random user", file=sys.stderr)
            t0 = time.perf_counter()
            m = run_federate(full_cfg, runs / "copies" / f"{key}-full", progress=progress, tombstones=tomb,
                             assignment=assignment)
            put(f"{key}:full", {"wall_seconds": time.perf_counter() - t0, "train_seconds": m["train_seconds"]})

    ms = {}
    if part in ("unsliced", "all"):
        ms = {name: run_once(name, methods[name] + extra, runs, progress) for name in ("mixture", "PPLR")}
        mix_run, pplr_run = runs / "mixture", runs / "pplr"
        assignment = models.load(mix_run).clients
        leaving = assignment[users["random"]]
        requests("mixture", mix_run, cfg)
        if "mixture:client" not in rec:
            print(f"mixture: client {leaving} leaves", file=sys.stderr)
            put("mixture:client", dict(_forget_on_copy(mix_run, clients=[leaving]), client=leaving))
        if "pplr:random" not in rec:
            print(f"PPLR: forget user {users['random']} (random): a full federated retrain", file=sys.stderr)
            put("pplr:random", dict(_forget_on_copy(pplr_run, users=[users["random"]], retrain_federation=True),
                                    user=users["random"]))
    if part in ("sliced", "all"):
        name = SLICED[0]
        ms[name] = run_once(name, sliced_ov, runs, progress)
        requests("sliced", runs / "mixture-4-slices", config(sliced_ov))
    for name, _ in [*METHODS, SLICED]:  # the quality rows of every run this table has
        out = runs / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        if name in ("mixture", "PPLR", SLICED[0]) and name not in ms and (out / METRICS_FILE).is_file():
            ms[name] = json.loads((out / METRICS_FILE).read_text())
    ref, _ = like_rate_reference(cfg)
    any_m = next(iter(ms.values()))
    lines = [f"Model `{cfg.model.name}`, {cfg.federated.clients} {cfg.federated.partition} clients, "
             f"{any_m['n_train']} train / {any_m['n_test']} test samples ({ARGS.config}), "
             f"{cfg.federated.rounds} rounds x {cfg.train.epochs} local epoch"
             + (" (mixture; PPLR: up to 8, the best on validation kept), features " + ", ".join(FEATURES)
                if features else "") + f". Machine: {machine()}.", "",
             "| method | overall AUC | per-client AUC | std | min | gap |", "|---|---|---|---|---|---|"]
    for name in ("mixture", SLICED[0], "PPLR"):
        if name not in ms:
            continue
        m = ms[name]
        per = ", ".join(fmt(c["auc"]) for c in m["clients"])
        b = m["balance"]
        lines.append(f"| {name} | {fmt(m['auc'])} | {per} | {fmt(b['std'])} | {fmt(b['min'])} | {fmt(b['gap'])} |")
    lines.append(f"| history like-rate (reference) | {fmt(ref)} | | | | |")
    if "mixture" in ms:
        own = ", ".join(f"{c['mixture_own_weight']:.2f}" for c in ms["mixture"]["clients"])
        lines += ["", f"Mixture: mean weight each client's test prompts give its own adapter: {own}."]
    lines += ["", "| request | model | user (draw) / client | samples removed (train) | adapters retrained | "
              "restored / rounds replayed | forget wall s | retrain s | same model's full retrain (training s) / "
              "forget wall | certificate | --verify |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    # PPLR's forget is itself the full federated retrain: against its own training seconds
    full = {k: rec[f"{k}:full"]["train_seconds"] for k in ("mixture", "sliced") if f"{k}:full" in rec}
    if "pplr:random" in rec:
        full["pplr"] = rec["pplr:random"]["retrain_seconds"]
    models_of = {"mixture": "mixture", "sliced": SLICED[0], "pplr": "PPLR (--retrain-federation)"}
    for key, label in [("mixture:core", "one user"), ("mixture:edge", "one user"), ("mixture:random", "one user"),
                       ("mixture:client", "one client leaves"), ("sliced:core", "one user"),
                       ("sliced:edge", "one user"), ("sliced:random", "one user"), ("pplr:random", "one user")]:
        r, kind = rec.get(key), key.split(":")[0]
        if r is None:
            continue
        who = (f"{r['user']} ({key.split(':')[1]}) / {r.get('client', '-')}" if "user" in r
               else f"- / {r['client']}")
        rp = r.get("replay")
        replay = f"{rp['restored']} / {rp['replayed_rounds']}" if rp else "-"
        ratio = f"{full[kind] / r['wall_seconds']:.1f}x" if kind in full else "-"
        lines.append(f"| {label} | {models_of[kind]} | {who} | {r['removed']} ({r['removed_train']}) | "
                     f"{r['affected']} | {replay} | {r['wall_seconds']:.1f} | {r['retrain_seconds']:.1f} | {ratio} | "
                     f"{'passed' if r['passed'] else 'FAILED'} | {'ok' if r['verified'] else 'FAILED'} |")
    notes = []
    for kind, what in (("mixture", "the mixture"), ("sliced", "the mixture with 4 slices")):
        f = rec.get(f"{kind}:full")
        if f:
            notes.append(f"{what} trained again without the random user, timed in this benchmark: "
                         f"{f['train_seconds']:.1f} s of training ({f['wall_seconds']:.1f} s with the model build "
                         "and the test scoring)")
    if "pplr" in full:
        notes.append(f"PPLR's request is its full federated retrain ({full['pplr']:.1f} s of training)")
    lines += ["", "Full retrains: " + "; ".join(notes) + ". Forget wall = request to certificate in-process (data, "
              "model build, purge, retrain or replay, swap, lineage check, certificate)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["table", "features", "split", "memory", "forget", "all"])
    ap.add_argument("--runs", default="runs/federated", help="run directories (reused when complete)")
    ap.add_argument("--config", default=str(ARGS.config), help="base config (default configs/pplr-ml100k.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where results.md / benchmarks.md / img/ are")
    ap.add_argument("--part", choices=["all", "unsliced", "sliced"], default="all",
                    help="forget: only the mixture and PPLR requests, or only the 4-slice mixture's")
    ap.add_argument("--features", action="store_true", help="forget: on the features table's runs (client-local "
                    "counted features, the rounds chosen on validation); its own section of docs/federated.md")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    ARGS.config, ARGS.set, ARGS.docs = args.config, args.set, args.docs
    runs = Path(args.runs)
    if args.what in ("table", "all"):
        body = results_table(runs, args.progress)
        publish(Path(args.docs) / "results.md", "bench_federated_table", body)
    if args.what == "features":
        body = results_table(runs, args.progress, FEATURE_METHODS, features=True)
        publish(Path(args.docs) / "results.md", "bench_federated_features", body)
    if args.what == "forget":
        body = forget_table(runs, args.progress, args.part, args.features)
        publish(Path(args.docs) / "federated.md", "bench_federated_forget" + ("_features" if args.features else ""),
                body)
    if args.what == "memory":
        whole, client = measure_memory(SPLIT)
        print(json.dumps({"whole": whole, "client": client, "client_share": memory_shares(whole, client)},
                         indent=1))
    if args.what in ("split", "all"):
        body = split_table(runs, args.progress)
        publish(Path(args.docs) / "benchmarks.md", "bench_federated_split", body)


if __name__ == "__main__":
    main()
