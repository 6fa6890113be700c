"""Run a benchmark as if on an AVX2-only CPU (the other kind of machine privrec runs on, ENVIRONMENT.md).

Every kernel library PyTorch calls picks its instruction set on its own, so all of them are told:
ATen's vectorised ops (``ATEN_CPU_CAPABILITY``), oneDNN (``ONEDNN_MAX_CPU_ISA``), MKL's fp32 GEMM
(``MKL_ENABLE_INSTRUCTIONS``; without it an Intel CPU with AVX-512 still runs ``mm`` at AVX-512 speed: 313
vs 195 GFLOP/s for (712 x 576) @ (576 x 1536) on two cores of the Intel AMX machine), FBGEMM's int8 kernels
(``FBGEMM_ENABLE_INSTRUCTIONS``), and privrec's ``precision: auto`` (``PRIVREC_CPU_BF16=0``: fp32, as on a
CPU without native bf16). Same cores, caches and memory as the real CPU: an emulation, and docs say so.
"""

from __future__ import annotations

import os
import sys

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "PRIVREC_CPU_BF16": "0"}


def _wanted(leave: tuple[str, ...] = ()) -> dict[str, str]:
    return {k: v for k, v in AVX2_ENV.items() if k not in leave}


def avx2_emulated(leave: tuple[str, ...] = ()) -> bool:
    return all(os.environ.get(k) == v for k, v in _wanted(leave).items())


def emulate_avx2(leave: tuple[str, ...] = ()) -> None:
    """Start this script again with :data:`AVX2_ENV` set, but for the variables named in ``leave`` (the libraries
    read it when they load, so it cannot be set from inside a process that already imported torch); returns at
    once when it is already set."""
    if not avx2_emulated(leave) or any(k in os.environ for k in leave):
        env = {k: v for k, v in {**os.environ, **_wanted(leave)}.items() if k not in leave}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def emulation_note() -> str:
    """What a table's machine line says of the emulation: the variables set, or nothing."""
    on = {k: v for k, v in AVX2_ENV.items() if os.environ.get(k) == v}
    return (" AVX2 emulated (" + " ".join(f"{k}={v}" for k, v in on.items()) + ")"
            if "ATEN_CPU_CAPABILITY" in on else "")
