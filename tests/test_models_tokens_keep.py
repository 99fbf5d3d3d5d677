"""`encode(..., keep=)`: only the kept patches enter the blocks, each with its real position (learned position
embedding for VisionTransformer, rotary embedding for the DINOv3-style Eva). Checked against two independent
forms: an explicit ViT forward on the gathered tokens, and timm's own full-sequence forward in which an
attention mask hides the dropped patches (the same function of the kept tokens, computed another way)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.eva import Eva

from ssd.models.tokens import encode

GRID = 16  # 32 x 32 images, 8 x 8 patches

ARCHITECTURES = {
    "vit-cls-registers": lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2,
        dynamic_img_size=True, reg_tokens=2, no_embed_class=True, init_values=0.5),
    "vit-cls-embedded": lambda: timm.create_model(  # position embedding with entries for the class token
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2),
    "vit-avg-no-cls": lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2,
        dynamic_img_size=True, class_token=False, global_pool="avg"),
    "dinov3-rope": lambda: timm.create_model(
        "vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2,
        embed_dim=64, num_heads=2, global_pool="token", num_reg_tokens=2, init_values=0.5),
    "eva-rope-abs": lambda: Eva(  # rotary and learned absolute positions, fixed image size
        img_size=32, patch_size=8, num_classes=0, embed_dim=64, depth=2, num_heads=2, use_rot_pos_emb=True,
        use_abs_pos_emb=True),
}


# LayerScale is 0.5, not timm's 1e-5: with 1e-5 the blocks barely change the tokens and a wrong position or a
# leaked dropped patch would hide under the tolerance.


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[name]().eval()


def random_keep(batch: int, count: int, seed: int = 0) -> torch.Tensor:
    """Different index sets per image, in scrambled (not sorted) order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(GRID, generator=generator)[:count] for _ in range(batch)])


def attention_masked_reference(backbone, images, keep):
    """Full sequence through timm's forward_features, with the dropped patches hidden from every query.

    A kept token then attends to exactly the prefix tokens and the kept patches, with the same positions, so
    its output equals the output of a forward in which the other patches are absent."""
    batch, prefix = images.shape[0], backbone.num_prefix_tokens
    visible = torch.zeros(batch, prefix + GRID, dtype=torch.bool)
    visible[:, :prefix] = True
    visible[torch.arange(batch)[:, None], prefix + keep] = True
    attn_mask = visible[:, None, None, :].expand(batch, 1, prefix + GRID, prefix + GRID)
    sequence = backbone.forward_features(images, attn_mask=attn_mask)
    patches = sequence[:, prefix:].gather(1, keep[..., None].expand(-1, -1, sequence.shape[-1]))
    return sequence[:, :prefix], patches


