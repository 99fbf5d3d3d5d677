"""What a person reads in a log file (SLURM, nohup): no progress bar, one plain line per log step with step,
loss, images/s and ETA, and a line saying which schedule the run follows."""

from __future__ import annotations

import re

from tests.tiny import run_training, tiny_overrides


def test_log_file_gets_plain_lines_and_the_schedule(tmp_path):
    result = run_training(tiny_overrides(tmp_path, "run", "train.max_steps=4", "log.progress_bar=true"))
    lines = re.findall(r"step (\d+)/4  loss [\d.]+  [\d.]+ images/s  ETA \d+:\d\d:\d\d", result.stderr)
    assert lines == ["2", "4"], result.stderr
    assert "it/s" not in result.stderr and "step/s" not in result.stderr  # no tqdm bar in a pipe
    assert "schedule: 4 steps from train.max_steps=4 (the whole schedule is fitted into these steps)" in result.stderr
    assert "lr warmup over 4 steps to" in result.stderr
    cut = run_training(tiny_overrides(tmp_path, "short", "train.max_steps=3", "log.progress_bar=false"))
    assert "lr warmup over 3 steps (optim.warmup_epochs asks for 4: cut to the run)" in cut.stderr


def test_end_of_run_knn_announces_itself_and_a_summary_closes_the_run(tmp_path):
    result = run_training(tiny_overrides(tmp_path, "run", "train.max_steps=2", "eval.knn=true", "eval.knn_k=[5]",
                                         "eval.resize_size=32", "eval.crop_size=32"))
    assert "end-of-run k-NN: 35 training and 1762 held-out images (split 'test') at resize 32 / crop 32" in result.stderr
    summary = re.search(r"summary: 2 steps in \d+ min \d\d s, [\d.]+ images/s, final loss [\d.]+, k-NN top-1 "
                        r"[\d.]+% \(k=5\)", result.stderr)
    assert summary, result.stderr
    assert "features:" not in result.stderr  # no extraction progress bar in a log file


def test_recipes_can_be_listed_and_a_config_printed_without_running(tmp_path):
    import subprocess
    import sys

    from tests.tiny import REPO, subprocess_env

    def command(*arguments):
        return subprocess.run([sys.executable, "-m", "ssd.train", *arguments], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=120)

    listing = command("--list-recipes")
    assert listing.returncode == 0 and "dinov2_vit_large14_imagenet" in listing.stdout and "DINOv2 ViT-L/14" in listing.stdout
    printed = command("--config", "ibot_digits_demo", "--print-config", "optim.base_lr=0.002",
                      f"output.root={tmp_path}")
    assert printed.returncode == 0 and "name: ibot" in printed.stdout and "base_lr: 0.002" in printed.stdout
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was written
    assert command("--print-config", "optim.base_lr=-1").returncode == 2
