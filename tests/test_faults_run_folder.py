"""The run folder belongs to one run: a second run is refused, a changed config is judged before anything is
written, unreadable or blown-up checkpoints are never silently restarted over, a chosen checkpoint can be
resumed. Real runs of the tiny config, as subprocesses where the exit status matters."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssd.config import load_config
from ssd.engine import checkpoint as ckpt
from ssd.engine.run_folder import RunFolderError
from ssd.engine.run_lock import LOCK_NAME, RunLock, RunLockedError, holder_record
from ssd.engine.trainer import NonFiniteLossError
from ssd.methods.dino import DINO
from ssd.train import EXIT_PREEMPTED, run
from tests.tiny import (
    REPO,
    assert_bitwise_equal,
    final_weights,
    run_training,
    subprocess_env,
    tiny_overrides,
    train_command,
)


def train(overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(overrides), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def folder_snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(result: subprocess.CompletedProcess, *phrases: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    return result.stderr


# ---- one run at a time -------------------------------------------------------------------------------------


def test_second_run_on_the_same_folder_is_refused_at_once(tmp_path):
    overrides = tiny_overrides(tmp_path, "busy", "train.epochs=200", "checkpoint.every_steps=1000")
    first = subprocess.Popen(train_command(overrides), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "busy" / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size):
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    config_before = (tmp_path / "busy" / "config.yaml").read_bytes()

    started = time.monotonic()
    second = train([*overrides, "log.every_steps=1"])
    assert time.monotonic() - started < 60
    assert_refused(second, "is in use by another run", f"pid {first.pid} on {socket.gethostname()}")
    assert (tmp_path / "busy" / "config.yaml").read_bytes() == config_before

    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == EXIT_PREEMPTED, output
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == sorted(set(steps)), "two runs wrote metrics into one file"
    assert not (tmp_path / "busy" / LOCK_NAME).exists()


def write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({**holder_record(), **fields}))
    return path


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    write_lock(tmp_path, pid=dead_pid())
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "is gone" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_a_live_process_is_respected_even_with_a_recycled_check(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, process_start=open(f"/proc/{sleeper.pid}/stat").read()
                   .rsplit(")", 1)[1].split()[19])
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path).acquire()
        # The same pid with another start time is a recycled pid, not the holder.
        write_lock(tmp_path, pid=sleeper.pid, process_start="1")
        RunLock(tmp_path).acquire().release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_of_another_host_is_respected_until_its_heartbeat_stops(tmp_path):
    path = write_lock(tmp_path, host="gpu-node-17", pid=4242, boot_id="other")
    with pytest.raises(RunLockedError, match="pid 4242 on gpu-node-17"):
        RunLock(tmp_path).acquire()
    ten_minutes_ago = time.time() - 600
    os.utime(path, (ten_minutes_ago, ten_minutes_ago))
    RunLock(tmp_path).acquire().release()


def test_lock_of_an_earlier_start_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    write_lock(tmp_path, host="gpu-node-17", pid=4242, boot_id="other", slurm_job_id="77", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock(tmp_path).acquire().release()


# ---- config changes on resume ------------------------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path) -> tuple[list[str], Path]:
    overrides = tiny_overrides(tmp_path, "run", "train.max_steps=6")
    run_training(overrides)
    return overrides, tmp_path / "run"


def test_resume_with_changed_shapes_or_schedules_is_refused_and_touches_nothing(finished_run):
    overrides, run_dir = finished_run
    before = folder_snapshot(run_dir)
    result = train([*overrides, "head.out_dim=128", "train.batch_size=4", "optim.base_lr=0.01",
                    "crops.local_number=3"])
    message = assert_refused(result, "head.out_dim: 64 -> 128", "train.batch_size: 8 -> 4",
                             "optim.base_lr: 0.002 -> 0.01", "crops.local_number: 2 -> 3", "train.allow_changes=true")
    assert "train.max_steps" not in message
    assert folder_snapshot(run_dir) == before
    # Even with permission, shapes stay refused.
    assert_refused(train([*overrides, "head.out_dim=128", "train.allow_changes=true"]), "head.out_dim: 64 -> 128")
    assert folder_snapshot(run_dir) == before


def test_harmless_changes_and_a_longer_run_are_accepted_and_recorded(finished_run):
    overrides, run_dir = finished_run
    result = train([*overrides, "train.max_steps=9", "log.every_steps=1", "data.num_workers=1"])
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "schedules of the new length" in result.stderr
    record = json.loads((run_dir / "config_changes.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 6
    assert record["changes"]["train.max_steps"] == [6, 9] and record["changes"]["data.num_workers"] == [0, 1]
    saved = (run_dir / "config.yaml").read_text()
    assert "max_steps: 9" in saved
    # A shorter run than the step reached is refused; a shorter one ahead of it needs permission.
    assert_refused(train([*overrides, "train.max_steps=5"]), "already at step 9")


def test_allowed_schedule_change_is_recorded_and_not_kept_as_permission(finished_run):
    overrides, run_dir = finished_run
    result = train([*overrides, "train.max_steps=8", "optim.base_lr=0.001", "train.allow_changes=true"])
    assert result.returncode == 0, result.stderr
    record = json.loads((run_dir / "config_changes.jsonl").read_text().splitlines()[-1])
    assert record["changes"]["optim.base_lr"] == [0.002, 0.001]
    saved = (run_dir / "config.yaml").read_text()
    assert "base_lr: 0.001" in saved and "allow_changes: false" in saved


def test_resume_false_on_a_folder_with_checkpoints_needs_overwrite(finished_run):
    overrides, run_dir = finished_run
    before = folder_snapshot(run_dir)
    assert_refused(train([*overrides, "train.resume=false"]), "already holds 2 checkpoint(s)",
                   "train.overwrite=true")
    assert folder_snapshot(run_dir) == before
    result = train([*overrides, "train.resume=false", "train.overwrite=true", "train.max_steps=3"])
    assert result.returncode == 0, result.stderr
    assert "resumed from" not in result.stderr
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["checkpoint_00000003.pt"]


@pytest.mark.parametrize("damage", ["zeros", "future-version"])
def test_no_readable_checkpoint_is_refused_and_the_files_are_kept(finished_run, damage):
    overrides, run_dir = finished_run
    for path in ckpt.list_checkpoints(run_dir):
        if damage == "zeros":
            path.write_bytes(bytes(path.stat().st_size))
        else:
            state = torch.load(path, weights_only=True)
            torch.save({**state, "version": ckpt.VERSION + 1}, path)
    before = folder_snapshot(run_dir)
    assert_refused(train(overrides), "none is readable", "They are kept", "train.resume_from")
    assert folder_snapshot(run_dir) == before


def test_resume_from_a_chosen_checkpoint_sets_newer_ones_aside(tmp_path):
    overrides = tiny_overrides(tmp_path, "run", "train.max_steps=9")
    run_training(overrides)  # checkpoints 3, 6, 9
    reference = final_weights(tmp_path / "run")
    result = run_training([*overrides, "train.resume_from=3"])
    assert "at step 3" in result.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "superseded").iterdir()) == [
        "checkpoint_00000006.pt", "checkpoint_00000009.pt"]
    assert_bitwise_equal(final_weights(tmp_path / "run"), reference)
    assert "resume_from: ''" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_refused_resume_from_moves_no_checkpoint(tmp_path):
    overrides = tiny_overrides(tmp_path, "run", "train.max_steps=9")
    run_training(overrides)
    before = folder_snapshot(tmp_path / "run")
    assert_refused(train([*overrides, "train.resume_from=3", "head.out_dim=32"]), "head.out_dim: 64 -> 32")
    assert folder_snapshot(tmp_path / "run") == before and not (tmp_path / "run" / "superseded").exists()


def test_failed_starts_leave_no_run_folder(tmp_path):
    for extra in (["data.dataset=imagefolder", f"data.root={tmp_path / 'missing'}"], ["model.arch=vit_nope"],
                  ["train.batch_size=64"]):
        result = train(tiny_overrides(tmp_path, "never", *extra))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "never").exists(), extra


def test_a_data_set_that_changed_size_is_reported_on_resume(tmp_path):
    images = tmp_path / "images" / "only_class"
    images.mkdir(parents=True)
    for index in range(12):
        Image.new("RGB", (32, 32), (20 * index, 90, 200 - 10 * index)).save(images / f"{index:02d}.png")
    overrides = tiny_overrides(tmp_path, "run", "data.dataset=imagefolder", f"data.root={tmp_path / 'images'}",
                               "train.batch_size=4", "train.max_steps=3")
    run_training(overrides)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(images / "new.png")
    result = run_training([*overrides, "train.max_steps=4"])
    assert "the data set now has 13 images; checkpoint checkpoint_00000003.pt was written with 12" in result.stderr


# ---- divergence --------------------------------------------------------------------------------------------


def test_a_blow_up_names_a_usable_checkpoint_and_keeps_it(tmp_path, monkeypatch):
    """Weights grow x1000 per step from step 4 (checkpoint 6 holds 1e9), the loss turns NaN at step 8: the
    advice must name checkpoint 3, which pruning (keep=1) must have kept, and following it must work."""
    # No memory probe: its two forward calls would count towards the patched forward's step count.
    overrides = tiny_overrides(tmp_path, "boom", "train.max_steps=12", "checkpoint.keep=1", "train.memory_check=false")
    original_forward, original_after_step = DINO.forward, DINO.after_step
    calls = {"forward": 0, "after": 0}

    def exploding_after_step(self, schedule):
        original_after_step(self, schedule)
        calls["after"] += 1
        if calls["after"] >= 4:  # the teacher's final norm: the loss stays finite (its head L2-normalises)
            with torch.no_grad():
                self.teacher.backbone.norm.weight.mul_(1000.0)

    def nan_forward(self, batch, schedule):
        loss, outputs = original_forward(self, batch, schedule)
        calls["forward"] += 1
        return (loss * float("nan") if calls["forward"] >= 8 else loss), outputs

    monkeypatch.setattr(DINO, "after_step", exploding_after_step)
    monkeypatch.setattr(DINO, "forward", nan_forward)
    with pytest.raises(NonFiniteLossError) as error:
        run(load_config(None, overrides))
    assert "newest usable checkpoint is" in str(error.value) and "checkpoint_00000003.pt" in str(error.value)
    assert "train.resume_from=" in str(error.value) and "train.allow_changes=true" in str(error.value)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "boom")]
    assert names == ["checkpoint_00000003.pt", "checkpoint_00000006.pt"]
    assert not ckpt.load_checkpoint(tmp_path / "boom" / "checkpoint_00000006.pt")["health"]["usable"]

    monkeypatch.setattr(DINO, "after_step", original_after_step)
    monkeypatch.setattr(DINO, "forward", original_forward)
    with pytest.raises(RunFolderError, match="blowing up.*checkpoint_00000003.pt"):
        run(load_config(None, overrides))  # the plain resume would diverge again: refused, with the way out
    result = run(load_config(None, [*overrides, f"train.resume_from={tmp_path / 'boom' / 'checkpoint_00000003.pt'}",
                                    "optim.base_lr=0.001", "train.allow_changes=true"]))
    assert result["status"] == "finished" and result["step"] == 12
