"""The recipe sweep of the recommendation-quality issue: named recipes (benchmarks/recipes.yaml), each one
``privrec train`` run directory under ``--runs``, then one table (docs/results.md, section ``recipes``) and
one learning-curve plot (docs/img/recipes-curves.png). Another recipes YAML (``--recipes X.yaml``, e.g.
benchmarks/recipes-gpu.yaml) writes section ``X``, plot ``img/X-curves.png`` and record ``benchmarks/X-measured.json``.

A recipe is a protocol's base config + the protocol's ``set`` + the recipe's ``set`` (``--set`` overrides).
Every recipe is chosen and compared on validation only; the table shows its test AUC / UAUC beside the
references (METHODS §0) computed on the same test samples from the labels the run saw (its drawn training
samples, or the protocol's whole training pool when ``prompt.item_stats`` is on: privrec.prepare.labelled_pool).

Resumable: a recipe whose run directory holds metrics.json is read, not re-run (delete the folder to re-run);
an interrupted one continues from its last epoch checkpoint. A run directory made by a different config is
refused (rename the recipe or delete the folder). The table lists every recipe of the YAML, the ones without
a finished run as "not run". Every finished run is also added to ``benchmarks/recipes-measured.json``
(committed), which supplies the rows of recipes measured on another machine; a recorded recipe whose config
has changed since is "not run" again.

    python benchmarks/recipes.py --runs runs/recipes --out docs/results.md            # every recipe
    python benchmarks/recipes.py --runs runs/recipes --out docs/results.md --only tallrec-2048,allusers-2048
    python benchmarks/recipes.py --plan                                                # estimated costs only
    python benchmarks/recipes.py --runs runs/recipes --out docs/results.md --report     # table from finished runs
    python benchmarks/recipes.py --only a,b --cache-only    # cache a's and b's prompts once, then run a and b
                                                            # side by side, one single-threaded queue per core
    python benchmarks/recipes.py --tiny                                                # smoke test, tiny model
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mdsection import publish

from privrec.commands.train import cache_prompts, run_train
from privrec.config import ExperimentConfig, load_config, parse_config, read_yaml
from privrec.errors import ConfigError, UserError
from privrec.report import plot_learning_curves
from privrec.rundir import METRICS_FILE, RunDir, atomic_write_text, read_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ROOT / "benchmarks" / "recipes.yaml"


def section_name(recipes: str | Path) -> str:
    """The docs section (and plot / record prefix) of a recipes YAML: its file stem ("recipes", "recipes-gpu")."""
    return Path(recipes).stem


def plot_name(recipes: str | Path) -> str:
    return f"{section_name(recipes)}-curves.png"


def default_record(recipes: str | Path) -> Path:
    return ROOT / "benchmarks" / f"{section_name(recipes)}-measured.json"


# --- cost model: SmolLM2-135M on this 2-core AVX2 CPU in fp32 (docs/results.md, docs/benchmarks.md) ----------
TRAIN_RATE = {"cached": 5.8, "all-layers": 1.5}  # training samples/s: top-8 LoRA over cached layers / all layers
CACHE_S = 0.19  # s per prompt to run the bottom 22 layers once (cold cache)
SCORE_S = {"cached": 0.086, "all-layers": 0.31}  # s per prompt to score (500 test prompts: 43 s / ~155 s)
REFS_S = {"tallrec": 10.0, "all-users": 75.0}  # the references learnt from the whole pool (drawn: ~3 s)
BASE_TOKENS = 147.0  # the plain tallrec prompt the rates were measured on (SmolLM2 tokenizer, mean)
TOKENS = {"tallrec": 147.0, "kv": 328.0}  # mean prompt tokens by template (measured on 300 training prompts)
SUMMARY_TOKENS, STATS_TOKENS = 13.0, 19.0  # added by prompt.history_summary / prompt.item_stats
POOL = {"tallrec": 8000, "all-users": 84_912}  # training samples of each protocol (data.n_train = null)
EVAL_SPLIT = {"tallrec": 1000, "all-users": 2829}  # validation and test samples before n_valid / n_test draws


@dataclass
class Recipe:
    name: str
    protocol: str
    what: str
    overrides: list[str]


@dataclass
class Sweep:
    protocols: dict[str, dict]
    recipes: list[Recipe]
    tiny: dict


def load_sweep(path: str | Path) -> Sweep:
    """Read and check the recipes YAML (see benchmarks/recipes.yaml for its shape).

    Raises:
        ConfigError: missing sections, unknown protocols, duplicate or unknown recipe names.
    """
    raw = read_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("protocols"), dict) or not raw.get("recipes"):
        raise ConfigError(f"{path}: needs a `protocols:` mapping and a `recipes:` list")
    protocols = raw["protocols"]
    recipes = []
    for r in raw["recipes"]:
        if not isinstance(r, dict) or set(r) - {"name", "protocol", "what", "set"} or "name" not in r:
            raise ConfigError(f"{path}: a recipe holds name, protocol, what and set; got {r!r}")
        if r.get("protocol") not in protocols:
            raise ConfigError(f"{path}: recipe {r['name']}: unknown protocol {r.get('protocol')!r}")
        recipes.append(Recipe(str(r["name"]), r["protocol"], str(r.get("what", "")), [str(x) for x in r.get("set")
                                                                                        or []]))
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: duplicate recipe names")
    tiny = raw.get("tiny") or {}
    if set(tiny.get("recipes", [])) - set(names):
        raise ConfigError(f"{path}: tiny.recipes names unknown recipes {sorted(set(tiny['recipes']) - set(names))}")
    return Sweep(protocols, recipes, tiny)


def recipe_config(sweep: Sweep, recipe: Recipe, extra: list[str] | None = None) -> ExperimentConfig:
    """The recipe's resolved experiment config (``extra`` overrides last)."""
    proto = sweep.protocols[recipe.protocol]
    base = ROOT / proto["config"]
    return load_config(base, [*(proto.get("set") or []), *recipe.overrides, *(extra or [])])


