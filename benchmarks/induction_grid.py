"""Does the tiny suite grow an induction head whatever the seed, precision and CPU kernels?

Trains the tiny suite once per cell of a grid — seeds × variants, where a variant is the training
precision and a cap on the CPU kernels' instruction set:

    fp32         fp32 (the suite's default), this CPU's best kernels
    fp32-avx2    fp32 with ATen and oneDNN capped at AVX2 (the kernels of an AVX2-only laptop)
    bf16         bf16 autocast, this CPU's best kernels (AMX or AVX-512-BF16 where present)
    bf16-avx2    bf16 autocast capped at AVX2: not in the default grid, since without bf16
                 instructions a step takes ~12x longer (6.2 s instead of 0.50 s on one core here)

and records, per run: the final held-out loss, the first snapshot whose induction score exceeds
`crosslib.analyses.dynamics.INDUCTION_ON_NATS`, the final induction score and the unigram/bigram
saturation steps. Each cell runs in its own process (the ISA cap must be set before torch
starts) with one thread and its own data directory; `--jobs 2` runs two at once. A cell whose
result file exists is skipped, so a killed grid resumes. The summary JSON is what chapter 1
reads (`notebooks/records/induction_grid.json`).

    .venv/bin/python benchmarks/induction_grid.py --work /tmp/induction-grid --jobs 2 \\
        --out notebooks/records/induction_grid.json

About 23 minutes per fp32 cell and 17 per bf16 cell on one core of a 2-core laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from crosslib.constants import data_dir

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
VARIANTS = {"fp32": {"bf16": False, "env": {}},
            "fp32-avx2": {"bf16": False, "env": AVX2},
            "bf16": {"bf16": True, "env": {}},
            "bf16-avx2": {"bf16": True, "env": AVX2}}
DEFAULT_VARIANTS = ("fp32", "fp32-avx2", "bf16")


def run_cell(seed: int, variant: str, out: Path, preset: str) -> dict:
    """Train one cell's suite in this process and return its record (call in a fresh process)."""
    import torch

    from crosslib.runtime import THREADS_ENV, configure_process

    os.environ[THREADS_ENV] = "fixed"  # one thread per cell, two cells side by side
    configure_process()  # crosslib's allocator tuning, as `crosslib book` trains the suite
    torch.set_num_threads(1)
    from crosslib.analyses.dynamics import learning_dynamics, phase_summary
    from crosslib.machine import machine_description
    from crosslib.models.suite import SUITE_PRESETS, train_suite

    config = SUITE_PRESETS[preset].replace(seed=seed, bf16=VARIANTS[variant]["bf16"])
    start = time.perf_counter()
    path = train_suite(config, progress=False)
    seconds = time.perf_counter() - start
    metrics = learning_dynamics(path, progress=False)
    summary = phase_summary(metrics)
    record = {
        "seed": seed, "variant": variant, "suite_key": config.key(),
        "preset_key": SUITE_PRESETS[preset].key(),  # the configuration the grid varies
        "final_loss": round(summary["final_loss"], 3),
        "induction_on_step": summary["induction_step"],
        "final_induction_score": round(summary["final_induction_score"], 2),
        "unigram_saturation_step": summary["unigram_saturation_step"],
        "bigram_saturation_step": summary["bigram_saturation_step"],
        "induction_scores": {str(s): round(float(v), 2) for s, v in zip(metrics["step"], metrics["induction_score"])},
        "machine": machine_description(),
        "train_seconds": round(seconds, 1),
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def launch(seed: int, variant: str, work: Path, preset: str) -> dict:
    """One cell in a subprocess with its variant's environment; returns its record."""
    label = f"s{seed}-{variant}"
    result = work / "results" / f"{label}.json"
    if not result.is_file():
        data = work / "data" / label
        data.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **VARIANTS[variant]["env"], "CROSSLIB_DATA": str(data), "OMP_NUM_THREADS": "1"}
        downloads = data_dir() / "downloads"  # the corpora already fetched (offline machines cannot fetch again)
        if downloads.is_dir() and not (data / "downloads").exists():
            (data / "downloads").symlink_to(downloads)
        log = work / "logs" / f"{label}.log"
        print(f"start {label}", flush=True)
        with log.open("w") as stream:
            subprocess.run([sys.executable, __file__, "--cell", str(seed), variant, "--preset", preset,
                            "--result", str(result)], env=env, stdout=stream, stderr=subprocess.STDOUT, check=True)
    record = json.loads(result.read_text())
    print(f"done {label}: induction on at step {record['induction_on_step']}, "
          f"final score {record['final_induction_score']} nats, loss {record['final_loss']}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--work", type=Path, default=Path("/tmp/crosslib-induction-grid"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the grid's summary JSON here")
    parser.add_argument("--cell", nargs=2, metavar=("SEED", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        run_cell(int(args.cell[0]), args.cell[1], args.result, args.preset)
        return
    for sub in ("results", "logs", "data"):
        (args.work / sub).mkdir(parents=True, exist_ok=True)
    cells = [(seed, variant) for variant in args.variants for seed in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda cell: launch(*cell, args.work, args.preset), cells))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"preset": args.preset, "runs": records}, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
