"""DINOv3 on a tiny RoPE ViT (timm Eva): Gram anchoring with its snapshot teacher, constant schedules, exact
resume across a snapshot refresh, and starting a run from another run's weights (high-resolution adaptation)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from ssd.config import load_config
from ssd.engine.schedules import TrainingSchedule
from ssd.methods import build_method
from tests.tiny import (
    REPO,
    assert_bitwise_equal,
    final_weights,
    run_training,
    sigkill_once_saved,
    subprocess_env,
    tiny_overrides,
    train_command,
)

ROPE = ("model.arch=vit_small_patch16_dinov3", "model.timm_kwargs={depth: 2, embed_dim: 64, num_heads: 2, "
        "global_pool: token}")
DINOV3 = ("method.name=dinov3", *ROPE, "method.centering=sinkhorn", "method.shared_head=false",
          "method.patch_out_dim=48", "method.gram_weight=1.0", "method.gram_start_step=2",
          "method.gram_refresh_steps=3", "crops.gram_teacher_size=64")


def test_gram_teacher_is_a_snapshot_taken_at_the_start_and_every_refresh(tmp_path):
    method = build_method(load_config(None, tiny_overrides(tmp_path, "x", *DINOV3)))
    teacher, gram = method.teacher.backbone, method.gram_teacher

    def step(index: int) -> None:
        with torch.no_grad():
            for parameter in method.student.parameters():
                parameter.add_(0.01)  # the student moves, so the EMA teacher moves
        method.after_step({"step": index, "teacher_momentum": 0.5})

    def same(first, second) -> bool:
        return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

    step(0)
    assert not same(gram, teacher)  # before gram_start_step: still the initial weights
    step(1)  # the state after step index 1 is what step 2, the first Gram step, anchors to
    assert same(gram, teacher)
    snapshot = [t.clone() for t in gram.state_dict().values()]
    step(2)
    step(3)
    assert not same(gram, teacher) and all(torch.equal(a, b) for a, b in zip(snapshot, gram.state_dict().values()))
    step(4)  # 2 + 3: refreshed
    assert same(gram, teacher)
    assert not any(p.requires_grad for p in gram.parameters())
    assert all(p is not q for group in method.param_groups() for p in group["params"] for q in gram.parameters())


def test_constant_schedule_holds_after_warmup(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "x", "optim.schedule=constant", "optim.warmup_epochs=1",
                                           "train.epochs=5"))
    schedule = TrainingSchedule(cfg, steps_per_epoch=4, world_batch=8)
    values = [schedule(step) for step in range(20)]
    assert values[0]["lr"] == 0.0 and values[2]["lr"] == pytest.approx(schedule.peak_lr / 2)
    assert {round(v["lr"], 12) for v in values[4:]} == {round(schedule.peak_lr, 12)}
    assert {v["weight_decay"] for v in values} == {cfg.optim.weight_decay}
    assert {v["teacher_momentum"] for v in values} == {cfg.method.momentum_teacher}


@pytest.mark.slow
def test_dinov3_trains_with_gram_anchoring_and_resumes_bitwise_across_a_refresh(tmp_path):
    long = (*DINOV3, "train.epochs=4", "data.num_workers=1")  # 16 steps, snapshots at 2, 5, 8, 11, 14
    run_training(tiny_overrides(tmp_path, "uninterrupted", *long))
    reference = final_weights(tmp_path / "uninterrupted")
    logged = [json.loads(line) for line in (tmp_path / "uninterrupted" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["step"] == 2 and logged[0]["loss_gram"] == 0.0  # step index 1: before gram_start_step
    assert all(entry["loss_gram"] > 0 for entry in logged[1:])
    assert "gram_teacher.blocks.0.attn.qkv.weight" in reference
    # Killed after checkpoint 6: after the snapshot of step 5, before that of step 8.
    killed = tiny_overrides(tmp_path, "killed", *long)
    sigkill_once_saved(killed, tmp_path / "killed", 6)
    run_training(killed)
    assert_bitwise_equal(final_weights(tmp_path / "killed"), reference)


@pytest.mark.slow
def test_a_run_can_start_from_another_runs_weights(tmp_path):
    dinov2 = ("method.name=dinov2", *ROPE, "method.centering=sinkhorn", "method.shared_head=false",
              "method.patch_out_dim=48")
    run_training(tiny_overrides(tmp_path, "pretrain", *dinov2, "train.max_steps=3"))
    source = final_weights(tmp_path / "pretrain")
    # The adaptation stage: DINOv3 with Gram anchoring at a larger crop size, starting from the DINOv2 run. Its
    # Gram teacher is taken from the loaded teacher and is not refreshed in one step.
    adapt = (*DINOV3, "method.gram_start_step=0", "method.gram_refresh_steps=1000", "crops.global_size=48",
             f"train.init_from={tmp_path / 'pretrain'}", "train.max_steps=1")
    result = run_training(tiny_overrides(tmp_path, "adapt", *adapt))
    assert "initialised from" in result.stderr and "checkpoint_00000003.pt" in result.stderr
    adapted = final_weights(tmp_path / "adapt")
    for name, value in source.items():
        if name.startswith("teacher.backbone."):
            assert torch.equal(adapted["gram_teacher." + name.removeprefix("teacher.backbone.")], value), name
    # Another architecture is refused with a message, not a traceback.
    wrong = subprocess.run(train_command(tiny_overrides(tmp_path, "wrong", f"train.init_from={tmp_path / 'pretrain'}")),
                           cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "does not fit this model" in wrong.stderr and "Traceback" not in wrong.stderr
