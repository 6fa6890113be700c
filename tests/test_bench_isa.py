"""The benchmark helpers behind the AVX2 numbers in docs/benchmarks.md: the emulation really keeps PyTorch to
AVX2 and fp32 (benchmarks/isa.py), and the int8 probe's layer is the linear map it replaces, to int8 rounding
(benchmarks/probe_int8.py)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import BENCHMARKS, benchmark_module
from torch import nn

x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 and FBGEMM are x86 only")

SCRIPT = """
import json, os, sys
sys.path.insert(0, {bench!r})
from isa import emulate_avx2, emulation_note
emulate_avx2()
import torch
from privrec.model.backbone import use_bf16
print(json.dumps({{"capability": torch.backends.cpu.get_cpu_capability(),
                  "mkl": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
                  "bf16": use_bf16("auto", torch.device("cpu")), "note": emulation_note()}}))
"""


@x86
def test_the_avx2_emulation_restarts_the_process_with_avx2_kernels_and_fp32(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT.format(bench=str(BENCHMARKS)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "PRIVREC_CPU_BF16")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["capability"] == "AVX2" and seen["mkl"] == "AVX2"
    assert seen["bf16"] is False  # precision: auto resolves as on a CPU without native bf16
    assert "AVX2 emulated" in seen["note"]


@x86
def test_the_smoothed_int8_layer_computes_its_linear_map_to_int8_rounding():
    probe = benchmark_module("probe_int8")
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=True)
    x = torch.randn(4, 10, 64)
    x[..., 3] *= 40  # an outlier channel, as in an LLM's activations
    want = lin(x)
    amax = x.abs().reshape(-1, 64).amax(0)
    torch.backends.quantized.engine = "fbgemm"
    err = {a: ((probe.SmoothedInt8Linear(lin, amax, a)(x) - want).norm() / want.norm()).item() for a in (0.0, 0.5)}
    assert err[0.5] < 0.05  # the same map
    assert err[0.5] < err[0.0]  # smoothing moves the outlier's range into the weights, where it costs less


def test_the_probe_quantizes_frozen_maps_only():
    probe = benchmark_module("probe_int8")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    names = {f"{type(p).__name__}.{a}" for p, a, _ in probe.frozen_linears(model, ["down_proj"])}
    assert names == {"Linear.base_layer", "LlamaAttention.k_proj", "LlamaAttention.o_proj", "LlamaMLP.gate_proj",
                     "LlamaMLP.up_proj"}  # not LoRA's A and B, not the head, not what --skip names
    assert len(probe.frozen_linears(model, [])) == 2 * 7
