"""A tiny but real DINO run (2-block ViT, 36 digit images) that CPU tests train in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = [
    "model.arch=vit_tiny_patch16_224",
    "model.img_size=32",
    "model.patch_size=8",
    "model.timm_kwargs.depth=2",
    "model.drop_path_rate=0.1",
    "head.out_dim=64",
    "head.hidden_dim=64",
    "head.bottleneck_dim=32",
    "head.use_bn=false",  # BatchNorm statistics are per process: no equality across world sizes with it
    "crops.global_size=32",
    "crops.local_number=2",
    "crops.local_size=16",
    "data.dataset=digits",
    "data.holdout_fraction=0.98",  # 36 training images: 4 steps per epoch at batch 8
    "data.num_workers=0",
    "train.batch_size=8",
    "train.epochs=5",
    "optim.warmup_epochs=1",
    "optim.base_lr=0.002",  # fixed here so the tests do not follow the demo recipe's tuning
    "checkpoint.every_steps=3",
    "log.every_steps=2",
    "log.progress_bar=false",
    "log.tensorboard=false",
    "eval.knn=false",
]


def tiny_overrides(root: Path, run_name: str, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"output.root={root}", f"output.run_name={run_name}", *extra]


def train_command(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ssd.train", *overrides]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*torchrun, "-m", "ssd.train", *overrides]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_training(overrides: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(overrides, nproc), cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def final_weights(run_dir: Path) -> dict:
    from ssd.engine.checkpoint import find_latest_checkpoint, load_checkpoint

    state = load_checkpoint(find_latest_checkpoint(run_dir), whole=True)
    return {name: value for name, value in state["method"].items() if isinstance(value, torch.Tensor)}


def assert_bitwise_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def sigkill_once_saved(overrides: list[str], run_dir: Path, step: int) -> None:
    """Start the training command, SIGKILL it as soon as checkpoint `step` exists (mid-run), wait for it."""
    import signal

    process = subprocess.Popen(train_command(overrides), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    target = run_dir / f"checkpoint_{step:08d}.pt"
    while not target.exists():
        assert process.poll() is None, f"training ended before {target.name}:\n{process.stdout.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def assert_resume_after_sigkill_is_bitwise_equal(root: Path, overrides: tuple[str, ...], kill_at_step: int) -> None:
    """An uninterrupted run and one SIGKILLed after checkpoint `kill_at_step` then resumed end bitwise equal."""
    run_training(tiny_overrides(root, "uninterrupted", *overrides))
    killed = tiny_overrides(root, "killed", *overrides)
    sigkill_once_saved(killed, root / "killed", kill_at_step)
    result = run_training(killed)
    assert "resumed from" in result.stderr
    assert_bitwise_equal(final_weights(root / "killed"), final_weights(root / "uninterrupted"))
