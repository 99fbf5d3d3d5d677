"""The elastic ViT (POA's sub-networks of a timm VisionTransformer): the intact forward at full size, a real timm
ViT of each smaller size, and an independent float64 reference written from POA's dynamic layers."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from ssd.models.elastic_vit import ElasticViT, kept_blocks, slice_vit_weights, subnet_timm_kwargs

ARCH = "vit_tiny_patch16_224"
# 6 heads of 32 channels, so that widths 96 and 160 are whole heads; registers and LayerScale included.
KWARGS = {"num_classes": 0, "img_size": 32, "patch_size": 8, "dynamic_img_size": True, "depth": 4, "num_heads": 6,
          "reg_tokens": 2, "init_values": 0.5, "drop_path_rate": 0.0}


def intact_vit(**changes) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    kwargs = {**KWARGS, **changes}
    return timm.create_model(ARCH, **kwargs).eval(), kwargs


def test_kept_blocks_are_evenly_spaced_from_first_to_last():
    assert kept_blocks(4, 4) == [0, 1, 2, 3]
    assert kept_blocks(4, 2) == [0, 3]
    assert kept_blocks(4, 3) == [0, 1, 3]
    assert kept_blocks(12, 6) == [0, 2, 4, 6, 8, 11]
    assert kept_blocks(24, 1) == [0]


def test_full_size_is_exactly_the_timm_forward():
    vit, kwargs = intact_vit()
    elastic = ElasticViT(vit, ARCH, kwargs)
    for size in (32, 16):  # the position embedding is interpolated for the smaller (local) crops
        images = torch.randn(3, 3, size, size)
        with torch.no_grad():
            assert torch.equal(elastic(images, 192, 4), vit(images))


@pytest.mark.parametrize("width,depth", [(96, 2), (96, 4), (160, 3), (192, 2), (32, 1)])
def test_a_sub_network_is_a_timm_vit_of_that_size_with_the_sliced_weights(width, depth):
    vit, kwargs = intact_vit()
    elastic = ElasticViT(vit, ARCH, kwargs)
    subnet = timm.create_model(ARCH, **subnet_timm_kwargs(kwargs, width, depth, head_dim=32)).eval()
    subnet.load_state_dict(slice_vit_weights(vit.state_dict(), width, depth), strict=True)
    assert subnet.embed_dim == width and len(subnet.blocks) == depth and subnet.blocks[0].attn.num_heads == width // 32
    for size in (32, 16):
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            features = elastic(images, width, depth)
            assert features.shape == (2, width)
            assert torch.equal(features, subnet(images))


def poa_reference(vit, images: torch.Tensor, width: int, blocks: list[int]) -> torch.Tensor:
    """POA's dynamic ViT written out in float64 from its description: the first `width` channels of every
    embedding, LayerNorm and LayerScale, the first heads (fixed head dimension 32), the first width/D of each MLP,
    and each linear layer's cut input scaled by D / width. No registers, at the position-embedding grid size."""
    full = vit.embed_dim
    scale = full / width
    p = {name: value.double() for name, value in vit.state_dict().items()}
    tokens = F.conv2d(images, p["patch_embed.proj.weight"][:width], p["patch_embed.proj.bias"][:width], stride=8)
    x = torch.cat([p["cls_token"][..., :width].expand(len(images), -1, -1), tokens.flatten(2).transpose(1, 2)], dim=1)
    x = x + p["pos_embed"][..., :width]

    def norm(values, name):
        return F.layer_norm(values, (width,), p[f"{name}.weight"][:width], p[f"{name}.bias"][:width], eps=1e-6)

    heads, hidden = width // 32, p["blocks.0.mlp.fc1.weight"].shape[0] * width // full
    rows = torch.cat([torch.arange(width) + k * full for k in range(3)])  # the first `width` rows of q, k and v
    for i in blocks:
        b = f"blocks.{i}."
        qkv = F.linear(norm(x, b + "norm1") * scale, p[b + "attn.qkv.weight"][rows, :width], p[b + "attn.qkv.bias"][rows])
        q, k, v = qkv.unflatten(-1, (3, heads, 32)).permute(2, 0, 3, 1, 4)  # each (B, heads, T, 32)
        attended = ((q @ k.transpose(-1, -2)) / 32**0.5).softmax(-1) @ v
        attended = attended.transpose(1, 2).flatten(2)  # (B, T, width)
        out = F.linear(attended * scale, p[b + "attn.proj.weight"][:width, :width], p[b + "attn.proj.bias"][:width])
        x = x + p[b + "ls1.gamma"][:width] * out
        h = F.gelu(F.linear(norm(x, b + "norm2") * scale, p[b + "mlp.fc1.weight"][:hidden, :width],
                            p[b + "mlp.fc1.bias"][:hidden]))
        out = F.linear(h * scale, p[b + "mlp.fc2.weight"][:width, :hidden], p[b + "mlp.fc2.bias"][:width])
        x = x + p[b + "ls2.gamma"][:width] * out
    return norm(x, "norm")[:, 0]


@pytest.mark.parametrize("width,depth,blocks", [(96, 2, [0, 3]), (160, 3, [0, 1, 3]), (192, 4, [0, 1, 2, 3])])
def test_sub_networks_follow_poa_dynamic_layers_in_float64(width, depth, blocks):
    vit, kwargs = intact_vit(reg_tokens=0)
    vit = vit.double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        features = ElasticViT(vit, ARCH, kwargs)(images, width, depth)
        torch.testing.assert_close(features, poa_reference(vit, images, width, blocks), rtol=1e-10, atol=1e-10)


def test_gradients_reach_only_the_sub_network_slices_of_the_shared_weights():
    vit, kwargs = intact_vit()
    ElasticViT(vit, ARCH, kwargs.copy())(torch.randn(2, 3, 32, 32), 96, 2).square().sum().backward()
    qkv = vit.blocks[0].attn.qkv.weight.grad.unflatten(0, (3, 192))  # (q/k/v, out, in)
    assert qkv[:, :96, :96].abs().min() > 0 and qkv[:, 96:].abs().max() == 0 and qkv[:, :, 96:].abs().max() == 0
    fc1 = vit.blocks[3].mlp.fc1.weight.grad  # block 3, the last, is kept at depth 2
    assert fc1[:384, :96].abs().sum() > 0 and fc1[384:].abs().max() == 0
    assert all(p.grad is None for p in vit.blocks[1].parameters())  # blocks 1 and 2 are skipped
    assert vit.pos_embed.grad[..., 96:].abs().max() == 0 and vit.reg_token.grad[..., :96].abs().sum() > 0


def test_sizes_that_cannot_be_cut_are_explained():
    vit, kwargs = intact_vit()
    elastic = ElasticViT(vit, ARCH, kwargs)
    assert "multiple of the head dimension 32" in elastic.width_problem(100)
    assert "1..192" in elastic.width_problem(224)
    assert "1..4" in elastic.depth_problem(5)
    with pytest.raises(ValueError, match="no sub-network of width 100"):
        elastic(torch.randn(1, 3, 32, 32), 100, 2)
    with pytest.raises(ValueError, match="needs a timm VisionTransformer"):
        ElasticViT(timm.create_model("resnet10t", num_classes=0), "resnet10t", {})
    pooled_by_attention, pooled_kwargs = intact_vit(global_pool="map")
    with pytest.raises(ValueError, match="global_pool=map"):
        ElasticViT(pooled_by_attention, ARCH, pooled_kwargs)
