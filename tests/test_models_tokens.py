"""The token/mask interface over real timm backbones: ViT (learned positions, registers, LayerScale) and the
DINOv3 RoPE architecture (timm Eva). Masking must change exactly the masked images and nothing else."""

from __future__ import annotations

import pytest
import timm
import torch

from ssd.config import ConfigError
from ssd.models.layer_decay import lr_multipliers, vit_layer_id
from ssd.models.tokens import encode, require_tokens

ARCHITECTURES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "vit-registers-layerscale": ("vit_tiny_patch16_224", {"reg_tokens": 4, "init_values": 1e-5, "no_embed_class": True}),
    "dinov3-rope": ("vit_small_patch16_dinov3", {"embed_dim": 64, "num_heads": 2, "global_pool": "token"}),
}


def tiny(name: str) -> torch.nn.Module:
    arch, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2,
                              dynamic_img_size=True, **extra)
    return model.eval()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_tokens_match_timm_and_masking_changes_only_masked_images(name):
    backbone = tiny(name)
    images = torch.randn(3, 3, 32, 32)
    mask_token = torch.randn(backbone.num_features)
    with torch.no_grad():
        plain = encode(backbone, images)
        reference = backbone.forward_features(images)
        prefix = backbone.num_prefix_tokens
        assert torch.equal(plain.patches, reference[:, prefix:]) and torch.equal(plain.cls, reference[:, 0])
        assert plain.patches.shape == (3, 16, backbone.num_features)
        assert plain.registers.shape[1] == ARCHITECTURES[name][1].get("reg_tokens", prefix - 1)
        assert torch.allclose(plain.pooled, backbone(images), atol=1e-6)

        masks = torch.zeros(3, 16, dtype=torch.bool)
        masks[1, [0, 5, 6, 15]] = True  # image 1 masked, images 0 and 2 not
        masked = encode(backbone, images, masks, mask_token)
        none_masked = encode(backbone, images, torch.zeros_like(masks), mask_token)
    for field in ("cls", "patches", "pooled"):
        assert torch.equal(getattr(none_masked, field), getattr(plain, field)), field
        assert torch.equal(getattr(masked, field)[[0, 2]], getattr(plain, field)[[0, 2]]), field
        assert not torch.allclose(getattr(masked, field)[1], getattr(plain, field)[1]), field
    assert not backbone.patch_embed._forward_hooks  # the hook is removed after the call


def test_masked_patch_becomes_the_mask_token_before_position_embedding():
    backbone = tiny("vit")
    images = torch.randn(2, 3, 32, 32)
    all_masked = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        tokens = encode(backbone, images, all_masked, torch.randn(backbone.num_features))
    # Two different images, fully masked, give the same tokens: nothing of the pixels got through ...
    assert torch.allclose(tokens.patches[0], tokens.patches[1], atol=1e-6)
    # ... while positions still tell the patches apart: the position embedding was added after the token.
    assert not torch.allclose(tokens.patches[0, 0], tokens.patches[0, 5], atol=1e-3)


def test_mask_shape_mismatch_is_reported():
    backbone = tiny("vit")
    with pytest.raises(ValueError, match="do not fit 16 patches"):
        encode(backbone, torch.randn(2, 3, 32, 32), torch.zeros(2, 15, dtype=torch.bool), torch.zeros(192))


def test_non_vit_backbones_give_pooled_only_and_token_methods_refuse_them():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    with torch.no_grad():
        tokens = encode(resnet, torch.randn(1, 3, 32, 32))
    assert tokens.pooled.shape == (1, 512) and tokens.patches is None
    with pytest.raises(ConfigError, match="method.name=ibot needs patch tokens"):
        require_tokens(resnet, "ibot")


def test_layer_ids_and_lr_multipliers():
    depth = 4
    assert vit_layer_id("student.backbone.patch_embed.proj.weight", depth) == 0
    assert vit_layer_id("student.mask_token", depth) == 0
    assert vit_layer_id("student.backbone.reg_token", depth) == 0
    assert vit_layer_id("student.backbone.blocks.2.attn.qkv.weight", depth) == 3
    assert vit_layer_id("student.backbone.norm.weight", depth) == 5
    assert vit_layer_id("student.head.mlp.0.weight", depth) == 5
    multiplier = lr_multipliers(depth, 0.9, 0.2)
    assert multiplier("student.head.last_layer.weight") == 1.0
    assert multiplier("student.backbone.blocks.3.mlp.fc1.weight") == pytest.approx(0.9)
    assert multiplier("student.backbone.patch_embed.proj.weight") == pytest.approx(0.9**5 * 0.2)
    assert lr_multipliers(depth, 1.0, 1.0) is None
