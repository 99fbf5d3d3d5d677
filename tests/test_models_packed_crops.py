"""model.packed_crops: global and local crops through a ViT's blocks together, attention per resolution."""

from __future__ import annotations

import pytest
import torch

from ssd.checkpoint_import import model_config
from ssd.models.backbone import build_backbone
from ssd.models.packed_crops import can_pack, encode_packed
from ssd.models.tokens import encode

VIT = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "drop_path_rate": 0.0, "num_registers": 2,
       "timm_kwargs": {"depth": 2, "init_values": 0.1}}


def crops_and_masks():
    generator = torch.Generator().manual_seed(0)
    global_crops, local_crops = torch.randn(4, 3, 32, 32, generator=generator), torch.randn(6, 3, 16, 16,
                                                                                           generator=generator)
    masks = torch.rand(4, 16, generator=generator) < 0.4
    return [global_crops, local_crops], [masks, None]


@pytest.mark.parametrize("values", [VIT, {**VIT, "num_registers": 0, "timm_kwargs": {
    "depth": 2, "class_token": False, "global_pool": "avg", "fc_norm": False}}], ids=["class token", "avg pool"])
def test_packed_tokens_and_gradients_equal_separate_forwards(values):
    torch.manual_seed(0)
    backbone = build_backbone(model_config(values))
    mask_token = torch.nn.Parameter(torch.randn(backbone.num_features))
    assert can_pack(backbone)
    images, masks = crops_and_masks()
    packed = encode_packed(backbone, images, masks, mask_token)
    separate = [encode(backbone, batch, mask, mask_token if mask is not None else None)
                for batch, mask in zip(images, masks)]
    for ours, theirs in zip(packed, separate):
        torch.testing.assert_close(ours.pooled, theirs.pooled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.patches, theirs.patches, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.registers, theirs.registers, rtol=1e-5, atol=1e-5)
    gradients = []
    for outputs in (packed, separate):
        backbone.zero_grad()
        mask_token.grad = None
        sum(t.pooled.square().sum() + t.patches.sum() for t in outputs).backward()
        gradients.append({"mask_token": mask_token.grad.clone(),
                          **{n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_crop_attends_only_to_its_own_tokens():
    """Changing the local crops leaves the global crops' tokens as they were (attention stays per resolution)."""
    backbone = build_backbone(model_config(VIT))
    images, masks = crops_and_masks()
    first = encode_packed(backbone, images, masks, torch.zeros(backbone.num_features))
    second = encode_packed(backbone, [images[0], images[1] * 3 + 1], masks, torch.zeros(backbone.num_features))
    torch.testing.assert_close(first[0].patches, second[0].patches, rtol=0, atol=1e-6)
    assert not torch.allclose(first[1].pooled, second[1].pooled)


def test_backbones_that_cannot_be_packed_run_one_group_at_a_time():
    eva = build_backbone(model_config({"arch": "vit_small_patch16_dinov3", "img_size": 32, "drop_path_rate": 0.0,
                                       "timm_kwargs": {"depth": 1, "embed_dim": 64, "num_heads": 2}}))
    assert not can_pack(eva)
    images, masks = crops_and_masks()
    images = [torch.nn.functional.interpolate(batch, scale_factor=2) for batch in images]  # 16 px patches
    masks = [torch.rand(4, 16) < 0.4, None]
    token = torch.zeros(eva.num_features)
    for ours, theirs in zip(encode_packed(eva, images, masks, token),
                            [encode(eva, images[0], masks[0], token), encode(eva, images[1])]):
        assert torch.equal(ours.pooled, theirs.pooled)


@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_a_methods_step_is_the_same_packed_or_not(method):
    """The student's loss and gradients with model.packed_crops on and off (DINO: pooled features of every crop;
    DINOv2: masked global crops and local class tokens)."""
    from ssd.config import load_config
    from ssd.methods import build_method
    from tests.test_methods_masked import DINOV2
    from tests.tiny import TINY_OVERRIDES

    extra = DINOV2 if method == "dinov2" else ()
    results = []
    for packed in ("false", "true"):
        torch.manual_seed(0)
        built = build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, *extra, "model.drop_path_rate=0.0",
                                                              f"model.packed_crops={packed}"]))
        generator = torch.Generator().manual_seed(1)
        samples = [{"crops": [torch.randn(3, size, size, generator=generator) for size in (32, 32, 16, 16)],
                    "label": 0, "index": i, "epoch": 0} for i in range(4)]
        loss, _ = built(built.make_collate(0)(samples), {"teacher_temp": 0.04, "patch_teacher_temp": 0.05})
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in built.student.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, gradient in results[0][1].items():
        error = (results[1][1][name] - gradient).norm() / gradient.norm().clamp(min=1e-12)
        assert error < 1e-3, (name, float(error))  # float rounding, amplified by the low temperatures


@pytest.mark.slow
def test_a_packed_run_resumes_bitwise_after_sigkill(tmp_path):
    from tests.test_methods_masked import DINOV2
    from tests.tiny import assert_resume_after_sigkill_is_bitwise_equal

    assert_resume_after_sigkill_is_bitwise_equal(
        tmp_path, (*DINOV2, "model.packed_crops=true", "train.epochs=4", "data.num_workers=1"), kill_at_step=6)
