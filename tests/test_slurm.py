"""Real SLURM jobs, submitted through the real launcher to the one-node test cluster of tests/slurm_cluster.py.

Two CPU tasks train DDP over gloo on scikit-learn's digits with a 2-block ViT, so a job takes well under a
minute. The interrupted job is stopped twice - by the signal SLURM sends before a time limit (USR2, handled by
submitit and the engine) and by ``scontrol requeue`` (SIGTERM, as in a preemption) - and must end with exactly
the weights of the uninterrupted job.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launchers import slurm

STEPS = 40
TINY_JOB = [
    "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10",
    # Two DataLoader workers per task, as every shipped recipe uses: scancel and preemption signal them too.
    f"train.max_steps={STEPS}", "train.batch_size=32", "data.num_workers=2",
    "model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8", "model.timm_kwargs.depth=2",
    "head.out_dim=256", "head.hidden_dim=128", "head.bottleneck_dim=64", "crops.local_number=2",
    "checkpoint.every_steps=10", "log.every_steps=2", "log.progress_bar=false", "log.tensorboard=false",
    "eval.knn=false",
]  # fmt: skip
JOB_TIMEOUT_S = 240
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def launch(argv: list[str]) -> tuple[str, str]:
    """Run ``python -m launchers.slurm argv`` in this process; return the job id and what it printed."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = slurm.main(argv)
    assert code == 0, stdout.getvalue()
    return re.search(r"submitted job (\d+)", stdout.getvalue()).group(1), stdout.getvalue()


def rank_log(run_dir: Path, job_id: str, rank: int = 0) -> str:
    path = run_dir / "slurm" / f"{job_id}_{rank}_log.out"
    return path.read_text() if path.exists() else f"(no log at {path})"


def logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def wait_for_step(cluster, job_id: str, run_dir: Path, step: int, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(logged >= step for logged in logged_steps(run_dir)):
            return
        state = cluster.job_state(job_id)
        assert state in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"), f"job {state}:\n{rank_log(run_dir, job_id)}"
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not reach step {step}:\n{rank_log(run_dir, job_id)}")


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from ssd.engine.checkpoint import list_checkpoints, load_checkpoint

    newest = list_checkpoints(run_dir)[-1]
    state = load_checkpoint(newest)
    assert state["step"] == STEPS, newest
    return state["method"]


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-runs")
    job_id, printed = launch([*TINY_JOB, f"output.root={root}", "output.run_name=reference"])
    state = slurm_cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    return SimpleNamespace(job_id=job_id, run_dir=root / "reference", state=state, printed=printed, root=root)


def test_two_task_training_job_finishes(reference_run, slurm_cluster):
    run_dir, job_id = reference_run.run_dir, reference_run.job_id
    log = rank_log(run_dir, job_id)
    assert reference_run.state == "COMPLETED", log
    assert slurm_cluster.job_field(job_id, "Restarts") == "0"
    assert "on 2 process(es)" in log and f"finished at step {STEPS}" in log
    assert (run_dir / "slurm" / f"{job_id}_1_log.out").exists()  # every rank logs inside the run folder
    assert (run_dir / "config.yaml").exists()
    assert set(final_weights(run_dir)) >= {"student.backbone.cls_token"}
    # What the launcher told the user.
    assert f"tail -F {run_dir}/slurm/{job_id}_0_log.out" in reference_run.printed


def test_dry_run_shows_the_script_that_was_submitted(reference_run):
    stdout = io.StringIO()
    argv = [*TINY_JOB, f"output.root={reference_run.root}", "output.run_name=reference", "--dry-run"]
    with contextlib.redirect_stdout(stdout):
        assert slurm.main(argv) == 0
    printed_script = stdout.getvalue().split("\n", 1)[1].split("\n# resolved config")[0]
    submitted = (reference_run.run_dir / "slurm" / f"{reference_run.job_id}_submission.sh").read_text()
    assert printed_script.strip() == submitted.strip()


def test_requeued_job_resumes_where_it_stopped_and_matches_the_uninterrupted_one(reference_run, slurm_cluster):
    run_dir = reference_run.root / "interrupted"
    job_id, _ = launch([*TINY_JOB, f"output.root={reference_run.root}", "output.run_name=interrupted"])

    # 1. The time-limit signal (what SLURM sends --signal-delay seconds before the limit).
    wait_for_step(slurm_cluster, job_id, run_dir, 6)
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    # 2. After the requeue, a preemption-style requeue: SLURM sends SIGTERM, then restarts the job itself.
    wait_for_step(slurm_cluster, job_id, run_dir, 20)
    assert slurm_cluster.job_field(job_id, "Restarts") == "1", rank_log(run_dir, job_id)
    slurm_cluster.run("scontrol", "requeue", job_id)

    state = slurm_cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    log = rank_log(run_dir, job_id)
    assert state == "COMPLETED", log
    assert slurm_cluster.job_field(job_id, "Restarts") == "2", log
    stops = [int(step) for step in re.findall(r"stopped at step (\d+) on SIG(?:USR2|TERM)", log)]
    resumes = [int(step) for step in re.findall(r"resumed from \S+checkpoint_\d+\.pt at step (\d+)", log)]
    assert "on SIGUSR2: requeuing" in log and "on SIGTERM" in log, log
    assert len(stops) == 2 and resumes == stops, log  # each restart resumed from the exact step it stopped at
    assert f"finished at step {STEPS}" in log

    expected, actual = final_weights(reference_run.run_dir), final_weights(run_dir)
    assert expected.keys() == actual.keys()
    assert any(key.startswith("teacher.") for key in actual) and any(key.startswith("student.") for key in actual)
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


def test_knn_evaluation_job_writes_its_json(reference_run, slurm_cluster, tmp_path):
    report = tmp_path / "knn.json"
    job_dir = tmp_path / "knn-job"
    job_id, _ = launch([
        "--eval", "knn", "--gpus-per-node", "0", "--time", "10", "--job-dir", str(job_dir), "--",
        str(reference_run.run_dir), "--which", "student", "--dataset", "digits", "--resize", "32", "--crop", "32",
        "--ks", "10", "--num-workers", "0", "--device", "cpu", "--output", str(report),
    ])  # fmt: skip
    state = slurm_cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    assert state == "COMPLETED", rank_log(job_dir, job_id)
    results = json.loads(report.read_text())
    assert results["protocol"] == "knn" and "k=10" in results["results"]["trained student"]


def test_cancelled_job_saves_and_stays_cancelled(reference_run, slurm_cluster):
    run_dir = reference_run.root / "cancelled"
    job_id, _ = launch([*TINY_JOB, f"output.root={reference_run.root}", "output.run_name=cancelled"])
    wait_for_step(slurm_cluster, job_id, run_dir, 4)
    slurm_cluster.run("scancel", job_id)
    deadline = time.monotonic() + 30
    while "stopped at step" not in rank_log(run_dir, job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    log = rank_log(run_dir, job_id)
    stopped_at = int(re.search(r"stopped at step (\d+) on ", log).group(1))
    assert (run_dir / f"checkpoint_{stopped_at:08d}.pt").exists(), log
    # Requeuing it would bring it back to life: it would end COMPLETED instead.
    assert slurm_cluster.wait_for_job(job_id, JOB_TIMEOUT_S) == "CANCELLED", log
    assert slurm_cluster.job_field(job_id, "Restarts") == "0"


def test_a_job_sbatch_refuses_is_explained_and_leaves_no_run_folder(slurm_cluster, tmp_path, capsys):
    code = slurm.main([*TINY_JOB, "--partition", "no_such_partition", f"output.root={tmp_path}", "output.run_name=x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "sbatch refused the job" in err and "invalid partition" in err.lower()
    assert not (tmp_path / "x").exists()


def test_ijepa_job_finishes_on_two_tasks(slurm_cluster, tmp_path):
    """The JEPA family runs through the same launcher: a 2-task I-JEPA job (multi-block masks per rank)."""
    from tests.test_methods_jepa import JEPA

    job_id, _ = launch([*TINY_JOB, *JEPA, "train.max_steps=6", "head.use_bn=false", f"output.root={tmp_path}",
                        "output.run_name=ijepa"])
    state = slurm_cluster.wait_for_job(job_id, JOB_TIMEOUT_S)
    log = rank_log(tmp_path / "ijepa", job_id)
    assert state == "COMPLETED", log
    assert "on 2 process(es)" in log and "finished at step 6" in log
