"""Post-hoc registers (PH-Reg): the TTA-denoised targets on their own, the loss against a float64 reference, and
the method end to end on the embedded digits from the command line (a tiny pretrained ViT first, then registers
added to it): loading without registers, only the chosen parameters training, SIGKILL resume bitwise equal,
export that timm loads with its registers, and the two-command recipe against random init."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from ssd.config import ConfigError, load_config
from ssd.losses.feature_loss import KINDS, feature_distillation_loss
from ssd.methods import build_method
from ssd.models.tta_targets import augment, denoised_targets, draw_views
from tests.test_methods_jepa import recipe_knn
from tests.tiny import (
    TINY_OVERRIDES,
    assert_resume_after_sigkill_is_bitwise_equal,
    final_weights,
    run_training,
    tiny_overrides,
)

# ---- TTA targets ---------------------------------------------------------------------------------------------


def pixelwise_teacher(projection: torch.Tensor):
    """A ViT stand-in with 1 px patches whose tokens are a linear map of their pixel: exactly shift- and
    flip-equivariant, so denoising must give back its un-augmented tokens."""
    return lambda images: images.flatten(2).transpose(1, 2) @ projection  # (B, H * W, D)


def patch_average_teacher(projection: torch.Tensor, patch: int):
    return lambda images: F.avg_pool2d(images, patch).flatten(2).transpose(1, 2) @ projection  # (B, N, D)


def test_equivariant_teacher_gives_back_its_unaugmented_tokens_exactly():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    teacher = pixelwise_teacher(torch.randn(3, 5, dtype=torch.float64))
    shifts = torch.tensor([[[0, 0], [1, -2], [-3, 2], [7, 7]], [[0, 0], [2, 2], [0, -1], [-5, 0]]])
    flips = torch.tensor([[False, True, False, True], [False, False, True, True]])
    targets = denoised_targets(teacher, images, shifts, flips, patch_size=1)
    torch.testing.assert_close(targets, teacher(images), rtol=0, atol=1e-12)
    # Without undoing flip and shift, the same views average to something else.
    views = teacher(augment(images, shifts, flips)).view(2, 4, 64, 5)
    assert (views.mean(1) - teacher(images)).abs().max() > 0.1


def test_whole_patch_shifts_of_a_patch_teacher_are_undone_exactly():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    teacher = patch_average_teacher(torch.randn(3, 4, dtype=torch.float64), patch=4)
    shifts = torch.tensor([[[0, 0], [4, -4], [-8, 4]], [[0, 0], [4, 4], [0, -12]]])
    flips = torch.tensor([[False, True, False], [False, False, True]])
    targets = denoised_targets(teacher, images, shifts, flips, patch_size=4)
    torch.testing.assert_close(targets, teacher(images), rtol=0, atol=1e-12)


def test_a_flip_is_undone_exactly():
    torch.manual_seed(2)
    images = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    teacher = pixelwise_teacher(torch.randn(3, 2, dtype=torch.float64))
    flips = torch.tensor([[False, True]])
    view = augment(images, torch.zeros(1, 2, 2, dtype=torch.long), flips)[1]
    torch.testing.assert_close(view, images[0].flip(-1), rtol=0, atol=0)
    targets = denoised_targets(teacher, images, torch.zeros(1, 2, 2, dtype=torch.long), flips, patch_size=1)
    torch.testing.assert_close(targets, teacher(images), rtol=0, atol=1e-12)


def test_a_shift_moves_the_content_and_repeats_the_border():
    images = torch.arange(16.0).view(1, 1, 4, 4)
    view = augment(images, torch.tensor([[[1, -2]]]), torch.tensor([[False]]))[0, 0]
    # view pixel (r, c) shows image pixel (r - 1, c + 2), clamped into the image
    expected = torch.tensor([[2.0, 3, 3, 3], [2, 3, 3, 3], [6, 7, 7, 7], [10, 11, 11, 11]])
    torch.testing.assert_close(view, expected, rtol=0, atol=0)


def test_shifts_realign_the_content_and_dilute_a_position_locked_artifact():
    """A teacher whose tokens follow the content (a linear ramp: bilinear resampling of its token grid is exact,
    also for shifts of a fraction of a patch) plus an artifact locked to one token position of whatever view it
    is shown, as ViT artifact tokens are."""
    patch, grid = 4, 6
    ramp = torch.arange(grid * patch, dtype=torch.float64)
    images = (ramp[:, None] + 2 * ramp[None, :]).expand(1, 1, -1, -1)  # (1, 1, 24, 24)
    artifact = 2 * grid + 2  # token (2, 2)

    def teacher(views):
        tokens = patch_average_teacher(torch.ones(1, 1, dtype=torch.float64), patch)(views).clone()  # (B', 36, 1)
        tokens[:, artifact] += 100.0
        return tokens

    shifts, _ = draw_views(np.random.default_rng(0), 16, max_shift=patch)
    shifts, flips = torch.from_numpy(shifts)[None], torch.zeros(1, 16, dtype=torch.bool)
    targets = denoised_targets(teacher, images, shifts, flips, patch_size=patch)[0, :, 0].view(grid, grid)
    clean = F.avg_pool2d(images, patch)[0, 0]  # (6, 6) what an artifact-free teacher gives
    identity_only = denoised_targets(teacher, images, shifts[:, :1], flips[:, :1], patch_size=patch)
    assert identity_only[0, artifact, 0] - clean[2, 2] == pytest.approx(100.0)
    assert targets[2, 2] - clean[2, 2] < 50.0  # diluted by the views that put other content there
    # Within a patch of the artifact it spreads (resampling), and the outer ring sees repeated border pixels;
    # everywhere else the content comes back exactly, sub-patch shifts included.
    exact = torch.zeros(grid, grid, dtype=torch.bool)
    exact[1:-1, 1:-1] = True
    exact[1:4, 1:4] = False
    assert 0 < (shifts.abs() % patch).count_nonzero()
    torch.testing.assert_close(targets[exact], clean[exact], rtol=0, atol=1e-9)


def test_views_start_with_the_identity_and_stay_within_the_largest_shift():
    shifts, flips = draw_views(np.random.default_rng(3), 50, max_shift=3)
    assert shifts.shape == (50, 2) and flips.shape == (50,)
    assert not flips[0] and (shifts[0] == 0).all()
    assert shifts.min() == -3 and shifts.max() == 3 and 0 < flips.mean() < 1


# ---- loss ---------------------------------------------------------------------------------------------------


def reference_loss(student: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """The losses written out elementwise, in float64."""
    cosine = 1 - (student * targets).sum(-1) / (student.norm(dim=-1) * targets.norm(dim=-1))
    difference = student - targets
    l2 = (difference**2).mean()
    smooth = torch.where(difference.abs() < 1, 0.5 * difference**2, difference.abs() - 0.5).mean()
    return {"cosine": cosine.mean(), "l2": l2, "smooth_l1": smooth, "cosine_l2": cosine.mean() + l2}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_loss_matches_a_float64_reference_in_value_and_gradient(kind):
    torch.manual_seed(0)
    student = (2 * torch.randn(3, 10, 16, dtype=torch.float64)).requires_grad_()
    targets = 2 * torch.randn(3, 10, 16, dtype=torch.float64)
    reference_student = student.detach().clone().requires_grad_()
    loss = feature_distillation_loss(student.float(), targets.float(), kind, normalize_targets=False)
    reference = reference_loss(reference_student, targets, kind)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad, reference_student.grad, rtol=1e-4, atol=1e-7)


def test_loss_is_finite_in_bfloat16_and_zero_on_its_targets():
    targets = torch.randn(2, 64, 192)
    unnormalized = {"kind": "cosine_l2", "normalize_targets": False}
    assert torch.isfinite(feature_distillation_loss(torch.randn(2, 64, 192).bfloat16(), targets.bfloat16(),
                                                    **unnormalized))
    assert feature_distillation_loss(targets, targets, **unnormalized) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="cosine_l2"):
        feature_distillation_loss(targets, targets, "l1")


# ---- the method on a tiny pretrained ViT ----------------------------------------------------------------------

# The tiny run of tests/tiny.py as a ViT without class token (average pooling, 4 px patches: an 8 x 8 grid), as
# SALT's stage 1 of the digits demo; PH-Reg adds 2 registers and trains the paper's parts.
VIT = ("model.patch_size=4", "model.timm_kwargs.class_token=false", "model.timm_kwargs.global_pool=avg",
       "model.timm_kwargs.fc_norm=false", "crops.global_number=1", "crops.local_number=0")
MAE = ("method.name=mae", *VIT, "method.predictor_dim=32", "method.predictor_depth=1", "method.predictor_heads=2")
PAPER_PARTS = ["reg_token", "pos_embed", "patch_embed.*", "blocks.1.*"]


def phreg(source, *extra: str) -> tuple[str, ...]:
    return ("method.name=posthoc_registers", *VIT, "model.num_registers=2", f"model.pretrained={source}",
            "teacher.kind=frozen", f"teacher.source={source}", f"distill.trainable=[{','.join(PAPER_PARTS)}]",
            "distill.loss=cosine_l2", "distill.tta_views=4", *extra)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A ViT trained without registers (4 MAE steps): what PH-Reg starts from."""
    root = tmp_path_factory.mktemp("pretrained")
    run_training(tiny_overrides(root, "vit", *MAE, "train.max_steps=4"))
    return root / "vit"


