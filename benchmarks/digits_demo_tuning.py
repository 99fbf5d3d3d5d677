"""How the digits demo recipe (`python -m ssd.train`, ssd/configs/dino_digits_demo.yaml) was chosen: each row is
the default command with some config overrides; the table gives the k-NN (k=20 top-1 on the 360 held-out digits)
of the trained teacher and of the same network at random init, the steps, and the minutes the command took.

    python benchmarks/digits_demo_tuning.py [--rows 0 3 5] [--output-root /tmp/ssd-demo-tuning] [--seed 1]
    python benchmarks/digits_demo_tuning.py --list

Rows run one after the other (each is a real `python -m ssd.train` subprocess, so its time includes start-up and
the end-of-run k-NN report); on a shared machine the minutes depend on the load, printed with each row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# The recipe before this tuning (a 4-block ViT-tiny, DINO's photo augmentations), as overrides of today's recipe.
VIT = ["model.arch=vit_tiny_patch16_224", "model.patch_size=8", "model.timm_kwargs={depth: 4}",
       "crops.flip_probability=0.5", "crops.color_jitter_probability=0.8", "crops.grayscale_probability=0.2",
       "crops.blur_probabilities=[1.0,0.1,0.5]", "crops.solarize_probability=0.2", "crops.rotation_degrees=0",
       "crops.global_scale=[0.5,1.0]", "crops.local_scale=[0.2,0.5]", "train.epochs=7"]

# (what the row changes, overrides of ssd/configs/dino_digits_demo.yaml); row 0 is the recipe itself.
ROWS: list[tuple[str, list[str]]] = [
    ("chosen recipe", []),
    ("previous recipe: ViT-tiny (4 blocks, 8 px patches), DINO's photo augmentations, 7 epochs", VIT),
]


def run_row(overrides: list[str], root: Path, name: str) -> dict:
    command = [sys.executable, "-m", "ssd.train", f"output.root={root}", f"output.run_name={name}",
               "log.progress_bar=false", *overrides]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    minutes = (time.perf_counter() - started) / 60
    if result.returncode != 0:
        raise SystemExit(f"run {name} failed ({' '.join(overrides)}):\n{result.stderr[-3000:]}")
    report = json.loads((root / name / "knn.json").read_text())
    report = report.get("results", report)  # the table of each model, whichever layout knn.json has
    logged = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return {"steps": max(entry.get("step", 0) for entry in logged), "minutes": minutes,
            "trained": report["trained teacher"]["k=20"]["top1"],
            "random_init": report["random init (same arch)"]["k=20"]["top1"],
            "load": (load_before, os.getloadavg()[0]), "log": result.stderr}


def markdown_row(label: str, row: dict) -> str:
    return (f"| {label} | {row['trained']:.1f}% | {row['random_init']:.1f}% | {row['steps']} | {row['minutes']:.1f} "
            f"| {row['load'][0]:.1f} / {row['load'][1]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", help="row numbers to run (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="list the rows and their overrides, run nothing")
    parser.add_argument("--output-root", type=Path, default=None, help="run folders (default: a temporary folder, "
                        "deleted at the end)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every row")
    parser.add_argument("extra", nargs="*", help="key=value overrides added to every row")
    args = parser.parse_args()
    rows = args.rows if args.rows is not None else list(range(len(ROWS)))
    if args.list:
        for index, (label, overrides) in enumerate(ROWS):
            print(f"{index:>2}  {label}\n    {' '.join(overrides) or '(the recipe as it is)'}")
        return
    root = args.output_root or Path(tempfile.mkdtemp(prefix="ssd-demo-tuning-"))
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}; "
          f"seed {args.seed}; runs under {root}", flush=True)
    print("\n| change from the chosen recipe | k-NN trained | k-NN random init | steps | minutes | load before / "
          "after |\n| --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    try:
        for index in rows:
            label, overrides = ROWS[index]
            row = run_row([*overrides, f"train.seed={args.seed}", *args.extra], root, f"row{index}-seed{args.seed}")
            print(markdown_row(label, row), flush=True)
    finally:
        if args.output_root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
