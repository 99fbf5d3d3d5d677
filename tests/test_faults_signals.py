"""Signals as clusters and shells send them: to the whole process group (DataLoader workers included), to
torchrun, at random moments. Each stopped run must save at a step boundary, exit with EXIT_PREEMPTED (75), leave
no process behind, and resume to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ssd.engine import checkpoint as ckpt
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

pytestmark = pytest.mark.slow
# 36 digits / batch 8 = 4 steps per epoch, 40 steps; two workers, as every shipped recipe uses workers.
WITH_WORKERS = ("train.epochs=10", "data.num_workers=2", "checkpoint.every_steps=1000")
TOTAL_STEPS = 40


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    run_training(tiny_overrides(root, "one", *WITH_WORKERS))
    return final_weights(root / "one")


@pytest.fixture(scope="module")
def reference_two_processes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference2")
    run_training(tiny_overrides(root, "two", *WITH_WORKERS), nproc=2)
    return final_weights(root / "two")


def start(overrides: list[str], nproc: int = 1, extra_env: dict | None = None) -> subprocess.Popen:
    """The training command in a session of its own, so that killpg reaches it and its workers only."""
    return subprocess.Popen(train_command(overrides, nproc), cwd=REPO, env={**subprocess_env(), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_steps(run_dir: Path, process: subprocess.Popen, lines: int = 1, timeout: float = 240) -> None:
    """Until metrics.jsonl has `lines` entries (training runs, workers are up)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
        assert process.poll() is None, f"training ended early:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "training did not log in time"
        time.sleep(0.02)