def explicit_vit_reference(backbone, images, keep):
    """A second VisionTransformer forward: patch embeddings + their position embedding, gathered by hand."""
    batch, prefix = images.shape[0], backbone.num_prefix_tokens
    embeddings = backbone.patch_embed(images).reshape(batch, GRID, -1)  # (B, N, D)
    prefix_tokens = [t.expand(batch, -1, -1) for t in (backbone.cls_token, backbone.reg_token) if t is not None]
    prefix_tokens = torch.cat(prefix_tokens, dim=1) if prefix_tokens else embeddings[:, :0]
    position = backbone.pos_embed  # (1, [prefix +] N, D)
    if not backbone.no_embed_class:
        prefix_tokens = prefix_tokens + position[:, :prefix]
        position = position[:, prefix:]
    patches = embeddings + position
    kept = torch.stack([patches[b, keep[b]] for b in range(batch)])  # (B, K, D)
    x = torch.cat([prefix_tokens, kept], dim=1)
    for block in backbone.blocks:
        x = block(x)
    return backbone.norm(x)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_keeping_every_patch_changes_nothing(name):
    backbone = tiny(name)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = encode(backbone, images)
        kept = encode(backbone, images, keep=torch.arange(GRID).expand(2, -1))
    for field in ("cls", "registers", "patches"):
        if getattr(plain, field) is not None:
            assert torch.equal(getattr(kept, field), getattr(plain, field)), field
    # Average pooling may differ in the last bit: timm's sequence keeps the patch embedding's NHWC strides, the
    # gathered one is contiguous, and the mean then sums in another order.
    torch.testing.assert_close(kept.pooled, plain.pooled, rtol=1e-6, atol=1e-6)
    assert plain.patches.shape == (2, GRID, backbone.num_features)
    # the slot is restored: same object, same registry, nothing new in the state dict
    assert "_KeepPatches" not in repr(backbone)
    assert isinstance(backbone.patch_drop, torch.nn.Module) or backbone.patch_drop is None


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_kept_subset_matches_a_forward_without_the_other_patches(name):
    backbone = tiny(name)
    images = torch.randn(3, 3, 32, 32)
    keep = random_keep(3, 6)
    with torch.no_grad():
        tokens = encode(backbone, images, keep=keep)
        prefix_ref, patches_ref = attention_masked_reference(backbone, images, keep)
        full = encode(backbone, images)
    prefix = backbone.num_prefix_tokens
    assert tokens.patches.shape == (3, 6, backbone.num_features)
    torch.testing.assert_close(tokens.patches, patches_ref, rtol=1e-5, atol=1e-5)
    if prefix:
        torch.testing.assert_close(tokens.registers, prefix_ref[:, int(tokens.cls is not None):prefix],
                                   rtol=1e-5, atol=1e-5)
    if tokens.cls is not None:
        torch.testing.assert_close(tokens.cls, prefix_ref[:, 0], rtol=1e-5, atol=1e-5)
    # Dropping patches does change the kept ones (they attended to the others before).
    full_kept = full.patches.gather(1, keep[..., None].expand(-1, -1, backbone.num_features))
    assert (tokens.patches - full_kept).abs().max() > 1e-2
    if isinstance(backbone, timm.models.vision_transformer.VisionTransformer):
        with torch.no_grad():
            explicit = explicit_vit_reference(backbone, images, keep)
        torch.testing.assert_close(tokens.patches, explicit[:, prefix:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit-cls-registers", "dinov3-rope"])
def test_positions_travel_with_the_patches(name):
    """The same kept set in another order gives the same tokens in that order (positions are not slot-based)."""
    backbone = tiny(name)
    images = torch.randn(2, 3, 32, 32)
    keep = random_keep(2, 5, seed=3)
    order = torch.tensor([4, 2, 0, 3, 1])
    with torch.no_grad():
        first = encode(backbone, images, keep=keep)
        second = encode(backbone, images, keep=keep[:, order])
    torch.testing.assert_close(second.patches, first.patches[:, order], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.pooled, first.pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit-cls-registers", "dinov3-rope"])
def test_gradients_reach_only_the_kept_patches_pixels(name):
    backbone = tiny(name)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    keep = torch.tensor([[0, 5, 10], [15, 1, 6]])
    encode(backbone, images, keep=keep).patches.square().sum().backward()
    per_patch = images.grad.abs().reshape(2, 3, 4, 8, 4, 8).sum(dim=(1, 3, 5)).reshape(2, GRID)  # (B, N)
    used = torch.zeros(2, GRID, dtype=torch.bool)
    used[torch.arange(2)[:, None], keep] = True
    assert (per_patch[used] > 0).all()
    assert (per_patch[~used] == 0).all()


def test_masks_apply_before_keep():
    backbone = tiny("vit-cls-registers")
    images = torch.randn(2, 3, 32, 32)
    mask_token = torch.randn(backbone.num_features)
    keep = random_keep(2, 6)
    masks = torch.zeros(2, GRID, dtype=torch.bool)
    masks[0, keep[0, :2]] = True  # two kept patches of image 0 are masked; image 1 is not masked
    with torch.no_grad():
        both = encode(backbone, images, masks, mask_token, keep=keep)
        kept_only = encode(backbone, images, keep=keep)
        swapped = images.clone()  # a masked patch's pixels are irrelevant: replace them by noise
        for index in keep[0, :2].tolist():
            row, col = divmod(index, 4)
            swapped[0, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = torch.randn(3, 8, 8)
        noisy = encode(backbone, swapped, masks, mask_token, keep=keep)
    assert torch.equal(both.patches[1], kept_only.patches[1])
    assert not torch.allclose(both.patches[0], kept_only.patches[0])
    torch.testing.assert_close(noisy.patches, both.patches, rtol=1e-5, atol=1e-6)


def test_bad_keep_is_reported():
    backbone = tiny("vit-cls-registers")
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        encode(backbone, images, keep=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="must lie in"):
        encode(backbone, images, keep=torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="3 rows for 2 images"):
        encode(backbone, images, keep=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer indices"):
        encode(backbone, images, keep=torch.zeros(2, 2))
    assert isinstance(backbone.patch_drop, torch.nn.Identity)  # restored after the failure too
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    with pytest.raises(ValueError, match="no patches to mask or keep"):
        encode(resnet, images, keep=torch.zeros(2, 2, dtype=torch.long))
