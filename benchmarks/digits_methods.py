"""Each method's digits recipe from the command line: steps, minutes and k-NN (k=20) of the trained network (the
EMA teacher, or the student of a fixed teacher) next to random init and raw pixels, as
`python -m ssd.train --config <name>_digits_demo` prints them.

    python benchmarks/digits_methods.py [--methods dino ibot dinov2 ijepa salt_stage1 salt_stage2 dino_random_teacher
                                         feature_distill masked_kd multi_distill]

Recipes with a frozen teacher read the run of another recipe of the same invocation (list it first, see
TEACHER_OF): salt_stage2 <- salt_stage1, feature_distill <- dino, masked_kd <- feature_distill, multi_distill <-
dinov2. A multi-student run gives one row per student, each next to its own architecture at random init.

Each run is a subprocess (the real command); the table goes to stdout as JSON lines and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Recipes whose frozen teacher is the run of another recipe of the same invocation.
TEACHER_OF = {"salt_stage2": "salt_stage1", "feature_distill": "dino", "masked_kd": "feature_distill",
              "multi_distill": "dinov2"}


def run_method(method: str, root: Path, extra: list[str]) -> tuple[list[dict], Path]:
    run_name = f"{method}-digits-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, "-m", "ssd.train", "--config", f"{method}_digits_demo", f"output.root={root}",
               f"output.run_name={run_name}", "log.progress_bar=false", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    minutes = (time.perf_counter() - started) / 60
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
    report = json.loads((root / run_name / "knn.json").read_text())
    steps = [json.loads(line)["step"] for line in (root / run_name / "metrics.jsonl").read_text().splitlines()]
    top1 = {name: values["k=20"]["top1"] for name, values in report["results"].items() if isinstance(values, dict)
            and "k=20" in values}
    trained = [name for name in top1 if name.startswith("trained ")]
    rows = []
    for name in trained:
        baseline = "random init (same arch)" if len(trained) == 1 else f"random init ({name[len('trained '):]}'s arch)"
        rows.append({"method": method, "steps": steps[-1], "minutes": round(minutes, 2), "evaluated": name,
                     "knn_trained": top1[name], "knn_random_init": top1[baseline],
                     "knn_raw_pixels": top1["raw pixels"], "overrides": extra})
    return rows, root / run_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["dino", "ibot", "dinov2"])
    parser.add_argument("--output-root", default="/tmp/ssd-digits-methods")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    rows, runs = [], {}
    for method in args.methods:
        extra = list(args.overrides)
        if method in TEACHER_OF:
            teacher = TEACHER_OF[method]
            if teacher not in runs:
                raise SystemExit(f"{method} needs the run of {teacher} as its teacher: list {teacher} before it")
            extra.append(f"teacher.source={runs[teacher]}")
        method_rows, runs[method] = run_method(method, Path(args.output_root), extra)
        rows.extend(method_rows)
    for row in rows:
        print(json.dumps(row))
    print("\n| method | steps | minutes | evaluated | k-NN trained | random init | raw pixels |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['steps']} | {row['minutes']:.1f} | {row['evaluated']} | {row['knn_trained']:.2f}% | "
              f"{row['knn_random_init']:.2f}% | {row['knn_raw_pixels']:.2f}% |")


if __name__ == "__main__":
    main()
