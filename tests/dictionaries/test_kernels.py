"""The compiled kernels (crosslib/dictionaries/kernels.py) equal the eager ones on every instruction set this CPU can
emulate, and never corrupt memory (each run in a fresh process with glibc's heap checks: an overflow aborts it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crosslib.machine import cpu_flags

HERE = Path(__file__).parent


ISAS = ["default", "avx2"] + (["avx512"] if "avx512f" in cpu_flags() else [])


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("isa", ISAS)
def test_compiled_kernels_equal_eager_and_stay_in_bounds(isa):
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")
    if isa != "default":
        env["ATEN_CPU_CAPABILITY"] = isa  # ATen's kernels and inductor's choice of vector ISA
    quick = [] if os.environ.get("CROSSLIB_FULL_KERNEL_CHECK") else ["--quick"]
    proc = subprocess.run([sys.executable, str(HERE / "kernel_check.py"), *quick], env=env, capture_output=True,
                          text=True, timeout=1200)
    tail = (proc.stdout + proc.stderr)[-2000:]
    assert proc.returncode == 0, f"ISA {isa}: exit {proc.returncode}\n{tail}"
    assert "kernels ok:" in proc.stdout, tail
