"""How close is the memory estimate of `ssd.engine.memory` to what a training step really takes?

For each setting: build the run as `python -m ssd.train` does, let the trainer estimate its memory (the check
that refuses runs too large for the machine), then run real optimizer steps and read the process's peak resident
memory above what it held before the estimate (Linux VmHWM, reset through /proc/self/clear_refs). The data
loader runs in the main process (num_workers=0) so that every byte lands in the measured process.

    python benchmarks/memory_estimate.py            # prints a markdown table (recorded in benchmarks/RESULTS.md)
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time

SETTINGS = [
    ("dino_digits_demo", ["train.batch_size=64"]),
    ("dino_cifar10_vit_small", ["train.batch_size=32"]),
    ("dino_cifar10_vit_small", ["train.batch_size=64"]),
    ("dino_cifar10_resnet10t_cpu", ["train.batch_size=64"]),
    ("dino_cifar10_resnet10t_cpu", ["train.batch_size=256"]),
    ("ibot_digits_demo", ["train.batch_size=64"]),
]

CHILD = r"""
import json, sys, tempfile
from pathlib import Path
import torch
from ssd.config import load_config
from ssd.data import build_dataset
from ssd.engine import distributed
from ssd.engine.trainer import Trainer
from ssd.methods import build_method
from ssd.train import build_transform

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
recipe, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cfg = load_config(recipe, [*overrides, "data.num_workers=0", "log.tensorboard=false"])
info = distributed.init_distributed(cfg.train.device)
dataset = build_dataset(cfg.data, cfg.data.split)
method = build_method(cfg)
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # reset VmHWM (the peak) to the current RSS
trainer = Trainer(cfg, method, dataset, build_transform(cfg, info.device.type), info, Path(tempfile.mkdtemp()))
estimate = trainer.memory_estimate
batches = trainer._batches()
for step in range(steps):
    trainer.train_step(batches, trainer.schedule(step))
peak = status("VmHWM") - before
print(json.dumps({"estimate": estimate.device_need(trainer.micro_batch), "measured": peak,
                  "micro_batch": trainer.micro_batch}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps measured after the estimate")
    parser.add_argument("--data-root", default="", help="CIFAR-10 folder for the cifar10 recipes (skipped if empty)")
    args = parser.parse_args()
    import json

    import torch

    print(f"date: {time.strftime('%Y-%m-%d')}, machine: {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| recipe | overrides | micro-batch | estimate GiB | measured peak GiB | estimate / measured |")
    print("|---|---|---:|---:|---:|---:|")
    for recipe, overrides in SETTINGS:
        if "cifar10" in recipe:
            if not args.data_root:
                continue
            overrides = [*overrides, f"data.root={args.data_root}"]
        with tempfile.TemporaryDirectory() as root:
            command = [sys.executable, "-c", CHILD, recipe, str(args.steps), *overrides, f"output.root={root}"]
            result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"| {recipe} | {' '.join(overrides)} | failed: {result.stderr.strip().splitlines()[-1]} |||")
            continue
        row = json.loads(result.stdout.strip().splitlines()[-1])
        shown = " ".join(o for o in overrides if not o.startswith("data.root"))
        print(f"| {recipe} | {shown} | {row['micro_batch']} | {row['estimate'] / 2**30:.2f} | "
              f"{row['measured'] / 2**30:.2f} | {row['estimate'] / row['measured']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