def processes_running(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (the run folder): what would be left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def assert_stopped_with_checkpoint(run_dir: Path, output: str, launcher_traceback: bool = False) -> int:
    """One checkpoint, at a step before the end, nothing half-written, the lock released. torchrun prints a
    traceback of its own SignalException (`launcher_traceback`); the training processes never do."""
    from ssd.engine.checkpoint import list_checkpoints, step_of

    saved = list_checkpoints(run_dir)  # files, or the folders of a sharded run
    assert len(saved) == 1, output
    step = step_of(saved[0])
    assert 0 < step < TOTAL_STEPS, output
    assert "stop requested: saved checkpoint" in output, output
    assert output.count("Traceback") == (1 if launcher_traceback else 0), output
    assert not list(run_dir.glob(".checkpoint_*")) and not (run_dir / "run.lock").exists(), output
    return step


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_process_group_signal_with_workers_saves_and_resumes_bitwise(tmp_path, reference, signum):
    overrides = tiny_overrides(tmp_path, "run", *WITH_WORKERS)
    process = start(overrides)
    wait_for_steps(tmp_path / "run", process)
    os.killpg(process.pid, signum)  # scancel / systemd / Ctrl-C: the workers get it too
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, output
    assert_stopped_with_checkpoint(tmp_path / "run", output)
    assert not processes_running(str(tmp_path / "run")), "a worker outlived its run"

    result = run_training(overrides)
    assert "resumed from" in result.stderr
    assert_bitwise_equal(final_weights(tmp_path / "run"), reference)


def test_sigterm_to_torchrun_with_workers_saves_and_resumes_bitwise(tmp_path, reference_two_processes):
    overrides = tiny_overrides(tmp_path, "run", *WITH_WORKERS)
    process = start(overrides, nproc=2)
    wait_for_steps(tmp_path / "run", process)
    os.killpg(process.pid, signal.SIGTERM)  # torchrun forwards it to each rank's process group (workers too)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output  # torchrun reports the stop as a failure of its own
    assert_stopped_with_checkpoint(tmp_path / "run", output, launcher_traceback=True)
    assert not processes_running(str(tmp_path / "run")), output

    run_training(overrides, nproc=2)
    assert_bitwise_equal(final_weights(tmp_path / "run"), reference_two_processes)


@pytest.mark.parametrize("forwarded", [False, True], ids=["plain-torchrun", "signals-to-handle"])
def test_sigusr2_to_torchrun_leaves_no_unsupervised_process(tmp_path, forwarded):
    """torchrun does not handle SIGUSR2 and dies of it; its training processes must then save and exit instead
    of running on unsupervised. With the documented TORCHELASTIC_SIGNALS_TO_HANDLE torchrun forwards it."""
    overrides = tiny_overrides(tmp_path, "run", *WITH_WORKERS)
    env = {"TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"} if forwarded else {}
    process = start(overrides, nproc=2, extra_env=env)
    wait_for_steps(tmp_path / "run", process)
    process.send_signal(signal.SIGUSR2)  # to torchrun alone
    output, _ = process.communicate(timeout=120)
    deadline = time.monotonic() + 60
    while processes_running(str(tmp_path / "run")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_running(str(tmp_path / "run")), "training processes outlived torchrun"
    if not forwarded:
        assert process.returncode == -signal.SIGUSR2
    saved = sorted((tmp_path / "run").glob("checkpoint_*.pt"))
    assert len(saved) == 1 and int(saved[0].stem.split("_")[1]) < TOTAL_STEPS, output
    assert not (tmp_path / "run" / "run.lock").exists()


SOAK = ("train.epochs=25", "data.num_workers=2", "checkpoint.every_steps=2", "checkpoint.keep=2")  # 100 steps


def logged_lines(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_soak_random_sigkill_and_sigterm_then_resume_is_bitwise_equal(tmp_path):
    """SIGKILLs and SIGTERMs to the process group at random moments: a quarter during start-up, the rest after a
    random amount of training plus a random delay (mid-step, mid-write: checkpoints come every 2 steps), each
    followed by a restart of the same command. The first round is a SIGTERM during training, so the
    save-and-exit path is always among them."""
    run_training(tiny_overrides(tmp_path, "reference", *SOAK))
    reference = final_weights(tmp_path / "reference")
    seed = int(os.environ.get("SSD_SOAK_SEED", "1234"))
    rounds = int(os.environ.get("SSD_SOAK_ROUNDS", "10"))
    rng = random.Random(seed)
    overrides = tiny_overrides(tmp_path, "soak", *SOAK)
    run_dir, history = tmp_path / "soak", []
    for round_number in range(rounds):
        signum = signal.SIGTERM if round_number == 0 else rng.choice([signal.SIGKILL, signal.SIGTERM])
        during_startup = round_number > 0 and rng.random() < 0.25
        process = start(overrides)
        if during_startup:
            time.sleep(rng.uniform(0.0, 2.5))
        else:
            target = logged_lines(run_dir) + rng.randint(1, 6)  # the run logs every 2 steps
            while logged_lines(run_dir) < target and process.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is None:
            os.killpg(process.pid, signum)
        output, _ = process.communicate(timeout=120)
        newest = ckpt.list_checkpoints(run_dir)[-1:]
        history.append((signum.name, "start-up" if during_startup else "training", process.returncode,
                        ckpt.step_of(newest[0]) if newest else 0))
        assert process.returncode in (0, EXIT_PREEMPTED, -signal.SIGKILL, -signal.SIGTERM), (history, output)
        assert "Traceback" not in output, (history, output)
        deadline = time.monotonic() + 30
        while processes_running(str(run_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)  # SIGKILLed workers notice their parent is gone within a few seconds
        assert not processes_running(str(run_dir)), history
    assert history[0][2] == EXIT_PREEMPTED, history
    assert any(code == -signal.SIGKILL and phase == "training" for _, phase, code, _ in history), (seed, history)
    assert history[-1][3] < 100, ("the run finished before the last kill: make it longer", history)
    result = run_training(overrides)
    assert "finished at step 100" in result.stderr, (seed, history)
    assert_bitwise_equal(final_weights(run_dir), reference)