def build(*overrides: str):
    torch.manual_seed(0)
    return build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, *overrides]))


def a_batch(method, size: int = 4) -> dict:
    torch.manual_seed(1)
    samples = [{"crops": [torch.randn(3, 32, 32)], "label": 0, "index": i, "epoch": 0} for i in range(size)]
    return method.make_collate(seed=0)(samples)


def test_student_is_the_pretrained_vit_plus_fresh_registers(pretrained):
    method = build(*phreg(pretrained))
    student, teacher = method.student.backbone.state_dict(), method.teacher.backbone.state_dict()
    assert set(student) - set(teacher) == {"reg_token"} and student["reg_token"].shape == (1, 2, 192)
    assert teacher["pos_embed"].shape == (1, 64, 192) and student["pos_embed"].shape == (1, 66, 192)
    assert student["pos_embed"][:, :2].abs().sum() == 0  # the registers get no position, as in DINOv2
    torch.testing.assert_close(student["pos_embed"][:, 2:], teacher["pos_embed"], rtol=0, atol=0)
    assert all(torch.equal(student[name], teacher[name]) for name in teacher if name != "pos_embed")
    assert method.teacher.backbone.num_prefix_tokens == 0  # the teacher did not get the student's registers


def test_only_the_chosen_parameters_train_and_get_gradients(pretrained):
    method = build(*phreg(pretrained))
    trainable = {name for name, p in method.student.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"reg_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"} | {
        name for name, _ in method.student.backbone.named_parameters() if name.startswith("blocks.1.")}
    optimised = {id(p) for group in method.param_groups() for p in group["params"]}
    assert optimised == {id(p) for name, p in method.student.backbone.named_parameters() if name in trainable}
    loss, outputs = method(a_batch(method), {"step": 0})
    loss.backward()
    assert loss > 0 and 0 < outputs["cosine_to_targets"] < 1 and 0 < outputs["teacher_cosine_to_targets"] <= 1 + 1e-6
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in
               method.student.backbone.named_parameters() if name in trainable)
    assert all(p.grad is None for name, p in method.named_parameters() if name.removeprefix("student.backbone.")
               not in trainable)


