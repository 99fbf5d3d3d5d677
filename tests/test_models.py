"""Backbones from timm by name (ViT with dynamic image size, CNNs through pooled features) inside DINO."""

import pytest
import torch

from ssd.config import load_config
from ssd.methods.dino import DINO
from ssd.models.backbone import build_backbone, timm_kwargs


def dino_for(arch: str, *extra: str) -> DINO:
    cfg = load_config(None, [f"model.arch={arch}", "model.img_size=32", "head.out_dim=32", "head.hidden_dim=32",
                             "head.bottleneck_dim=16", *extra])
    return DINO(cfg)


@pytest.mark.parametrize("arch,extra,size", [
    ("vit_tiny_patch16_224", ("model.patch_size=8", "model.timm_kwargs.depth=2"), 32),
    ("vit_tiny_patch16_224", ("model.patch_size=8", "model.timm_kwargs.depth=2", "model.num_registers=4"), 32),
    ("resnet18", ("model.timm_kwargs={}",), 32),  # drop the demo recipe's ViT depth
    ("convnext_atto", ("model.timm_kwargs={}",), 64),  # total stride 32: local crops need at least 32 px
])
def test_multicrop_forward_backward_for_each_backbone(arch, extra, size):
    torch.manual_seed(0)
    method = dino_for(arch, *extra)
    calls = []
    method.student.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    crops = [torch.randn(3, 3, size, size), torch.randn(3, 3, size, size)] + [torch.randn(3, 3, size // 2, size // 2)] * 3
    loss, outputs = method({"crops": crops}, {"teacher_temp": 0.04})
    loss.backward()
    # Crops of one resolution share one forward: (2 x 3 global images) then (3 x 3 local images).
    assert [tuple(shape) for shape in calls] == [(6, 3, size, size), (9, 3, size // 2, size // 2)]
    assert outputs["teacher_probs"].shape == (6, 32)
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.student.backbone.parameters() if p.requires_grad)
    stats = method.monitor(outputs)
    assert 0 <= stats["teacher_entropy"] <= stats["log_num_prototypes"] + 1e-6


def test_vit_kwargs_and_unknown_arch():
    cfg = load_config(None, ["model.arch=vit_small_patch16_224", "model.patch_size=8", "model.num_registers=4"])
    kwargs = timm_kwargs(cfg.model)
    assert kwargs["dynamic_img_size"] and kwargs["patch_size"] == 8 and kwargs["reg_tokens"] == 4
    assert kwargs["num_classes"] == 0
    bad = load_config(None, ["model.arch=vit_smal_patch16_224"])
    with pytest.raises(ValueError, match="unknown timm architecture 'vit_smal_patch16_224'.*vit_small_patch16_224"):
        build_backbone(bad.model)
    # ibot_digits_demo's ViT-only depth=4 stays when only the architecture is changed...
    kept = load_config("ibot_digits_demo", ["model.arch=resnet18"])
    assert kept.model.timm_kwargs.depth == 4
    with pytest.raises(ValueError, match="could not build 'resnet18'.*depth.*model.timm_kwargs"):
        build_backbone(kept.model)
    replaced = load_config("ibot_digits_demo", ["model.arch=resnet18", "model.timm_kwargs={}"])  # ...unless replaced
    assert dict(replaced.model.timm_kwargs) == {}
    merged = load_config("ibot_digits_demo", ["model.timm_kwargs.qkv_bias=false"])
    assert dict(merged.model.timm_kwargs) == {"depth": 4, "qkv_bias": False}
    cnn = load_config(None, ["model.arch=resnet18", "model.num_registers=2", "model.timm_kwargs={}"])
    with pytest.raises(ValueError, match="num_registers needs a ViT"):
        build_backbone(cnn.model)
