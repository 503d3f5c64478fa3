"""What this CPU can do, as far as crosslib's numbers and speed depend on it.

bf16 matmuls are fast only where the CPU multiplies bf16 natively (AVX-512-BF16 or AMX). Elsewhere
oneDNN emulates them, and a bf16 training step was 7× (crosscoder) to 12× (suite) slower than the
same step in fp32 on an AVX2-capped run of the developers' machine. So the chapters train their
dictionaries in bf16 only where `native_bf16()` says so, and the snapshot suite in fp32 by default.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

# oneDNN's ONEDNN_MAX_CPU_ISA values that keep native bf16 matmuls (the AVX-512-BF16 and AMX levels)
NATIVE_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                    "ALL")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (`/proc/cpuinfo`, read once per process; empty where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(flags: frozenset[str] | set[str] | None = None, onednn_max_cpu_isa: str | None = None) -> bool:
    """Whether bf16 matmuls run natively here: the CPU has AVX-512-BF16 or AMX, and oneDNN is not capped
    below them (`ONEDNN_MAX_CPU_ISA`; arguments default to this machine and this process's environment)."""
    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") if onednn_max_cpu_isa is None else onednn_max_cpu_isa
    has = "avx512_bf16" in flags or "amx_bf16" in flags
    return has and (not cap or cap.upper() in NATIVE_BF16_ISAS)


def machine_description() -> dict[str, Any]:
    """The CPU features that change a training run's numbers: ATen's kernel ISA, oneDNN's cap, AMX."""
    import torch

    flags = cpu_flags()
    return {"aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "threads": torch.get_num_threads()}
