"""Would int8 arithmetic make fresh-prompt scoring fast enough on an AVX2-only CPU, and what would it cost?

On AVX2 there is no bf16, and fp32 scoring with the shared prompt prefix already spends ~78% of its time in
GEMMs running at the plain fp32 matmul's rate (docs/benchmarks.md), so the remaining lever is lower-precision
arithmetic. This probe swaps every frozen linear map of a trained model (LoRA stays fp32) for PyTorch's dynamic
int8 linear (FBGEMM: per-output-channel int8 weights, int8 activations with one scale per call), after
SmoothQuant-style smoothing (Xiao et al., 2023): per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
from a few training prompts, W' = W diag(s), and the layer computes int8(x / s) @ int8(W')^T. It then scores
the same fresh test prompts as the fp32 scorer and the naive loop (bench_core.py) and reports speed, AUC and
how far P(Yes) moved. ``--split valid`` scores validation prompts instead: choose ``--skip`` and ``--alpha``
there, then report test.

A probe, not a feature: nothing in privrec uses int8, because the scores move (docs/benchmarks.md, "Scoring
fresh prompts on AVX2").

    python benchmarks/probe_int8.py runs/orig --emulate-avx2 --skip down_proj --alpha 0.8 [--split valid]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch
from bench_core import fresh_cache, naive_batches, naive_logits
from isa import emulate_avx2, emulation_note
from mdsection import publish
from sklearn.metrics import roc_auc_score
from torch import nn

from privrec.model.prefix_scoring import padded
from privrec.prepare import machine
from privrec.recommender import OneAdapter, open_model


class SmoothedInt8Linear(nn.Module):
    """``lin`` as a dynamic int8 linear map after smoothing its input channels by ``amax_x`` (module docstring)."""

    def __init__(self, lin: nn.Linear, amax_x: torch.Tensor, alpha: float):
        import torch.ao.nn.quantized.dynamic as nnqd
        from torch.ao.quantization import per_channel_dynamic_qconfig

        super().__init__()
        w = lin.weight.detach().float()
        s = (amax_x.clamp(min=1e-5) ** alpha / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        smoothed = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        with torch.no_grad():
            smoothed.weight.copy_(w * s)
            if lin.bias is not None:
                smoothed.bias.copy_(lin.bias)
        smoothed.qconfig = per_channel_dynamic_qconfig
        self.q = nnqd.Linear.from_float(smoothed)
        self.register_buffer("inv_s", 1.0 / s)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x * self.inv_s)


def frozen_linears(model: nn.Module, skip: list[str]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) of every frozen nn.Linear: not LoRA's, not the LM head, not named in skip."""
    out = []
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            full = f"{name}.{attr}"
            if type(child) is nn.Linear and "lora_" not in full and "lm_head" not in full \
                    and not any(p in full for p in skip):
                out.append((parent, attr, child))
    return out


@torch.no_grad()
def input_maxima(m, linears, prompts, batch_size: int) -> dict[int, torch.Tensor]:
    """Per input channel, the largest |x| each linear map sees over ``prompts`` (whole prompts)."""
    amax = {id(lin): torch.zeros(lin.in_features) for _, _, lin in linears}

    def record(mod, inp, _out):
        x = inp[0].detach().abs().reshape(-1, mod.in_features).amax(0).float().cpu()
        amax[id(mod)] = torch.maximum(amax[id(mod)], x)

    hooks = [lin.register_forward_hook(record) for _, _, lin in linears]
    try:
        saved, m.share_prefix = m.share_prefix, False
        m.score_logits(prompts, batch_size, progress=False)
    finally:
        m.share_prefix = saved
        for h in hooks:
            h.remove()
    return amax


@torch.no_grad()
def timed_score(m, enc, batch_size: int) -> tuple[np.ndarray, float]:
    """Logits and prompts/s over fresh prompts: the frozen cache emptied first, so every layer runs in the timing."""
    fresh_cache(m)
    t0 = time.perf_counter()
    z = np.asarray(m.score_logits(enc, batch_size, progress=False), dtype=np.float64)
    return z, len(enc) / (time.perf_counter() - t0)


