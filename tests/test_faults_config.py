"""Config values that make no sense are refused before anything runs or is written: one line naming the key and
the fix, exit status 2, no traceback. Same for missing or malformed YAML, missing data roots, and the SLURM
launcher's own options (also under --dry-run)."""

from __future__ import annotations

import subprocess

import pytest

from launchers import slurm
from ssd.config import ConfigError, check_world_size, load_config
from tests.tiny import REPO, subprocess_env, tiny_overrides, train_command


@pytest.mark.parametrize("override, message", [
    ("optim.base_lr=-0.001", "'optim.base_lr' is -0.001; it must be positive (> 0)"),
    ("method.momentum_teacher=1.5", "'method.momentum_teacher' is 1.5; it must be >= 0 and <= 1"),
    ("method.momentum_teacher_end=-0.1", "'method.momentum_teacher_end'"),
    ("method.teacher_temp=0", "'method.teacher_temp' is 0.0; it must be positive (> 0) (a softmax temperature"),
    ("method.student_temp=-0.1", "'method.student_temp'"),
    ("crops.global_scale=[1.0,0.4]", "'crops.global_scale' is [1.0, 0.4]; it needs 0 < min <= max <= 1"),
    ("crops.local_scale=[0.05,1.4]", "'crops.local_scale' is [0.05, 1.4]"),
    ("crops.global_size=30", "'crops.global_size' is 30, not a multiple of the patch size 8 of vit_tiny_patch16_224: "
                             "use 24 or 32"),
    ("crops.local_size=12", "'crops.local_size' is 12, not a multiple of the patch size 8"),
    ("data.num_workers=-2", "'data.num_workers' is -2"),  # -1 means: as many as the cores allow
    ("checkpoint.max_abs_weight=0", "'checkpoint.max_abs_weight'"),
    ("train.overwrite=true", "train.overwrite=true deletes the run folder's checkpoints: it needs train.resume=false"),
    ("crops.gram_teacher_size=64", "crops.gram_teacher_size is for DINOv3's Gram teacher; method.name=dino"),
    ("method.mask_ratio=[0.5,0.2]", "'method.mask_ratio' is [0.5, 0.2]; it needs 0 <= min <= max < 1"),
    # Settings another method reads used to be accepted and ignored (the CIFAR-10 CPU recipe set KoLeo and
    # Sinkhorn-Knopp for DINO, whose loss has neither).
    ("method.koleo_weight=0.1", "method.name=dino does not read method.koleo_weight=0.1 (read by ibot, dinov2, "
                                "dinov3, multi_distill): the setting would change nothing"),
    ("method.centering=sinkhorn", "method.name=dino does not read method.centering=sinkhorn"),
    ("method.mask_ratio=[0.2,0.4]", "does not read method.mask_ratio=[0.2, 0.4] (read by ibot"),
    ("method.gram_weight=1.0", "does not read method.gram_weight=1.0 (read by dinov3)"),
    ("distill.tta_views=4", "does not read distill.tta_views=4 (read by posthoc_registers)"),
    ("elastic.weight=0.5", "does not read elastic.weight=0.5 (read by poa)"),
    ("method.koleo_group_size=4", "does not read method.koleo_group_size=4 (read by ibot"),
])
def test_nonsense_values_are_refused_naming_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, tiny_overrides(tmp_path, "x", override))
    assert message in str(error.value)


def test_koleo_groups_must_divide_a_forward_batch(tmp_path):
    dinov2 = ("method.name=dinov2", "method.koleo_weight=0.1", "train.batch_size=8")
    with pytest.raises(ConfigError, match="method.koleo_group_size=3 does not divide the 8 images of a step's "
                                          "forward .* use a divisor of 8, or 0 for the whole batch"):
        load_config(None, tiny_overrides(tmp_path, "x", *dinov2, "method.koleo_group_size=3"))
    with pytest.raises(ConfigError, match="does not divide the 4 images"):
        load_config(None, tiny_overrides(tmp_path, "x", *dinov2, "method.koleo_group_size=8",
                                         "train.grad_accum_steps=2"))
    assert load_config(None, tiny_overrides(tmp_path, "x", *dinov2, "method.koleo_group_size=4")).method.koleo_group_size == 4


