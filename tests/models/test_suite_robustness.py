"""The tiny suite grows an induction head whatever the CPU's kernels: a slow check (~25 minutes on two
cores), run by `make check-suite`, not by `make test`.

It trains the tiny preset's suite (seed 0) twice at once, with this CPU's best kernels and with ATen
and oneDNN capped at AVX2, through `benchmarks/induction_grid.py` (the script behind chapter 1's
robustness grid), and asserts the phenomenon in both: the induction score passes
`INDUCTION_ON_NATS`, and does so at snapshots at most one checkpoint interval apart.
"""

import json
import subprocess
import sys

import pytest

from crosslib.analyses.dynamics import INDUCTION_ON_NATS
from crosslib.book import claims
from crosslib.constants import REPO_ROOT
from crosslib.models.suite import SUITE_PRESETS

pytestmark = pytest.mark.check_suite


def test_induction_forms_under_two_instruction_sets(tmp_path):
    out = tmp_path / "grid.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "induction_grid.py"), "--seeds", "0",
                    "--variants", "fp32", "fp32-avx2", "--jobs", "2", "--work", str(tmp_path), "--out", str(out)],
                   check=True)
    runs = json.loads(out.read_text())["runs"]
    assert [run["variant"] for run in runs] == ["fp32", "fp32-avx2"]
    assert runs[1]["machine"]["aten_cpu_capability"] == "AVX2" and runs[1]["machine"]["onednn_max_cpu_isa"] == "AVX2"
    for run in runs:
        assert run["induction_on_step"] is not None, run
        assert run["final_induction_score"] > INDUCTION_ON_NATS, run
    verdict = claims.induction_is_robust([run["induction_on_step"] for run in runs], SUITE_PRESETS["tiny"].linear_every)
    assert verdict.verdict == "yes", verdict