@torch.no_grad()
def naive_rate(m, enc, batch_size: int) -> float:
    """Prompts/s of bench_core.py's naive loop (every layer from token ids, whatever the model caches)."""
    t0 = time.perf_counter()
    for idx in naive_batches(enc, batch_size):
        ids, mask, lengths = padded(m, [enc[i].ids for i in idx])
        naive_logits(m, SimpleNamespace(input_ids=ids, attention_mask=mask, last=lengths - 1))
    return len(enc) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a one-adapter model directory (privrec train)")
    ap.add_argument("--split", default="test", choices=["valid", "test"],
                    help="score this split (choose layers and alpha on valid, report test)")
    ap.add_argument("--n-test", type=int, default=200, help="the first N prompts of --split")
    ap.add_argument("--calibrate", type=int, default=32, help="training prompts that set the smoothing")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--skip", default="", help="comma-separated names of linear maps kept fp32 (e.g. down_proj)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--emulate-avx2", action="store_true", help="keep every kernel library to AVX2 (isa.py)")
    ap.add_argument("--out", default=None, help="also rewrite section probe_int8 of this markdown file")
    args = ap.parse_args()
    if args.emulate_avx2:
        emulate_avx2()
    torch.backends.quantized.engine = "fbgemm"
    skip = [s for s in args.skip.split(",") if s]

    md = open_model(args.model)
    splits = md.splits()
    m = OneAdapter(md, splits).model
    m.cache_dir, m.share_prefix = None, True  # an in-memory frozen cache only: nothing scored before is reused
    test = splits.get(args.split)[: args.n_test]
    y = np.array([s.label for s in test])
    enc = m.encode(test)
    m.model.eval()
    naive = naive_rate(m, enc, args.batch_size)
    z32, r32 = timed_score(m, enc, args.batch_size)
    linears = frozen_linears(m.model, skip)
    amax = input_maxima(m, linears, m.encode(splits.train[: args.calibrate]), args.batch_size)
    for parent, attr, lin in linears:
        setattr(parent, attr, SmoothedInt8Linear(lin, amax[id(lin)], args.alpha))
    z8, r8 = timed_score(m, enc, args.batch_size)
    p32, p8 = 1 / (1 + np.exp(-z32)), 1 / (1 + np.exp(-z8))
    dp = np.abs(p32 - p8)
    kept = ", ".join(skip) if skip else "none"
    publish(args.out, "probe_int8", "\n".join([
        f"Model `{args.model}` ({md.cfg.model.name}), the first {len(enc)} {args.split} prompts (fresh: the frozen "
        f"cache emptied before each timing), batch {args.batch_size}, shared prefix on; {len(linears)} frozen linear "
        f"maps int8 (kept fp32: {kept}), smoothing alpha {args.alpha} from {args.calibrate} training prompts.",
        f"Machine: {machine()}.{emulation_note()}",
        f"Command: `python benchmarks/probe_int8.py {args.model}"
        + (" --emulate-avx2" if args.emulate_avx2 else "") + (f" --skip {args.skip}" if skip else "")
        + (f" --alpha {args.alpha}" if args.alpha != 0.5 else "")
        + (f" --split {args.split}" if args.split != "test" else "") + "`",
        "",
        f"| scorer | prompts/s | x naive | {args.split} AUC | mean / max abs change of P(Yes) |",
        "|---|---|---|---|---|",
        f"| naive loop (fp32, whole prompts, full-vocabulary logits) | {naive:.2f} | 1.00x | - | - |",
        f"| privrec fp32, shared prefix | {r32:.2f} | {r32 / naive:.2f}x | {roc_auc_score(y, z32):.4f} | - |",
        f"| privrec int8 (smoothed, dynamic), shared prefix | {r8:.2f} | {r8 / naive:.2f}x | "
        f"{roc_auc_score(y, z8):.4f} | {dp.mean():.4f} / {dp.max():.3f} |",
    ]))


if __name__ == "__main__":
    main()
