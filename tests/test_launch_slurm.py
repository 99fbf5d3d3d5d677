"""The SLURM launcher without a cluster: environment translation, shared-fs check, --dry-run, clear errors.

The same launcher runs real jobs in tests/test_slurm.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launchers import slurm
from launchers.filesystems import mount_of, shared_fs_warning
from launchers.slurm_env import (
    expand_nodelist,
    expand_tasks_per_node,
    export_distributed_env,
    master_port,
    slurm_distributed_env,
)

TORCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

# Task 5 of a 2-node x 4-task step, as srun sets it.
SRUN_STEP = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
}


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("localhost", ["localhost"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[8-10],login1", ["a8", "a9", "a10", "login1"]),
        ("node[098-100]-ib,x", ["node098-ib", "node099-ib", "node100-ib", "x"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("4(x2),2") == [4, 4, 2]
    assert expand_tasks_per_node("8") == [8]


def test_master_port_is_fixed_per_job_and_differs_between_jobs():
    assert master_port("1234") == master_port("1234")
    assert master_port("1234") != master_port("1235")
    assert all(20000 <= master_port(str(job)) < 30000 for job in (0, 1, 9999, 123456789))
    assert master_port("77_3") != master_port("77_4")  # array tasks


def test_slurm_step_becomes_torch_distributed_variables():
    assert slurm_distributed_env(SRUN_STEP) == {
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port("123456")), "RANK": "5", "WORLD_SIZE": "8",
        "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
    }  # fmt: skip


def test_batch_script_is_not_a_distributed_step():
    # The batch script has SLURM_PROCID=0 and SLURM_NTASKS=8 too, but it is one process: no peers will come.
    batch = {k: v for k, v in SRUN_STEP.items() if not k.startswith("SLURM_STEP")}
    assert slurm_distributed_env(batch) == {}


@pytest.fixture
def clean_env(monkeypatch):
    # setenv first so monkeypatch records every name, also absent ones: export_distributed_env() writes
    # os.environ directly, and those writes must be undone after the test, or later tests (and the training
    # processes they start) would wait for peers of a fake 8-rank job.
    for name in (*TORCH_VARIABLES, *SRUN_STEP):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_export_sets_variables_from_slurm(clean_env):
    for name, value in SRUN_STEP.items():
        clean_env.setenv(name, value)
    exported = export_distributed_env()
    assert exported["RANK"] == os.environ["RANK"] == "5"
    assert os.environ["WORLD_SIZE"] == "8" and os.environ["MASTER_ADDR"] == "gpu07"


def test_torchrun_variables_win(clean_env):
    for name, value in SRUN_STEP.items():
        clean_env.setenv(name, value)
    torchrun = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}
    for name, value in torchrun.items():
        clean_env.setenv(name, value)
    export_distributed_env()
    assert {name: os.environ[name] for name in torchrun} == torchrun


def test_export_outside_slurm_does_nothing(clean_env):
    assert export_distributed_env() == {}
    assert not any(name in os.environ for name in TORCH_VARIABLES)


@pytest.fixture
def mounts_file(tmp_path) -> Path:
    path = tmp_path / "mounts"
    path.write_text(
        "/dev/vda / ext4 rw,relatime 0 0\n"
        "tmpfs /tmp tmpfs rw 0 0\n"
        "fileserver:/export/home /shared nfs4 rw 0 0\n"
        "lustre@o2ib:/scratch /shared/scratch lustre rw 0 0\n"
        "/dev/sdb1 /mnt/with\\040space xfs rw 0 0\n"
        "gcsfuse /buckets fuse.gcsfuse rw 0 0\n"
    )
    return path


@pytest.mark.parametrize(
    "path, mount",
    [
        ("/tmp/run", ("/tmp", "tmpfs")),
        ("/shared/user/run", ("/shared", "nfs4")),
        ("/shared/scratch/run/not/created/yet", ("/shared/scratch", "lustre")),
        ("/sharedother/run", ("/", "ext4")),  # a prefix of the name is not a parent folder
        ("/mnt/with space/run", ("/mnt/with space", "xfs")),
    ],
)
def test_mount_of(mounts_file, path, mount):
    assert mount_of(path, mounts_file) == mount


def test_shared_fs_warning(mounts_file):
    assert shared_fs_warning("/tmp/run", nodes=1, mounts_file=mounts_file) is None  # one node: any folder works
    warning = shared_fs_warning("/tmp/run", nodes=2, mounts_file=mounts_file)
    assert "/tmp/run" in warning and "tmpfs" in warning and "2 nodes" in warning and "output.root" in warning
    assert "ext4" in shared_fs_warning("/home/me/run", nodes=4, mounts_file=mounts_file)
    for shared in ("/shared/run", "/shared/scratch/run", "/buckets/run"):
        assert shared_fs_warning(shared, nodes=4, mounts_file=mounts_file) is None
    assert shared_fs_warning("/x", nodes=4, mounts_file=mounts_file.parent / "missing") is None  # not Linux


TINY_RUN = ["--gpus-per-node", "0", "--tasks-per-node", "2", "train.batch_size=32", "data.num_workers=0"]


def test_dry_run_prints_script_and_config_and_submits_nothing(tmp_path, capsys):
    root = tmp_path / "runs"
    code = slurm.main([
        "--dry-run", "--nodes", "2", "--partition", "debug", "--account", "lab", "--qos", "high",
        "--constraint", "h100", "--exclude", "node[01-02]", "--time", "90", "--mem-gb", "64",
        "--requeue-signal", "USR2", "--signal-delay", "60", "--setup", "module load cuda", *TINY_RUN,
        f"output.root={root}", "output.run_name=demo", "optim.base_lr=0.001",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for line in (
        "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1", "#SBATCH --partition=debug",
        "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --exclude='node[01-02]'",
        "#SBATCH --time=90", "#SBATCH --mem=64GB", "#SBATCH --signal=USR2@60", "#SBATCH --job-name=demo",
        f"#SBATCH --output={root}/demo/slurm/%j_0_log.out", "module load cuda", "export SUBMITIT_PREEMPT_SIGNAL=USR2",
    ):  # fmt: skip
        assert line in out.splitlines(), line
    assert "--gpus-per-node" not in out  # a CPU job asks for no GPUs
    assert "base_lr: 0.001" in out and "run_name: demo" in out and f"root: {root}" in out
    assert not root.exists()


def test_dry_run_of_an_evaluation(tmp_path, capsys):
    code = slurm.main(["--dry-run", "--eval", "knn", "--job-dir", str(tmp_path / "knn"), "--gpus-per-node", "1",
                       "--", "checkpoints/run", "--output", "knn.json", "--ks", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --gpus-per-node=1" in out and f"--output={tmp_path}/knn/slurm/%j_0_log.out" in out
    assert "python -m eval_protocols.knn checkpoints/run --output knn.json --ks 10" in out


def test_without_slurm_the_error_says_so_and_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    code = slurm.main([*TINY_RUN, f"output.root={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "SLURM was not found" in err and "torchrun" in err and "--dry-run" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks-per-node", "3", "--gpus-per-node", "0", "train.batch_size=32"], "not divisible by 3 process(es)"),
        (["optim.bse_lr=1"], "did you mean 'optim.base_lr'"),
        (["--eval", "no_such_protocol"], "no evaluation protocol eval_protocols.no_such_protocol"),
    ],
)
def test_user_errors_are_explained(argv, message, capsys):
    assert slurm.main(["--dry-run", *argv]) == 2
    assert message in capsys.readouterr().err