def test_views_depend_on_seed_epoch_and_sample_only(pretrained):
    method = build(*phreg(pretrained, "distill.tta_views=6"))
    collate = method.make_collate(seed=0)
    samples = [{"crops": [torch.zeros(3, 32, 32)], "label": 0, "index": i, "epoch": 0} for i in range(5)]
    batch = collate(samples)
    assert batch["tta_shifts"].shape == (5, 6, 2) and batch["tta_flips"].shape == (5, 6)
    assert batch["tta_shifts"].abs().max() <= 2  # half of a 4 px patch
    alone = collate(samples[3:4])  # sample 3 in another batch: the same views
    assert torch.equal(alone["tta_shifts"][0], batch["tta_shifts"][3])
    other_epoch = collate([{**samples[3], "epoch": 1}])
    assert not torch.equal(other_epoch["tta_shifts"][0], batch["tta_shifts"][3])
    assert batch["tta_flips"][:, 1:].any()  # crops.flip_probability 0.5 (the default): PH-Reg's random flips
    unflipped = build(*phreg(pretrained, "crops.flip_probability=0")).make_collate(seed=0)(samples)
    assert not unflipped["tta_flips"].any()  # a ViT trained without flips is not asked to be flip-equivariant


def test_mistakes_are_named(pretrained, tmp_path):
    with pytest.raises(ConfigError, match=r"distill.trainable.*empty.*reg_token"):
        build(*phreg(pretrained, "distill.trainable=[]"))
    with pytest.raises(ConfigError, match=r"'block.1.\*' match\(es\) no parameter.*pos_embed"):
        build(*phreg(pretrained, "distill.trainable=[reg_token,block.1.*]"))
    with pytest.raises(ConfigError, match="model.num_registers=R"):
        build(*phreg(pretrained, "model.num_registers=0"))
    with pytest.raises(ConfigError, match="teacher.kind=frozen"):
        build(*phreg(pretrained, "teacher.kind=random", "teacher.source="))
    with pytest.raises(ConfigError, match=r"missing.*blocks\.2\.(?s:.*)only reg_token may be missing"):
        build(*phreg(pretrained, "model.timm_kwargs.depth=3"))
    run_training(tiny_overrides(tmp_path, "with-registers", *MAE, "model.num_registers=2", "train.max_steps=1"))
    with pytest.raises(ConfigError, match="already has 2 registers"):
        build(*phreg(tmp_path / "with-registers"))


