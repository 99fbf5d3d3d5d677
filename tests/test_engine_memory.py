"""The memory check: a run too large for the machine is refused before it trains, with the settings that fit;
a run that fits starts; the probe changes nothing about training; loader workers follow the machine's cores.

The machine's limit is real: the runs that must not fit are started inside a memory cgroup with a 1.5 GiB
limit (the way a container or a SLURM job with --mem limits a run), created by the test as root.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from ssd.engine import machine
from tests.tiny import (
    REPO,
    assert_bitwise_equal,
    final_weights,
    run_training,
    subprocess_env,
    tiny_overrides,
    train_command,
)

LIMIT_BYTES = 1536 * 2**20
# 1,437 digits, a 65,536-prototype head and 8 local crops: at batch 512 the head's logits alone are
# 512 x 10 crops x 65,536 x 4 bytes = 1.3 GB per copy, several copies are kept for backward.
LARGE = ["data.holdout_fraction=0.2", "head.out_dim=65536", "head.hidden_dim=512", "head.bottleneck_dim=128",
         "crops.local_number=8", "train.max_steps=1"]


def _memory_cgroup_root() -> Path | None:
    """This process's cgroup-v1 memory folder when the test may create a child in it (root), else None."""
    try:
        line = next(line for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if "memory" in line.split(":")[1].split(","))
    except (OSError, StopIteration):
        return None
    folder = Path("/sys/fs/cgroup/memory" + line.split(":", 2)[2])
    return folder if folder.is_dir() and os.access(folder, os.W_OK) else None


@pytest.fixture
def limited_cgroup():
    root = _memory_cgroup_root()
    if root is None:
        pytest.skip("needs a writable cgroup-v1 memory hierarchy (run as root) to limit a run's memory")
    folder = root / f"ssd-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    (folder / "memory.limit_in_bytes").write_text(str(LIMIT_BYTES))
    yield folder
    folder.rmdir()


