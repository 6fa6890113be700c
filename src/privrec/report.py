"""Tables (and plots) from run directories: ``privrec report RUN [RUN ...]``."""

from __future__ import annotations

from pathlib import Path

from privrec.rundir import METRICS_FILE, read_json


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _seconds(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def collect(paths: list[str | Path]) -> list[tuple[str, dict]]:
    return [(Path(p).name, read_json(Path(p) / METRICS_FILE)) for p in paths]


def like_rows(runs: list[tuple[str, dict]]) -> list[list[str]]:
    """One row per model / reference: name, AUC, UAUC, LogLoss, ACC, n_test, training seconds."""
    rows = []
    seen_refs = set()
    for name, m in runs:
        if m.get("zero_shot"):
            z = m["zero_shot"]
            rows.append([f"{name}: zero-shot", _fmt(z.get("auc")), _fmt(z.get("uauc")), _fmt(z.get("logloss")),
                         _fmt(z.get("accuracy")), _fmt(m.get("n_test")), "-"])
        label = f"{name}: {m['method']}" if m.get("method") else f"{name}: tuned"
        rows.append([label, _fmt(m.get("auc")), _fmt(m.get("uauc")), _fmt(m.get("logloss")),
                     _fmt(m.get("accuracy")), _fmt(m.get("n_test")), _seconds(m.get("train_seconds"))])
        for ref, r in (m.get("references") or {}).items():
            key = (ref, m.get("n_test"), m.get("protocol"), m.get("n_train"), m.get("references_train"))
            if key in seen_refs or ref == m.get("method"):
                continue
            seen_refs.add(key)
            rows.append([f"  reference: {ref}", _fmt(r.get("auc")), _fmt(r.get("uauc")), _fmt(r.get("logloss")),
                         _fmt(r.get("accuracy")), _fmt(m.get("n_test")), "-"])
    return rows


HEADER = ["run", "AUC", "UAUC", "LogLoss", "ACC", "n_test", "train s"]


RANK_KEYS = ["hr@1", "hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10"]
RANK_HEADER = ["run", "HR@1", "HR@3", "HR@5", "HR@10", "NDCG@3", "NDCG@5", "NDCG@10", "users"]


def ranking_rows(runs: list[tuple[str, dict]]) -> list[list[str]]:
    """One row per scorer (tuned and zero-shot) and reference of every ranking run."""
    rows = []
    for name, m in runs:
        n = _fmt(m.get("n_test"))
        for label, block in [("zero-shot", m.get("zero_shot") or {}), ("tuned", m.get("scorers") or {})]:
            for scorer, r in block.items():
                rows.append([f"{name}: {label} {scorer}"] + [_fmt(r.get(k)) for k in RANK_KEYS] + [n])
        for ref, r in (m.get("references") or {}).items():
            rows.append([f"  reference: {ref}"] + [_fmt(r.get(k)) for k in RANK_KEYS] + [n])
    return rows


def _table(header: list[str], rows: list[list[str]], markdown: bool, title: str) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h == "run" else "right")
    for r in rows:
        table.add_row(*r)
    buf = StringIO()
    Console(file=buf, width=120).print(table)
    return buf.getvalue()


MODEL_HEADER = ["run", "kind", "adapters", "samples", "forgets by", "trained by"]


def model_rows(paths: list[str | Path]) -> list[list[str]]:
    """One row per model directory (its manifest, privrec.models): what it is and what it can do to forget.
    Runs without a model (baselines) and directories whose manifest cannot be read have no row."""
    from privrec import models
    from privrec.errors import RunError

    rows = []
    for p in paths:
        try:
            m = models.load(p)
        except RunError:
            continue
        samples = {i for a in m.adapters for i in a.sample_ids}
        ways = ", ".join(m.forget) or "-"
        if m.kind == "clients" and not m.forget:  # written before privrec forget took federated models
            ways += f" (strategy allows {', '.join(m.strategy_allows)})"
        rows.append([Path(p).name, m.kind + (" (inferred)" if m.inferred else ""), str(len(m.adapters)),
                     str(len(samples)), ways, models.KINDS[m.kind].trained_by])
    return rows


def render(paths: list[str | Path], markdown: bool = False) -> str:
    """One table of trained runs, one of ranking runs and one of unlearning runs (those there are), and one of
    the model directories among them: their kind and what each can do to forget."""
    runs = collect(paths)
    unlearning = [(n, m) for n, m in runs if m.get("kind") == "unlearning"]
    ranked = [(n, m) for n, m in runs if m.get("task") == "ranking"]
    others = [(n, m) for n, m in runs if m.get("kind") != "unlearning" and m.get("task") != "ranking"]
    parts = [_render_like(others, markdown)] if others else []
    if ranked:
        parts.append(_table(RANK_HEADER, ranking_rows(ranked), markdown, "privrec ranking results"))
    if unlearning:
        from privrec.unlearning.measures import render_table

        parts.append(render_table(unlearning, markdown))
    rows = model_rows(paths)
    if rows:
        parts.append(_table(MODEL_HEADER, rows, markdown, "privrec models"))
    return "\n\n".join(parts)


def _render_like(runs: list[tuple[str, dict]], markdown: bool) -> str:
    return _table(HEADER, like_rows(runs), markdown, "privrec results")


def _values(curve: list[dict], key: str) -> list[float]:
    """A curve's values of ``key``; missing ones (NaN, written as null in metrics.json) as NaN gaps."""
    return [float("nan") if p.get(key) is None else float(p[key]) for p in curve]


def plot_learning_curves(panels: dict[str, list[tuple[str, list[dict]]]], path: str | Path,
                         title: str = "validation AUC and UAUC against training samples seen") -> Path:
    """One panel per key of ``panels`` (e.g. a protocol), one colour per (label, curve) in it: validation
    AUC (solid) and UAUC (dashed) against ``samples_seen``, from the ``curve`` points of a run's
    metrics.json. Written as a PNG with matplotlib's Agg backend (no display needed); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(panels) or ["(no runs)"]
    most = max((len(v) for v in panels.values()), default=0)
    legend_rows = (most + 1) // 2 + 1  # two columns of recipes, then the line styles
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 3.8 + 0.22 * legend_rows), squeeze=False)
    for ax, name in zip(axes[0], names):
        handles = []
        xs = []
        for i, (label, curve) in enumerate(panels.get(name, [])):
            colour = f"C{i % 10}"
            x = [p["samples_seen"] for p in curve]
            xs += x
            ax.plot(x, _values(curve, "valid_auc"), "-o", color=colour, markersize=3)
            if any(p.get("valid_uauc") is not None for p in curve):
                ax.plot(x, _values(curve, "valid_uauc"), "--", color=colour)
            handles.append(Line2D([], [], color=colour, marker="o", markersize=3, label=label))
        if xs and max(xs) > 20 * max(min(xs), 1):
            ax.set_xscale("log")  # runs of a few thousand and of tens of thousands of samples, both readable
        ax.set_title(name)
        ax.set_xlabel("training samples seen")
        ax.set_ylabel("validation score")
        ax.grid(alpha=0.3)
        if handles:
            handles += [Line2D([], [], color="k", label="AUC"), Line2D([], [], color="k", ls="--", label="UAUC")]
            ax.legend(handles=handles, fontsize=7, ncol=2, loc="upper center",
                      bbox_to_anchor=(0.5, -0.16))  # below the axis label: never over a line
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path
