"""A full disk on a real (small) tmpfs: the run stops with "no space left" and the path, removes its partial
temporary file, keeps the earlier checkpoints, and resumes once there is room. Needs root to mount; CI runs
as root, so there a missing privilege is a failure rather than a skip."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ssd.engine import checkpoint as ckpt
from tests.tiny import REPO, run_training, subprocess_env, tiny_overrides, train_command

CHECKPOINT_MB = 15  # the tiny model's checkpoint (student, teacher, Adam moments)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs with room for one checkpoint and a half."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root and must mount a tmpfs for the full-disk test")
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={CHECKPOINT_MB * 3 // 2 + 2}m", "tmpfs", str(mount_point)],
                   check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_stops_cleanly_and_resumes_after_space_is_freed(small_disk):
    overrides = tiny_overrides(small_disk, "run", "train.max_steps=9", "checkpoint.keep=3")
    result = subprocess.run(train_command(overrides), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"no space left to write checkpoint {small_disk / 'run' / 'checkpoint_00000006.pt'}" in result.stderr
    leftovers = [p.name for p in (small_disk / "run").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "a partial temporary checkpoint still fills the disk"
    assert ckpt.load_checkpoint(small_disk / "run" / "checkpoint_00000003.pt")["step"] == 3
    assert shutil.disk_usage(small_disk).free > 5 * 2**20

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = run_training(overrides)
    assert "resumed from" in resumed.stderr and "finished at step 9" in resumed.stderr


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path):
    overrides = tiny_overrides(tmp_path, "run", "train.max_steps=3")
    run_training(overrides)
    stale = tmp_path / "run" / ".checkpoint_00000006.pt.tmp-99999"  # as left by a SIGKILL mid-write
    stale.write_bytes(b"\0" * 4096)
    result = run_training([*overrides, "train.max_steps=4"])
    assert not stale.exists()
    assert "was being written when its process died" in result.stderr


def test_full_disk_during_a_sharded_two_process_save(small_disk):
    """Both FSDP processes write their slices; one disk fills: every process stops with the message, the partial
    folder is removed, the previous checkpoint folder stays whole, and the run resumes once there is room."""
    overrides = tiny_overrides(small_disk, "run", "train.max_steps=9", "checkpoint.keep=3", "train.parallel=fsdp")
    result = subprocess.run(train_command(overrides, nproc=2), cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0, result.stderr
    assert f"no space left to write checkpoint {small_disk / 'run' / 'checkpoint_00000006.dcp'}" in result.stderr
    assert "Traceback (most recent call last): (RANK" not in result.stderr, result.stderr
    leftovers = [p.name for p in (small_disk / "run").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "a partial checkpoint folder still fills the disk"
    assert ckpt.load_checkpoint(small_disk / "run" / "checkpoint_00000003.dcp", whole=True)["step"] == 3

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = run_training(overrides, nproc=2)
    assert "resumed from" in resumed.stderr and "finished at step 9" in resumed.stderr