# --- estimated cost ----------------------------------------------------------------------------------------------
def prompt_keys(cfg: ExperimentConfig) -> tuple[str, str]:
    """(what decides a run's validation and test prompts, what decides its training prompts): runs sharing a
    key share those frozen-layer cache entries (the cache is keyed by token ids, on disk)."""
    data = cfg.data.model_dump(exclude={"n_train"})
    ev = f"{data}|{cfg.prompt.model_dump()}|{cfg.model.name}|{cfg.model.precision}|{cfg.lora.top_layers}"
    return ev, f"{ev}|{cfg.data.n_train}|{cfg.seed}|{cfg.augment.model_dump()}"


def estimate(cfg: ExperimentConfig, eval_cached: bool = False, train_cached: bool = False) -> dict[str, float]:
    """Estimated seconds of one run on the real model: ``train`` (what the issue bounds by an hour), ``cache``
    (cold, or without the validation and test prompts / training prompts when an earlier run cached them:
    ``eval_cached`` / ``train_cached``), ``score``
    (validation at every curve point + test [+ zero-shot]), ``refs`` and ``all``. From the rates at the top of
    this file, scaled by the prompt's length."""
    p = cfg.data.protocol
    n_train = (cfg.data.n_train or POOL[p]) * (1 + cfg.augment.copies)
    n_valid = min(cfg.data.n_valid or EVAL_SPLIT[p], EVAL_SPLIT[p])
    n_test = min(cfg.data.n_test or EVAL_SPLIT[p], EVAL_SPLIT[p])
    tokens = TOKENS[cfg.prompt.template] + SUMMARY_TOKENS * cfg.prompt.history_summary \
        + STATS_TOKENS * cfg.prompt.item_stats
    f = tokens / BASE_TOKENS
    path = "cached" if cfg.lora.top_layers is not None and cfg.lora.cache_frozen else "all-layers"
    steps = math.ceil(math.ceil(n_train / cfg.train.batch_size) / cfg.train.grad_accum)
    mid = (steps - 1) // cfg.train.eval_every if cfg.train.eval_every else 0  # mid-epoch scorings per epoch
    epochs = cfg.train.epochs
    out = {
        "train": epochs * n_train / TRAIN_RATE[path] * f,
        "cache": ((0 if train_cached else n_train) + (0 if eval_cached else n_valid + n_test)) * CACHE_S * f
        if path == "cached" else 0.0,
        "score": (epochs * (1 + mid) * n_valid + n_test * (2 if cfg.eval.zero_shot else 1)) * SCORE_S[path] * f,
        "refs": REFS_S[p] if cfg.shows_labels else 3.0,
    }
    out["all"] = sum(out.values())
    return out