def test_patch_size_comes_from_the_architecture_name_when_not_set(tmp_path):
    with pytest.raises(ConfigError, match="local_size. is 24, not a multiple of the patch size 16 of vit_small"):
        load_config(None, [*tiny_overrides(tmp_path, "x"), "model.arch=vit_small_patch16_224", "model.patch_size=0",
                                                   "crops.local_size=24"])
    load_config(None, [*tiny_overrides(tmp_path, "x"), "model.arch=resnet18", "model.timm_kwargs={}"])  # no patches


def test_batch_must_split_over_processes_and_accumulation(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "x", "train.batch_size=10", "train.grad_accum_steps=2"))
    check_world_size(cfg, 1)
    with pytest.raises(ConfigError, match="not divisible by 2 process.*grad_accum_steps=2: use train.batch_size=8 or 12"):
        check_world_size(cfg, 2)


def cli(*arguments: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(list(arguments)), cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("case", ["negative-lr", "missing-yaml", "malformed-yaml", "not-a-mapping", "missing-root",
                                  "batch-larger-than-data", "unknown-arch"])
def test_command_line_mistakes_exit_2_with_one_line(tmp_path, case):
    arguments = {
        "negative-lr": tiny_overrides(tmp_path, "run", "optim.base_lr=-1"),
        "missing-yaml": ["--config", str(tmp_path / "nope.yaml")],
        "malformed-yaml": ["--config", str(tmp_path / "bad.yaml")],
        "not-a-mapping": ["--config", str(tmp_path / "list.yaml")],
        "missing-root": tiny_overrides(tmp_path, "run", "data.dataset=folder", f"data.root={tmp_path / 'no_data'}"),
        "batch-larger-than-data": tiny_overrides(tmp_path, "run", "train.batch_size=40"),
        "unknown-arch": tiny_overrides(tmp_path, "run", "model.arch=vit_tinyy_patch16_224"),
    }[case]
    expected = {
        "negative-lr": "optim.base_lr", "missing-yaml": f"config file {tmp_path / 'nope.yaml'} does not exist",
        "malformed-yaml": f"config file {tmp_path / 'bad.yaml'} is not valid YAML",
        "not-a-mapping": "must hold a mapping of keys", "missing-root": str(tmp_path / "no_data"),
        "batch-larger-than-data": "fewer than one global batch of train.batch_size=40",
        "unknown-arch": "unknown timm architecture 'vit_tinyy_patch16_224'",
    }[case]
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    result = cli(*arguments)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
    assert not (tmp_path / "run").exists()


TINY_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "2", "train.batch_size=32"]


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "--nodes is 0; it must be at least 1"),
    (["--cpus-per-task", "0"], "--cpus-per-task is 0"),
    (["--time", "1", "--signal-delay", "120"], "is not shorter than --time"),
    (["data.dataset=imagefolder", "data.root=/no/such/data"], "data.root=/no/such/data is not a folder"),
])
def test_launcher_refuses_before_submitting_also_in_dry_run(argv, message, capsys):
    for dry in (["--dry-run"], []):
        assert slurm.main([*dry, *TINY_JOB, *argv]) == 2
        assert message in capsys.readouterr().err


def test_launcher_checks_a_resumed_run_folder_like_the_run_does(tmp_path, capsys):
    from tests.tiny import run_training

    overrides = tiny_overrides(tmp_path, "run", "train.max_steps=3")
    run_training(overrides)
    config_before = (tmp_path / "run" / "config.yaml").read_bytes()
    argv = ["--dry-run", "--gpus-per-node", "0", "--config", str(tmp_path / "run" / "config.yaml"), "head.out_dim=32"]
    assert slurm.main(argv) == 2
    assert "head.out_dim: 64 -> 32" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config_before


def test_launcher_warns_in_dry_run_about_a_node_local_run_folder(tmp_path, capsys):
    assert slurm.main(["--dry-run", "--nodes", "2", *TINY_JOB, f"output.root={tmp_path}"]) == 0
    assert "the other nodes will not see its checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("module, arguments", [
    ("eval_protocols.knn", ["README.md", "--dataset", "digits"]),
    ("eval_protocols.linear", ["/no/such/run", "--dataset", "digits"]),
    ("ssd.export", ["README.md", "--out", "unused"]),
    ("ssd.visualize", ["/no/such/run", "README.md"]),
])
def test_eval_and_export_commands_name_wrong_weights_without_a_traceback(module, arguments):
    import sys

    result = subprocess.run([sys.executable, "-m", module, *arguments], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: "), result.stderr
    assert "README.md is a text file, not weights" in result.stderr or "/no/such/run" in result.stderr