def _train_in(cgroup: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    command = " ".join(f"'{part}'" for part in train_command(overrides))
    return subprocess.run(["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec {command}"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_a_run_that_cannot_fit_is_refused_before_training_with_settings_that_fit(tmp_path, limited_cgroup):
    result = _train_in(limited_cgroup, tiny_overrides(tmp_path, "large", *LARGE, "train.batch_size=512"))
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "does not fit" in message and "GiB available" in message, message
    assert "train.grad_accum_steps=" in message and "train.memory_check=false" in message, message
    assert not (tmp_path / "large").exists()  # a refused start leaves no run folder
    assert "step 1/1" not in result.stderr

    # The advice works: the suggested accumulation fits in the same cgroup and trains.
    accum = message.split("train.grad_accum_steps=")[1].split()[0]
    result = _train_in(limited_cgroup, tiny_overrides(tmp_path, "advised", *LARGE, "train.batch_size=512",
                                                      f"train.grad_accum_steps={accum}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory estimate:" in result.stderr and "finished at step 1" in result.stderr


def test_memory_check_false_starts_anyway(tmp_path, limited_cgroup):
    """The user can overrule the estimate; the kernel then decides (here: the run fits at batch 8)."""
    result = _train_in(limited_cgroup, tiny_overrides(tmp_path, "small", "train.max_steps=1",
                                                      "train.memory_check=false"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory estimate:" not in result.stderr


def test_the_probe_changes_nothing_about_training(tmp_path):
    """BatchNorm statistics, RNG and gradients are restored: with and without the check, the same weights."""
    extra = ["head.use_bn=true", "train.epochs=2"]
    run_training(tiny_overrides(tmp_path, "checked", *extra))
    run_training(tiny_overrides(tmp_path, "unchecked", *extra, "train.memory_check=false"))
    assert_bitwise_equal(final_weights(tmp_path / "checked"), final_weights(tmp_path / "unchecked"))


def test_auto_workers_follow_the_cores_given_to_the_process(tmp_path):
    """data.num_workers=-1 keeps one core for the training loop: 2 cores -> 1 worker, 1 core -> none."""
    cores = machine.cpu_cores()
    assert machine.auto_num_workers(1) == min(max(cores - 1, 0), machine.AUTO_WORKERS_CAP)
    assert machine.auto_num_workers(cores) == 0
    command = ["taskset", "-c", "0", *train_command(tiny_overrides(tmp_path, "one-core", "train.max_steps=1",
                                                                    "data.num_workers=-1"))]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.num_workers=-1: 0 loader worker(s) per process (1 CPU core(s)" in result.stderr


def test_sharded_runs_count_a_share_of_the_gradients_and_optimizer_state():
    """train.parallel=fsdp over N processes: each keeps 1/N of the gradients and of AdamW's moments, so the
    estimate drops by (1 - 1/N) of a gradient copy and of two moment copies."""
    import torch

    from ssd.config import load_config
    from ssd.engine import memory
    from ssd.methods import build_method
    from tests.tiny import TINY_OVERRIDES

    method = build_method(load_config("dino_digits_demo", TINY_OVERRIDES))
    collate = method.make_collate(0)

    def make_batch(size: int) -> dict:
        generator = torch.Generator().manual_seed(size)
        return collate([{"crops": [torch.randn(3, s, s, generator=generator) for s in (32, 32, 16, 16)],
                         "label": 0, "index": i, "epoch": 0} for i in range(size)])

    estimates = [memory.measure(method, make_batch, 8, torch.device("cpu"), None, {"teacher_temp": 0.04}, 0, 1,
                                shards) for shards in (1, 2, 4)]
    trainable = sum(p.numel() * 4 for p in method.parameters() if p.requires_grad)
    for shards, estimate in zip((2, 4), estimates[1:]):
        saved = (1 - 1 / shards) * 3 * trainable  # one gradient copy and two AdamW moments
        assert estimates[0].fixed - estimate.fixed == pytest.approx(saved, rel=1e-6)
    assert estimates[0].per_image == estimates[2].per_image  # activations are not sharded


def test_a_probe_out_of_device_memory_is_a_clear_refusal_or_skipped_when_sharded(tmp_path, monkeypatch, caplog):
    """On a GPU the probe step raises torch.OutOfMemoryError rather than growing into the OOM killer. Without
    sharding that means 2 images do not fit: a refusal naming the error and the ways out. Under FSDP the probe's
    unsharded copy may not fit where the sharded run does: the check is skipped with a warning. (The error is
    raised by hand here: this machine has no GPU.)"""
    import torch

    from ssd.config import ConfigError, load_config
    from ssd.data import build_dataset
    from ssd.engine import memory
    from ssd.engine.distributed import DistInfo
    from ssd.engine.trainer import Trainer
    from ssd.methods import build_method
    from ssd.train import build_transform

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines of advice")

    monkeypatch.setattr(memory, "_step_bytes", out_of_memory)
    cfg = load_config(None, tiny_overrides(tmp_path, "probe"))
    dataset = build_dataset(cfg.data, cfg.data.split)
    with pytest.raises(ConfigError, match=r"probe step of 2 images ran out of device memory \(CUDA out of memory\. "
                                          r"Tried to allocate 2\.00 GiB\)\..*train\.parallel=fsdp.*memory_check=false"):
        Trainer(cfg, build_method(cfg), dataset, build_transform(cfg), DistInfo(), tmp_path / "probe")

    cfg.train.memory_check = False
    trainer = Trainer(cfg, build_method(cfg), dataset, build_transform(cfg), DistInfo(), tmp_path / "probe")
    with caplog.at_level("WARNING", logger="ssd"):
        assert trainer._probe_out_of_memory("CUDA out of memory", shards=2) is None
    assert "memory check skipped" in caplog.text and "sharded over 2 processes" in caplog.text
