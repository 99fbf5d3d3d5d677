"""Distilling a fixed teacher into another student: feature distillation (any timm student, pooled and dense
targets) and masked knowledge distillation (both networks on the visible patches only), with real runs from the
command line, SIGKILL resume bitwise equal and exports that timm loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from ssd.config import ConfigError, load_config
from ssd.data.random_keep import RandomKeepCollator
from ssd.losses.feature_loss import feature_distillation_loss
from ssd.methods import build_method
from ssd.models.feature_maps import pooled_and_dense, resize_to
from ssd.models.multicrop import same_size_groups
from tests.tiny import (
    TINY_OVERRIDES,
    assert_resume_after_sigkill_is_bitwise_equal,
    final_weights,
    run_training,
    tiny_overrides,
)

# Students: a ResNet learning a ViT's class token and patch tokens (feature_distill), and a narrower 4 px ViT on a
# quarter of the patches (masked_kd). Teachers come from the tiny DINO run `teacher_run` (tests/conftest.py: a
# 2-block ViT with 8 px patches).
RESNET = ("model.arch=resnet10t", "model.img_size=224", "model.patch_size=0", "model.timm_kwargs={}")
FEATURES = ("method.name=feature_distill", *RESNET)
MASKED = ("method.name=masked_kd", "crops.global_number=1", "crops.local_number=0", "distill.mask_ratio=0.75",
          "model.timm_kwargs.embed_dim=96", "model.timm_kwargs.num_heads=3", "distill.block_pairs=[[0,0],[-1,-1]]")


def method_for(teacher_run, *overrides: str):
    torch.manual_seed(0)
    return build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, "teacher.kind=frozen",
                                                         f"teacher.source={teacher_run}", *overrides]))


def samples(count: int, views: list[int]) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"crops": [torch.randn(3, size, size, generator=generator) for size in views], "label": 0, "index": i,
             "epoch": 0} for i in range(count)]


# ---- the loss --------------------------------------------------------------------------------------------

def reference_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """float64, written out element by element."""
    if kind == "cosine_l2":
        return reference_loss(student, teacher, "cosine") + reference_loss(student, teacher, "l2")
    student, teacher = student.double(), teacher.double()
    if kind == "cosine":
        dots = (student * teacher).sum(-1)
        return (1 - dots / (student.norm(dim=-1) * teacher.norm(dim=-1))).mean()
    mean = teacher.mean(-1, keepdim=True)
    normed = (teacher - mean) / torch.sqrt(((teacher - mean) ** 2).mean(-1, keepdim=True) + 1e-5)
    difference = student - normed
    if kind == "l2":
        return (difference ** 2).mean()
    absolute = difference.abs()
    return torch.where(absolute < 1, 0.5 * difference ** 2, absolute - 0.5).mean()


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1", "l2", "cosine_l2"])
def test_feature_loss_matches_a_float64_reference_in_value_and_gradient(kind):
    torch.manual_seed(0)
    student = torch.randn(3, 5, 16, requires_grad=True)
    teacher = torch.randn(3, 5, 16) * 3 + 1
    loss = feature_distillation_loss(student, teacher, kind)
    (gradient,) = torch.autograd.grad(loss, student)
    reference_student = student.detach().double().requires_grad_(True)
    reference = reference_loss(reference_student, teacher, kind)
    (reference_gradient,) = torch.autograd.grad(reference, reference_student)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient.double(), reference_gradient, rtol=1e-4, atol=1e-7)
    bf16 = feature_distillation_loss(student.detach().bfloat16(), teacher.bfloat16(), kind)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
    assert float(feature_distillation_loss(teacher, teacher, "cosine")) == pytest.approx(0.0, abs=1e-6)


def test_feature_loss_refuses_mismatched_shapes_and_unknown_kinds():
    with pytest.raises(ValueError, match="differ in shape"):
        feature_distillation_loss(torch.zeros(2, 8), torch.zeros(2, 9))
    with pytest.raises(ValueError, match="cosine, smooth_l1, l2, cosine_l2"):
        feature_distillation_loss(torch.zeros(2, 8), torch.zeros(2, 8), "kl")


# ---- features of any backbone ----------------------------------------------------------------------------

def test_pooled_and_dense_features_of_a_vit_and_a_cnn():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0,
                            dynamic_img_size=True).eval()
    cnn = timm.create_model("resnet10t", num_classes=0).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled, dense = pooled_and_dense(vit, images)
        tokens = vit.forward_features(images)
        assert dense.shape == (2, 192, 8, 8) and torch.equal(pooled, vit(images))
        torch.testing.assert_close(dense[:, :, 2, 5], tokens[:, 1 + 2 * 8 + 5])  # row-major grid, class token first
        pooled, dense = pooled_and_dense(cnn, images)
        assert dense.shape == (2, 512, 2, 2)
        torch.testing.assert_close(pooled, cnn(images))
        convnext = timm.create_model("convnext_atto", num_classes=0).eval()
        convnext_pooled, convnext_dense = pooled_and_dense(convnext, images)  # its head's norm applies to pooled
        assert convnext_dense.shape == (2, 320, 2, 2)
        torch.testing.assert_close(convnext_pooled, convnext(images))
    assert resize_to(dense, (2, 2)) is dense
    assert resize_to(dense, (4, 4)).shape == (2, 512, 4, 4)
    torch.testing.assert_close(resize_to(dense, (1, 1))[..., 0, 0], dense.mean(dim=(2, 3)))


def test_crops_of_one_size_run_together_in_their_order():
    crops = [torch.full((2, 3, 8, 8), 0.0), torch.full((2, 3, 8, 8), 1.0), torch.full((2, 3, 4, 4), 2.0)]
    groups = same_size_groups(crops)
    assert [group.shape for group in groups] == [(4, 3, 8, 8), (2, 3, 4, 4)]
    assert groups[0][:2].eq(0).all() and groups[0][2:].eq(1).all()


# ---- feature distillation ---------------------------------------------------------------------------------

def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_feature_distillation_trains_student_and_projections_never_the_teacher(teacher_run):
    method = method_for(teacher_run, *FEATURES)
    batch = method.make_collate(0)(samples(4, [32, 32, 16, 16]))
    teacher_blocks = count_forwards(method.teacher.backbone.patch_embed)
    loss, outputs = method(batch, {})
    loss.backward()
    # One teacher forward per crop size (the two global crops together, the two local crops together).
    assert len(teacher_blocks) == 2
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.student.backbone.conv1[0].weight.grad.abs().sum() > 0
    assert method.pooled_projection.weight.grad.abs().sum() > 0 and method.dense_projection.weight.grad.abs().sum() > 0
    assert method.pooled_projection.weight.shape == (192, 512)  # ResNet width -> the teacher ViT's
    assert 0 < loss.item() < 4 and -1 <= outputs["pooled_cosine"] <= 1
    assert not [name for name in method.state_dict() if name.startswith("teacher.")]


def test_a_convnext_student_learns_the_vit_teachers_pooled_and_patch_features(teacher_run):
    """ConvNeXt, the third kind of student the issue names: its last map (stride 8 here) lies on the teacher's
    4 x 4 grid, and both projections and every stage train."""
    method = method_for(teacher_run, "method.name=feature_distill", "model.arch=convnext_atto", "model.patch_size=0",
                        "model.timm_kwargs={output_stride: 8, dims: [16, 32, 48, 64], depths: [1, 1, 1, 1]}")
    loss, outputs = method(method.make_collate(0)(samples(4, [32, 32, 16, 16])), {})
    loss.backward()
    assert type(method.student.backbone).__name__ == "ConvNeXt"
    assert method.dense_projection.weight.shape == (192, 64) and method.dense_projection.weight.grad.abs().sum() > 0
    assert all(stage.blocks[0].conv_dw.weight.grad.abs().sum() > 0 for stage in method.student.backbone.stages)
    assert 0 < loss.item() < 4 and -1 <= outputs["pooled_cosine"] <= 1


def test_feature_distillation_targets_choose_the_terms(teacher_run):
    pooled_only = method_for(teacher_run, *FEATURES, "distill.targets=pooled")
    patches_only = method_for(teacher_run, *FEATURES, "distill.targets=patches", "distill.projection=mlp")
    assert pooled_only.dense_projection is None and patches_only.pooled_projection is None
    batch = pooled_only.make_collate(0)(samples(2, [32, 32]))
    assert "pooled_cosine" not in patches_only(batch, {})[1]
    # The dense target of a CNN teacher with a (B, C) forward_features cannot be laid on a grid: named at start.
    with pytest.raises(ConfigError, match="distill.targets=patches"):
        method_for(teacher_run, *FEATURES, "distill.targets=patches", "teacher.kind=random", "teacher.source=",
                   "teacher.arch=mixer_s32_224", "teacher.timm_kwargs={img_size: 32}")


def test_distillation_needs_a_fixed_teacher():
    with pytest.raises(ConfigError, match="teacher.kind=frozen"):
        load_config("dino_digits_demo", [*TINY_OVERRIDES, *FEATURES])


@pytest.mark.slow
def test_feature_distillation_resumes_bitwise_after_sigkill(tmp_path, teacher_run):
    assert_resume_after_sigkill_is_bitwise_equal(
        tmp_path, (*FEATURES, "teacher.kind=frozen", f"teacher.source={teacher_run}", "data.num_workers=1"),
        kill_at_step=6)
    assert not [key for key in final_weights(tmp_path / "killed") if key.startswith("teacher.")]


def test_feature_distilled_resnet_exports_to_timm(tmp_path, teacher_run):
    from ssd.export import main as export

    run_training(tiny_overrides(tmp_path, "run", *FEATURES, "teacher.kind=frozen", f"teacher.source={teacher_run}",
                                "train.max_steps=2"))
    export([str(tmp_path / "run"), "--output", str(tmp_path / "export")])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                              pretrained_cfg_overlay={"file": str(tmp_path / "export" / "model.safetensors")}).eval()
    student = final_weights(tmp_path / "run")
    assert config["architecture"] == "resnet10t"
    assert torch.equal(model.conv1[0].weight, student["student.backbone.conv1.0.weight"])


# ---- masked knowledge distillation ---------------------------------------------------------------------------

def test_random_keep_is_seeded_per_sample_sorted_and_uniform():
    collate = RandomKeepCollator(num_patches=16, mask_ratio=0.75, seed=3)
    keep = collate(samples(6, [32]))["keep"]
    assert keep.shape == (6, 4)
    assert all(len(set(row.tolist())) == 4 and row.tolist() == sorted(row.tolist()) for row in keep)
    # A sample keeps the same patches whatever batch it lands in (resume, other world sizes).
    alone = collate([samples(6, [32])[4]])["keep"]
    assert torch.equal(alone[0], keep[4])
    assert not torch.equal(RandomKeepCollator(16, 0.75, seed=4)(samples(6, [32]))["keep"], keep)
    # Every patch is equally likely to be kept: chi-square over 4000 draws, 15 degrees of freedom.
    counts = np.zeros(16)
    for index in range(4000):
        counts[collate.kept_patches(0, index)] += 1
    expected = 4000 * 4 / 16
    assert ((counts - expected) ** 2 / expected).sum() < 37.7  # the 0.999 quantile of chi-square(15)
    with pytest.raises(ValueError, match="mask_ratio"):
        RandomKeepCollator(16, 1.0)


def test_masked_kd_teacher_and_student_see_only_the_kept_patches(teacher_run):
    method = method_for(teacher_run, *MASKED, "model.patch_size=8").eval()
    batch = method.make_collate(0)(samples(3, [32]))
    keep = batch["keep"]
    assert keep.shape == (3, 4)  # a quarter of the 16 patches
    with torch.no_grad():
        loss, _ = method(batch, {})
        # Changing the pixels of every hidden patch changes nothing: neither network saw them.
        hidden = torch.ones(3, 16, dtype=torch.bool)
        hidden[torch.arange(3)[:, None], keep] = False
        pixel_mask = F.interpolate(hidden.view(3, 1, 4, 4).float(), scale_factor=8).bool().expand(-1, 3, -1, -1)
        scrambled = {**batch, "crops": [torch.where(pixel_mask, torch.randn(3, 3, 32, 32), batch["crops"][0])]}
        torch.testing.assert_close(method(scrambled, {})[0], loss, rtol=0, atol=1e-6)
        changed = {**batch, "crops": [torch.where(pixel_mask, batch["crops"][0], torch.randn(3, 3, 32, 32))]}
        assert not torch.allclose(method(changed, {})[0], loss)


def test_masked_kd_aligns_the_chosen_blocks_through_projections(teacher_run):
    method = method_for(teacher_run, *MASKED, "model.patch_size=8")
    assert method.pairs == [(0, 0), (-1, -1)] and len(method.projections) == 2
    assert method.projections[0].weight.shape == (192, 96)
    batch = method.make_collate(0)(samples(2, [32]))
    loss, outputs = method(batch, {})
    loss.backward()
    assert {"pair0_loss", "pair1_loss", "pooled_cosine", "kept_share"} <= set(outputs)
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.student.backbone.blocks[1].mlp.fc1.weight.grad.abs().sum() > 0


def test_masked_kd_config_mistakes_are_named(teacher_run):
    with pytest.raises(ConfigError, match="teacher has 2 blocks"):
        method_for(teacher_run, *MASKED, "model.patch_size=8", "distill.block_pairs=[[0,5]]")
    with pytest.raises(ConfigError, match=r"\[student block, teacher block\]"):
        method_for(teacher_run, *MASKED, "model.patch_size=8", "distill.block_pairs=[[0]]")
    with pytest.raises(ConfigError, match="must match the student's"):
        method_for(teacher_run, *MASKED, "model.patch_size=4")
    with pytest.raises(ConfigError, match="block_pairs is empty"):
        method_for(teacher_run, *MASKED, "model.patch_size=8", "distill.block_pairs=[]")
    with pytest.raises(ConfigError, match="needs patch tokens"):
        method_for(teacher_run, *MASKED, *RESNET)


@pytest.mark.slow
def test_masked_kd_resumes_bitwise_after_sigkill(tmp_path, teacher_run):
    assert_resume_after_sigkill_is_bitwise_equal(
        tmp_path, (*MASKED, "model.patch_size=8", "teacher.kind=frozen", f"teacher.source={teacher_run}",
                   "data.num_workers=1"), kill_at_step=6)


@pytest.mark.long
def test_distillation_recipes_beat_random_init(tmp_path):
    """The README's three commands: a DINO ResNet teacher, a ViT student of it (feature_distill), a narrower ViT
    student of that one on a quarter of the patches (masked_kd); benchmarks/RESULTS.md "Distillation on digits"."""
    from tests.test_methods_jepa import recipe_knn

    recipe_knn(tmp_path, "dino_digits_demo", run_name="dino-digits")
    features = recipe_knn(tmp_path, "feature_distill_digits_demo", f"teacher.source={tmp_path / 'dino-digits'}",
                          run_name="feature-distill-digits")
    assert features["trained student"] > features["random init (same arch)"] + 5.0, features
    masked = recipe_knn(tmp_path, "masked_kd_digits_demo", f"teacher.source={tmp_path / 'feature-distill-digits'}")
    assert masked["trained student"] > masked["random init (same arch)"] + 2.0, masked


@pytest.mark.parametrize("override, named", [("distill.mask_ratio=1.0", "distill.mask_ratio"),
                                              ("distill.patch_weight=-1", "distill.patch_weight"),
                                              ("distill.targets=cls", "distill.targets"),
                                              ("distill.loss=kl", "distill.loss")])
def test_distill_values_out_of_range_are_named_before_anything_runs(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config("masked_kd_digits_demo", [override])


@pytest.mark.slow
def test_masked_kd_on_two_processes_trains_as_on_one(tmp_path, teacher_run):
    """The kept patches follow each sample, not its process: the same global batch on 1 and 2 gloo processes gives
    the same weights, and neither stores the frozen teacher."""
    same = (*MASKED, "model.patch_size=8", "model.drop_path_rate=0.0", "teacher.kind=frozen",
            f"teacher.source={teacher_run}", "train.max_steps=4")
    run_training(tiny_overrides(tmp_path, "one", *same))
    result = run_training(tiny_overrides(tmp_path, "two", *same), nproc=2)
    assert "on 2 process(es)" in result.stderr
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert not [key for key in two if key.startswith("teacher.")]
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
