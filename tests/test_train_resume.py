"""Exact resume: a run killed with SIGKILL after a checkpoint and resumed ends bitwise equal to an
uninterrupted run (CPU). Also: SIGTERM saves and exits cleanly; a corrupt newest checkpoint falls back."""

import signal
import subprocess
import time

from ssd.train import EXIT_PREEMPTED
from tests.tiny import (
    REPO,
    assert_bitwise_equal,
    final_weights,
    run_training,
    subprocess_env,
    tiny_overrides,
    train_command,
)

# 36 images / batch 8 = 4 steps per epoch; 10 epochs; checkpoints every 3 steps, so the kill lands mid-epoch.
LONG = ("train.epochs=10", "data.num_workers=1")


def wait_for(path, process, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended before {path.name} appeared:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.01)


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    run_training(tiny_overrides(tmp_path, "uninterrupted", *LONG))
    reference = final_weights(tmp_path / "uninterrupted")

    overrides = tiny_overrides(tmp_path, "killed", *LONG)
    process = subprocess.Popen(train_command(overrides), cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "killed" / "checkpoint_00000006.pt", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "checkpoint_00000040.pt").exists()

    result = run_training(overrides)
    assert "resumed from" in result.stderr
    assert_bitwise_equal(final_weights(tmp_path / "killed"), reference)


def test_sigterm_saves_at_step_boundary_and_resume_finishes(tmp_path):
    overrides = tiny_overrides(tmp_path, "term", *LONG, "checkpoint.every_steps=1000")
    process = subprocess.Popen(train_command(overrides), cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "term" / "metrics.jsonl", process)
    while (tmp_path / "term" / "metrics.jsonl").stat().st_size == 0:
        assert process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output
    saved = sorted((tmp_path / "term").glob("checkpoint_*.pt"))
    assert len(saved) == 1 and saved[0].name != "checkpoint_00000040.pt", output
    assert "stop requested" in output

    run_training(overrides)
    assert (tmp_path / "term" / "checkpoint_00000040.pt").exists()


def test_corrupt_newest_checkpoint_is_reported_and_previous_used(tmp_path):
    overrides = tiny_overrides(tmp_path, "corrupt", "train.max_steps=9", "train.epochs=10")
    run_training(overrides)  # checkpoints at steps 3, 6, 9
    reference = final_weights(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "checkpoint_00000009.pt").unlink()
    newest = tmp_path / "corrupt" / "checkpoint_00000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as after a crash

    result = run_training(overrides)
    assert "skipping unreadable checkpoint" in result.stderr and "checkpoint_00000006.pt" in result.stderr
    assert "resumed from" in result.stderr and "checkpoint_00000003.pt" in result.stderr
    assert_bitwise_equal(final_weights(tmp_path / "corrupt"), reference)