def _minutes(s: float) -> str:
    return f"~{max(1, round(s / 60))} min"


# --- running -----------------------------------------------------------------------------------------------------
def run_recipe(cfg: ExperimentConfig, out: Path, progress: bool) -> dict:
    """metrics.json of the recipe's run: read when finished, else trained (continuing a checkpoint).

    Raises:
        RunError: the folder holds a run of a different config.
    """
    if (out / "config.yaml").is_file() and RunDir(out, create=False).load_config().digest() != cfg.digest():
        raise UserError(f"{out} holds a run of a different config; delete it or rename the recipe")
    if (out / METRICS_FILE).is_file():
        return read_json(out / METRICS_FILE)
    return run_train(cfg, out, resume=True, progress=progress)


def finished(out: Path, cfg: ExperimentConfig) -> dict | None:
    """metrics.json of a finished run of exactly ``cfg`` in ``out``, else None."""
    if not (out / METRICS_FILE).is_file() or not (out / "config.yaml").is_file():
        return None
    if RunDir(out, create=False).load_config().digest() != cfg.digest():
        return None
    return read_json(out / METRICS_FILE)


# --- the record of measured recipes (committed: run directories do not outlive the machine they ran on) ------------
RECORD_KEYS = ("n_train", "n_valid", "n_test", "epochs_run", "best_epoch", "select", "valid_auc", "valid_uauc",
               "auc", "uauc", "logloss", "accuracy", "train_seconds", "train_samples_per_second", "cache_seconds",
               "test_score_seconds", "references", "references_train", "curve", "model", "protocol", "machine")


def read_record(path: Path) -> dict[str, dict]:
    """recipe name -> {"config": the resolved config, "metrics": the table's fields of its metrics.json}."""
    return read_json(path)["recipes"] if path.is_file() else {}


def recorded(entry: dict | None, cfg: ExperimentConfig) -> dict | None:
    """A recorded recipe's metrics when it was measured with ``cfg``: the stored config is re-read through
    today's schema (a field added since takes its default), so only a changed recipe or default loses its row."""
    if entry is None or parse_config(entry["config"]).digest() != cfg.digest():
        return None
    return entry["metrics"]


def write_record(path: Path, record: dict[str, dict], recipes: str | Path = DEFAULT_RECIPES) -> None:
    atomic_write_text(path, json.dumps({
        "about": f"Measured recipes of benchmarks/{Path(recipes).name} (written by benchmarks/recipes.py: the table "
                 "and the plot in docs/results.md are made from these and from the finished runs under --runs).",
        "recipes": dict(sorted(record.items())),
    }, indent=1) + "\n")


# --- the table and the plot ----------------------------------------------------------------------------------------
REFS = [("like-rate", "history like-rate"), ("item-mean", "item mean"), ("lr-onehot", "LR one-hot"),
        ("lr-onehot+like-rate", "LR one-hot + like-rate"), ("lr-like-rate+item-mean", "LR like-rate + item mean"),
        ("mf", "MF (trained CF)")]


