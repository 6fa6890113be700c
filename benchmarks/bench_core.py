"""Training and scoring throughput of privrec against a naive loop, measured in the same process.

naive   : fp32, the plain HF forward computing full-vocabulary logits at every position, batches in random
          order (padding to the longest prompt of a random batch), LoRA on all layers.
privrec : the RecLM forward (last real token only, two LM-head rows in fp32; bf16 autocast where the
          hardware has it), length-bucketed batches; (a) LoRA on all layers, (b) LoRA on the top L layers
          with the bottom layers computed once and cached. Each with whole prompts (``model.share_prefix``
          off) and with the prompt prefix that the prompts share (the chat template's system text and the
          instruction) run once: per training batch (with grad), per scoring call.

Same model, same prompts, same LoRA rank, same batch size. Prints a markdown table of samples/s and the
ratio to naive, then how close the scorer comes to the machine; ``--out FILE`` also rewrites the marked
section of that file.

Model arithmetic of a scoring call (DESIGN.md: achieved GFLOP/s against a plain matmul of the same
precision, measured in the same run). Over the real tokens that the call runs through each decoder layer
(a shared prefix counted once, padding not at all):

    FLOPs = sum over layers of [ 2 * W_layer * tokens + 4 * d_attn * pairs ]

with W_layer the weights of the layer's linear maps (q, k, v, o, gate, up, down, and the LoRA A and B
matrices), d_attn = heads x head dim, and pairs the (query, key) pairs causal attention scores (QK^T and the
weighted sum of V, 2 FLOPs each per dimension): a token at position t has t + 1 keys. A call over prompts of
lengths L_i sharing a prefix of P tokens (P = 0 for whole prompts) runs tokens = P + sum_i (L_i - P) and
pairs = P(P+1)/2 + sum_i (L_i(L_i+1)/2 - P(P+1)/2) per layer. Embeddings, norms, RoPE, softmax and the
two-row head (4H per prompt) are left out (< 1% of the total). The reference is ``a @ b`` of shape
(1024, hidden) x (hidden, intermediate) in fp32 and, where the hardware has native bf16, in bf16, timed
over >= 1 s after warm-up on the same threads.

    python benchmarks/bench_core.py --out docs/benchmarks.md
    python benchmarks/bench_core.py --emulate-avx2 --out docs/benchmarks.md   # section bench_core:avx2

``--emulate-avx2`` runs the same benchmark with every kernel library kept to AVX2 and fp32 (:mod:`isa`).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F
from isa import avx2_emulated, emulate_avx2, emulation_note
from mdsection import publish

from privrec.config import parse_config
from privrec.data import build_splits, load_dataset
from privrec.model.backbone import supports_bf16
from privrec.model.prefix_scoring import MIN_SHARED_PREFIX, common_prefix
from privrec.model.recmodel import RecLM
from privrec.prepare import machine


def naive_batches(items, bs, seed=0):
    order = np.random.default_rng(seed).permutation(len(items))
    return [order[i: i + bs].tolist() for i in range(0, len(items), bs)]


def naive_logits(m: RecLM, batch) -> torch.Tensor:
    out = m.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)  # (B, T, V) fp32
    full = out.logits
    rows = full[torch.arange(full.shape[0]), batch.last]  # (B, V)
    two = rows[:, [m.yes_id, m.no_id]]
    return two[:, 0] - two[:, 1]


def _sync(m: RecLM) -> None:
    if m.device.type == "cuda":
        torch.cuda.synchronize()


def time_train(m: RecLM, items, bs, naive: bool) -> float:
    """Samples/s of optimizer steps (every batch through the one forward, or the naive one)."""
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-4)
    m.model.train()
    batches = naive_batches(items, bs) if naive else m.length_batches(items, bs)
    if not naive:
        np.random.default_rng(0).shuffle(batches)
    t0 = time.perf_counter()
    for idx in batches:
        b = m.collate([items[i] for i in idx], prefix=None if naive else "auto")
        z = naive_logits(m, b) if naive else m.logits(b)
        F.binary_cross_entropy_with_logits(z, b.labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(m)
    return len(items) / (time.perf_counter() - t0)


@torch.no_grad()
def time_score(m: RecLM, items, bs, naive: bool) -> float:
    m.model.eval()
    t0 = time.perf_counter()
    if naive:
        for idx in naive_batches(items, bs):
            naive_logits(m, m.collate([items[i] for i in idx], prefix=None))
        _sync(m)
    else:
        m.score_logits(items, bs, progress=False)
    return len(items) / (time.perf_counter() - t0)


def fresh_cache(m: RecLM) -> None:
    """An empty in-memory frozen cache: every entry is computed inside the timed region."""
    if m.cut:
        m.enable_cache(m.cut)


def build(cfg, ds, top_layers):
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"top_layers": top_layers})})
    m = RecLM.from_config(cfg, ds)
    m.cache_dir = None  # in-memory cache only
    m.attach_lora(cfg.lora, 0)
    fresh_cache(m)
    return m


# --- how close the scorer comes to the machine ---------------------------------------------------------------
def scoring_flops(m: RecLM, items, shared: bool) -> float:
    """The model arithmetic of one scoring call over ``items`` (module docstring's formula)."""
    lengths = np.array([len(e) for e in items], dtype=np.float64)
    P = len(common_prefix([e.ids for e in items])) if shared and len(items) > 1 else 0
    P = P if P >= MIN_SHARED_PREFIX else 0
    tokens = P + (lengths - P).sum()
    pairs = P * (P + 1) / 2 + (lengths * (lengths + 1) / 2 - P * (P + 1) / 2).sum()
    cfg = m._inner().config
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    total = 0.0
    for layer in m._inner().layers:
        w = sum(mod.weight.numel() for mod in layer.modules() if isinstance(mod, torch.nn.Linear))
        total += 2 * w * tokens + 4 * d_attn * pairs
    return total


def matmul_gflops(m: RecLM, dtype: torch.dtype, rows: int = 1024, seconds: float = 1.0) -> float:
    """GFLOP/s of a plain ``a @ b``, (rows, hidden) x (hidden, intermediate), in ``dtype`` on the model's device."""
    cfg = m._inner().config
    k, n = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    a = torch.randn(rows, k, dtype=dtype, device=m.device)
    b = torch.randn(k, n, dtype=dtype, device=m.device)
    for _ in range(3):
        a @ b
    _sync(m)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            a @ b
        reps += 8
        _sync(m)
    return 2 * rows * k * n * reps / (time.perf_counter() - t0) / 1e9


def how(per: str | None) -> str:
    return "whole prompts" if per is None else f"shared prefix run once per {per}" + (
        " (`model.share_prefix: true`)" if per == "batch" else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-score", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-layers", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3, help="epochs over which the frozen cache is amortised")
    ap.add_argument("--out", default=None)
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="keep every kernel library to AVX2 and fp32 (isa.py); tables go to section bench_core:avx2")
    args = ap.parse_args()
    if args.emulate_avx2:
        emulate_avx2()

    cfg = parse_config({"model": {"name": args.model},
                        "data": {"n_train": args.n_train, "n_test": args.n_score, "n_valid": 1}})
    ds = load_dataset("ml-100k", None)
    sp = build_splits(ds, cfg.data, 0)
    rows, machine_rows = [], []
    command = "python benchmarks/bench_core.py" + "".join(
        f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items() if k != "out" and v != ap.get_default(k))

    def score_row(m: RecLM, name: str, te, shared: bool, fresh: bool) -> None:
        m.share_prefix = shared
        if fresh:
            fresh_cache(m)
        rate = time_score(m, te, args.batch_size, False)
        rows.append((name, float("nan"), rate))
        if fresh:  # one call over new prompts: the whole model arithmetic of the call
            machine_rows.append((name, scoring_flops(m, te, shared) / len(te), rate))

    m = build(cfg, ds, None)
    tr, te = m.encode(sp.train), m.encode(sp.test)
    lengths = [len(e) for e in tr + te]
    P = len(common_prefix([e.ids for e in tr + te]))
    naive_train = time_train(m, tr, args.batch_size, naive=True)
    naive_score = time_score(m, te, args.batch_size, naive=True)
    rows.append(("naive: fp32, full-vocabulary logits, unsorted batches, LoRA all layers", naive_train,
                 naive_score))
    for shared, per in ((False, None), (True, "batch")):
        m.share_prefix = shared  # True: also under LoRA dropout (one prefix mask per batch; "auto" would not)
        rows.append((f"privrec: last-token Yes/No head, length buckets, LoRA all layers, {how(per)}",
                     time_train(m, tr, args.batch_size, naive=False), float("nan")))
    for shared, per in ((False, None), (True, "call")):
        score_row(m, f"privrec: scoring, LoRA all layers, {how(per)}", te, shared, fresh=True)
    bf16 = m.bf16
    del m

    m = build(cfg, ds, args.top_layers)
    t0 = time.perf_counter()
    m.prepare(tr, args.batch_size, progress=False)
    cache_s = (time.perf_counter() - t0) / len(tr)  # seconds per prompt for the bottom layers (prefix shared)
    for shared, per in ((False, None), (True, "batch")):
        m.share_prefix = shared
        step_rate = time_train(m, tr, args.batch_size, naive=False)
        rows.append((f"privrec: LoRA top {args.top_layers} of {m.n_layers}, frozen bottom cached, {how(per)} "
                     "(train steps only)", step_rate, float("nan")))
    rows.append((f"privrec: same, cache cost amortised over {args.epochs} epochs", 1 / (1 / step_rate + cache_s
                 / args.epochs), float("nan")))
    for shared, per in ((False, None), (True, "call")):
        score_row(m, f"privrec: scoring fresh prompts through the cached path (cache filled inside the timing), "
                  f"{how(per)}", te, shared, fresh=True)
    m.prepare(te, args.batch_size, progress=False)
    score_row(m, f"privrec: scoring with cached bottom {m.cut} layers (repeat scoring: zero-shot, per-epoch "
              "validation, tuned), shared prefix", te, True, fresh=False)

    def fmt(v, base):
        return "-" if np.isnan(v) else f"{v:.2f} ({v / base:.2f}x)"

    mm = {"fp32": matmul_gflops(m, torch.float32)}
    if supports_bf16(m.device):
        mm["bf16"] = matmul_gflops(m, torch.bfloat16)
    prec = "bf16" if bf16 else "fp32"
    lines = [
        f"Model `{args.model}`, {len(tr)} training / {len(te)} scoring prompts of the TALLRec template "
        f"(tokens: mean {np.mean(lengths):.0f}, min {min(lengths)}, max {max(lengths)}; the first {P} shared by "
        f"all), batch {args.batch_size}, LoRA r=8 on q,v; bf16 autocast: "
        f"{'on' if bf16 else 'off (not supported here)'}.",
        f"Machine: {machine()} ({platform.processor() or platform.machine()}).{emulation_note()}",
        f"Command: `{command}`",
        "",
        "| path | training samples/s (x naive) | scoring samples/s (x naive) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {fmt(t, naive_train)} | {fmt(s, naive_score)} |" for name, t, s in rows]
    lines += [
        "",
        "How close the scorer comes to the machine (model arithmetic per prompt as in bench_core.py's docstring; "
        "plain matmul (1024 x hidden) @ (hidden x intermediate) in the same run: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in mm.items())
        + ("" if "bf16" in mm else ", bf16 not native here") + "):",
        "",
        f"| scoring call over fresh prompts | GFLOP per prompt | achieved GFLOP/s ({prec}) | of {prec} matmul |",
        "|---|---|---|---|",
    ]
    for name, flops, rate in machine_rows:
        g = flops * rate / 1e9
        lines.append(f"| {name.removeprefix('privrec: ')} | {flops / 1e9:.2f} | {g:.1f} | {g / mm[prec]:.0%} |")
    publish(args.out, "bench_core:avx2" if avx2_emulated() else "bench_core", "\n".join(lines))


if __name__ == "__main__":
    main()
