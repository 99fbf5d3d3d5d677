"""Visual checks: CLS attention against timm's own (unfused) attention weights, PCA colours, PNG and
TensorBoard outputs."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from PIL import Image

from ssd.visualize import cls_attention, log_to_tensorboard, main, pca_rgb


def tiny_vit(registers: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             depth=2, dynamic_img_size=True, reg_tokens=registers).eval()


@pytest.mark.parametrize("registers", [0, 2])
def test_cls_attention_matches_timm_attention_weights(registers):
    backbone = tiny_vit(registers)
    images = torch.randn(2, 3, 32, 48)  # not square: the maps must keep the patch grid's shape
    maps = cls_attention(backbone, images)
    assert maps.shape == (2, 3, 4, 6)  # (B, heads, h, w)

    # Reference: timm's unfused path passes the softmax weights through attn_drop; capture them there.
    last = backbone.blocks[-1].attn
    last.fused_attn = False
    captured = []
    handle = last.attn_drop.register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        backbone(images)
    handle.remove()
    weights = captured[0]  # (B, heads, N, N)
    expected = weights[:, :, 0, 1 + registers:].reshape(2, 3, 4, 6)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)
    assert torch.all(maps.sum(dim=(2, 3)) <= 1 + 1e-5)


def test_pca_rgb_is_in_unit_range_and_uses_all_components():
    colours = pca_rgb(tiny_vit(), torch.randn(3, 3, 32, 32))
    assert colours.shape == (3, 3, 4, 4)
    assert colours.min() >= 0 and colours.max() <= 1
    for channel in range(3):  # each component is stretched over [0, 1] across the batch
        assert colours[:, channel].min() == pytest.approx(0, abs=1e-6)
        assert colours[:, channel].max() == pytest.approx(1, abs=1e-6)


def test_non_vit_is_refused_clearly():
    with pytest.raises(TypeError, match="VisionTransformer"):
        cls_attention(timm.create_model("resnet18", num_classes=0), torch.randn(1, 3, 32, 32))


def test_log_to_tensorboard_writes_both_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    backbone = tiny_vit().train()
    writer = SummaryWriter(tmp_path)
    log_to_tensorboard(writer, backbone, torch.randn(2, 3, 32, 32), step=7, mean=[0.5] * 3, std=[0.2] * 3)
    writer.close()
    assert backbone.training  # given back in the mode it was in
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["images"]) == {"visual/cls_attention", "visual/patch_pca"}
    assert events.Images("visual/cls_attention")[0].step == 7


def test_command_writes_png_grids(tmp_path):
    from ssd.config import ModelConfig
    from ssd.engine.checkpoint import save_checkpoint
    from ssd.models.backbone import build_backbone

    model_cfg = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path_rate=0.0,
                            timm_kwargs={"depth": 2})
    state = build_backbone(model_cfg).state_dict()
    save_checkpoint(tmp_path / "run" / "checkpoint_00000001.pt", {
        "config": {"model": dataclasses.asdict(model_cfg), "data": {"mean": [0.5] * 3, "std": [0.25] * 3}},
        "step": 1, "epoch": 0, "method": {f"{role}.backbone.{k}": v for role in ("teacher", "student")
                                          for k, v in state.items()},
    })
    paths = []
    for number in range(2):
        paths.append(tmp_path / f"image{number}.png")
        Image.new("RGB", (40, 50), (40 * number, 100, 200)).save(paths[-1])
    written = main([str(tmp_path / "run"), *map(str, paths), "--out", str(tmp_path / "out"), "--size", "32"])
    attention, pca = (Image.open(path) for path in written)
    # make_grid: 2 rows of 32-px tiles with 2-px padding; 1 image + 3 heads per attention row, 2 tiles per PCA row.
    assert attention.size == (4 * 34 + 2, 2 * 34 + 2)
    assert pca.size == (2 * 34 + 2, 2 * 34 + 2)