def _f(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _pair(d: dict | None) -> str:
    d = d or {}
    return f"{_f(d.get('auc'))} / {_f(d.get('uauc'))}"


def table(rows: list[tuple[Recipe, ExperimentConfig, dict | None]], est: dict[str, dict],
          recipes: str | Path = DEFAULT_RECIPES) -> str:
    header = ["recipe", "protocol", "train × epochs (best)", "valid / test", "valid AUC", "valid UAUC",
              "test AUC", "test UAUC", "train s (cache s)", "references learn from"]
    header += [f"{label} AUC / UAUC" for _, label in REFS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r, cfg, m in rows:
        if m is None:
            cells = [r.name, r.protocol, f"{cfg.data.n_train} × {cfg.train.epochs}", "-",
                     "not run", "-", "-", "-", f"est. {_minutes(est[r.name]['train'])} "
                     f"({_minutes(est[r.name]['cache'])})", "-"] + ["-"] * len(REFS)
        else:
            refs = m.get("references") or {}
            n_refs = m.get("references_train", m.get("n_train"))
            source = "the protocol's training pool" if cfg.shows_labels else "the run's training samples"
            cells = [r.name, r.protocol, f"{m['n_train']} × {m['epochs_run']} ({m['best_epoch']})",
                     f"{m['n_valid']} / {m['n_test']}", _f(m.get("valid_auc")), _f(m.get("valid_uauc")),
                     _f(m.get("auc")), _f(m.get("uauc")), f"{m['train_seconds']:.0f} ({m['cache_seconds']:.0f})",
                     f"{n_refs:,} ({source})"]
            cells += [_pair(refs.get(k)) for k, _ in REFS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", f"Recipes (each a `--set` list in benchmarks/{Path(recipes).name}):"]
    lines += [f"- `{r.name}`: {r.what}." for r, _, _ in rows]
    return "\n".join(lines)


def chosen(rows: list[tuple[Recipe, ExperimentConfig, dict | None]]) -> list[str]:
    """Per protocol and validation draw (only runs scored on the same validation samples compare), the recipe
    with the best validation AUC and the one with the best validation UAUC."""
    out = []
    groups = dict.fromkeys((r.protocol, cfg.data.eval_draw) for r, cfg, _ in rows)
    for proto, draw in groups:
        done = [(r, m) for r, cfg, m in rows if m is not None and (r.protocol, cfg.data.eval_draw) == (proto, draw)]
        where = f"{proto} (validation drawn by {draw})" if len(groups) > len({p for p, _ in groups}) else proto
        for key, label in (("valid_auc", "AUC"), ("valid_uauc", "UAUC")):
            scored = [(r, m) for r, m in done if m.get(key) is not None]
            if scored:
                r, m = max(scored, key=lambda rm: rm[1][key])
                out.append(f"- {where}: best validation {label} {m[key]:.4f}: `{r.name}`, test AUC "
                           f"{_f(m.get('auc'))} / UAUC {_f(m.get('uauc'))}.")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default=str(DEFAULT_RECIPES), help="the recipes YAML")
    ap.add_argument("--runs", default=None, help="run directories go here (default runs/<YAML name>, e.g. "
                    "runs/recipes; --tiny: a temp folder)")
    ap.add_argument("--out", default=None, help="markdown file whose section named for the recipes YAML (`recipes`) "
                    "is rewritten; the plot goes to img/<that name>-curves.png beside it (without --out: into --runs)")
    ap.add_argument("--record", default=None, help="JSON record of measured recipes (default "
                    "benchmarks/<YAML name>-measured.json, committed; --tiny: none): finished runs are added to it, "
                    "and recipes without a run under --runs are read from it")
    ap.add_argument("--only", default=None, help="comma-separated recipe names to run (the table still lists all)")
    ap.add_argument("--plan", action="store_true", help="print every recipe's estimated cost and stop")
    ap.add_argument("--report", action="store_true", help="run nothing: write the table and the plot from the "
                    "finished runs under --runs (e.g. after two --only queues ran side by side)")
    ap.add_argument("--cache-only", action="store_true", help="train nothing: fill the frozen-layer cache with the "
                    "prompts of the --only recipes (on every thread), so queues started afterwards side by side, "
                    "one per core, find them cached")
    ap.add_argument("--tiny", action="store_true", help="smoke test on the tiny random model (the YAML's `tiny:` "
                    "recipes and overrides); never written to docs")
    args = ap.parse_args(argv)
    if args.tiny and args.out:
        ap.error("--tiny numbers are not results: drop --out")
    try:
        return _main(args, progress=True)
    except UserError as e:
        print(f"recipes: error: {e}", file=sys.stderr)
        return 2


def _main(args, progress: bool) -> int:
    sweep = load_sweep(args.recipes)
    extra = [str(x) for x in sweep.tiny.get("set", [])] if args.tiny else []
    recipes = sweep.recipes
    if args.tiny:
        recipes = [r for r in recipes if r.name in set(sweep.tiny.get("recipes", []))]
    wanted = set(args.only.split(",")) if args.only else {r.name for r in recipes}
    unknown = wanted - {r.name for r in recipes}
    if unknown:
        raise ConfigError(f"--only names unknown recipes: {', '.join(sorted(unknown))}")
    configs = {r.name: recipe_config(sweep, r, extra) for r in recipes}
    est = {name: estimate(cfg) for name, cfg in configs.items()}
    seen: set[str] = set()  # in YAML order, a recipe after one with the same prompts finds them cached
    in_order = {}
    for r in recipes:
        ev, tr = prompt_keys(configs[r.name])
        in_order[r.name] = estimate(configs[r.name], eval_cached=ev in seen, train_cached=tr in seen)
        seen |= {ev, tr}

    if args.plan:
        print("| recipe | protocol | train | all (cold cache) | all (run in this order) |\n|---|---|---|---|---|")
        for r in recipes:
            e = est[r.name]
            print(f"| {r.name} | {r.protocol} | {_minutes(e['train'])} | {_minutes(e['all'])} | "
                  f"{_minutes(in_order[r.name]['all'])} |")
        total = sum(e["all"] for e in in_order.values())
        print(f"\nall recipes in this order: ~{total / 3600:.1f} h")
        return 0

    runs = Path(args.runs) if args.runs else (Path(tempfile.mkdtemp(prefix="recipes-tiny-")) if args.tiny
                                              else ROOT / "runs" / section_name(args.recipes))
    if args.cache_only:
        for r in recipes:
            if r.name in wanted:
                n, seconds = cache_prompts(configs[r.name], progress)
                print(f"{r.name}: {n} prompts cached ({seconds:.0f} s for the ones not cached before)", file=sys.stderr)
        return 0
    for r in recipes:
        if r.name in wanted and not args.report:
            print(f"== {r.name} ({r.protocol}): {r.what}; estimated {_minutes(est[r.name]['all'])} -> {runs / r.name}",
                  file=sys.stderr)
            run_recipe(configs[r.name], runs / r.name, progress)

    # every finished run joins the record; a recipe without a run here is read from the record (a run measured
    # on an earlier machine). --tiny runs are recorded only into a --record named for them.
    record_path = Path(args.record) if args.record else (None if args.tiny else default_record(args.recipes))
    record = read_record(record_path) if record_path else {}
    rows = []
    for r in recipes:
        m = finished(runs / r.name, configs[r.name])
        if m is not None and record_path:
            record[r.name] = {"config": configs[r.name].model_dump(mode="json"),
                              "metrics": {k: m.get(k) for k in RECORD_KEYS}}
        rows.append((r, configs[r.name], m if m is not None else recorded(record.get(r.name), configs[r.name])))
    if record_path:
        write_record(record_path, record, args.recipes)
    plot = plot_name(args.recipes)
    plot_path = (Path(args.out).parent / "img" / plot) if args.out else runs / plot
    panels: dict[str, list] = {}
    for r, _, m in rows:
        if m is not None and m.get("curve"):
            panels.setdefault(r.protocol, []).append((r.name, m["curve"]))
    plot_learning_curves(panels, plot_path)

    by_machine: dict[str, list[str]] = {}
    for r, _, m in rows:
        if m is not None:
            by_machine.setdefault(m.get("machine", "-"), []).append(r.name)
    if len(by_machine) <= 1:
        machine = f"Machine: {next(iter(by_machine), '-')}."
    else:  # runs measured on different thread counts: say which is which, times are not comparable across
        machine = "Machines: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in by_machine.items()) + "."
    yaml = "" if Path(args.recipes).resolve() == DEFAULT_RECIPES else f" --recipes benchmarks/{Path(args.recipes).name}"
    body = "\n".join([
        f"{machine} Command: `python benchmarks/recipes.py{yaml} --runs runs/{section_name(args.recipes)} "
        f"--out docs/results.md` (recipes: benchmarks/{Path(args.recipes).name}).",
        "",
        table(rows, est, args.recipes),
        "",
        *chosen(rows),
        "",
        f"![validation AUC (solid) and UAUC (dashed) against training samples seen](img/{plot})",
    ])
    print(f"plot: {plot_path}", file=sys.stderr)
    publish(args.out, section_name(args.recipes), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