def test_registers_fit_a_vit_with_a_class_token(tmp_path):
    """timm's ViT with a class token gives every prefix token a position: the registers' rows are inserted after
    the class token's, so the class token and every patch keep their own."""
    run_training(tiny_overrides(tmp_path, "dino", "train.max_steps=1"))
    method = build("method.name=posthoc_registers", "crops.global_number=1", "crops.local_number=0",
                   "model.num_registers=3", f"model.pretrained={tmp_path / 'dino'}", "teacher.kind=frozen",
                   f"teacher.source={tmp_path / 'dino'}", "distill.trainable=[reg_token]")
    student, teacher = method.student.backbone.pos_embed, method.teacher.backbone.pos_embed
    assert student.shape == (1, 1 + 3 + 16, 192)
    torch.testing.assert_close(student[:, [0, *range(4, 20)]], teacher, rtol=0, atol=0)
    loss, _ = method(a_batch(method), {"step": 0})
    assert torch.isfinite(loss)


def test_a_plain_weights_file_without_recorded_architecture(tmp_path):
    """An official-style file (a bare state dict, no architecture recorded): the student is built from model.*,
    and so is the teacher, without the student's registers."""
    from ssd.checkpoint_import import model_config
    from ssd.models.backbone import build_backbone

    config = load_config("dino_digits_demo", TINY_OVERRIDES)
    torch.manual_seed(3)
    original = build_backbone(model_config(dict(config.model)))
    torch.save(original.state_dict(), tmp_path / "vit.pth")
    method = build("method.name=posthoc_registers", "crops.global_number=1", "crops.local_number=0",
                   "model.num_registers=2", f"model.pretrained={tmp_path / 'vit.pth'}", "teacher.kind=frozen",
                   f"teacher.source={tmp_path / 'vit.pth'}", "distill.trainable=[reg_token,blocks.1.*]")
    teacher = method.teacher.backbone
    assert teacher.num_prefix_tokens == 1 and torch.equal(teacher.pos_embed, original.pos_embed)
    assert torch.equal(method.student.backbone.blocks[0].attn.qkv.weight, original.blocks[0].attn.qkv.weight)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, pretrained):
    assert_resume_after_sigkill_is_bitwise_equal(tmp_path, (*phreg(pretrained), "train.epochs=3",
                                                            "data.num_workers=1"), kill_at_step=6)
    weights = final_weights(tmp_path / "killed")
    assert not [name for name in weights if name.startswith("teacher.")]  # the frozen ViT is not stored again


def test_export_loads_in_timm_with_its_registers(tmp_path, pretrained):
    from ssd.checkpoint_import import load_backbone_for_eval
    from ssd.export import main as export

    run_training(tiny_overrides(tmp_path, "run", *phreg(pretrained), "train.max_steps=3"))
    export([str(tmp_path / "run"), "--output", str(tmp_path / "export")])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                              pretrained_cfg_overlay={"file": str(tmp_path / "export" / "model.safetensors")}).eval()
    assert model.num_reg_tokens == 2 and model.cls_token is None
    trained, _ = load_backbone_for_eval(tmp_path / "run")  # the run's student, with its trained registers
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), trained.eval().forward_features(images))
        torch.testing.assert_close(model(images), model.forward_features(images)[:, 2:].mean(dim=1))


def test_recipe_fits_the_vit_of_its_first_command(tmp_path):
    """The recipe's model section is the DINOv2 demo's ViT (its first command, here 1 step) plus registers."""
    run_training(["--config", "dinov2_digits_demo", "model.num_registers=0", f"output.root={tmp_path}",
                  "output.run_name=vit", "train.max_steps=1", "log.progress_bar=false", "eval.knn=false"])
    source = tmp_path / "vit"
    method = build_method(load_config("posthoc_registers_digits_demo", [f"model.pretrained={source}",
                                                                        f"teacher.source={source}"]))
    assert method.student.backbone.num_prefix_tokens == 1 + 4 and method.teacher.backbone.num_prefix_tokens == 1
    assert method.student.backbone.global_pool == "avg" and method.max_shift == 4  # half of an 8 px patch


@pytest.mark.long
def test_recipe_beats_random_init(tmp_path):
    """The two commands of the recipe's header: a DINOv2 ViT without registers, then PH-Reg on it
    (benchmarks/RESULTS.md: 56.4% against 51.1% at random init and 50.3% for the ViT before)."""
    recipe_knn(tmp_path, "dinov2_digits_demo", "model.num_registers=0", run_name="dinov2-digits-noreg")
    source = tmp_path / "dinov2-digits-noreg"
    knn = recipe_knn(tmp_path, "posthoc_registers_digits_demo", f"model.pretrained={source}",
                     f"teacher.source={source}")
    assert knn["trained student"] > knn["random init (same arch)"] + 2.0, knn
