"""Visual checks: CLS attention against timm's own (unfused) attention weights, PCA colours, labelled and
enlarged pictures from the command, and TensorBoard images during training that leave training unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from PIL import Image

from ssd.visualize import PADDING, TITLE_HEIGHT, cls_attention, log_to_tensorboard, main, pca_rgb
from tests.tiny import assert_bitwise_equal, final_weights, run_training, tiny_overrides


def tiny_vit(registers: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             depth=2, dynamic_img_size=True, reg_tokens=registers).eval()


def tiny_rope_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             depth=2, embed_dim=64, num_heads=2, num_reg_tokens=2, dynamic_img_size=True).eval()


def tensorboard_images(folder) -> dict:
    """``{tag: [(step, width, height)]}`` of the image summaries in the event files under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return {tag: [(image.step, image.width, image.height) for image in events.Images(tag)]
            for tag in events.Tags()["images"]}


@pytest.mark.parametrize("registers", [0, 2])
def test_cls_attention_matches_timm_attention_weights(registers):
    backbone = tiny_vit(registers)
    images = torch.randn(2, 3, 32, 48)  # not square: the maps must keep the patch grid's shape
    maps = cls_attention(backbone, images)
    assert maps.shape == (2, 3, 4, 6)  # (B, heads, h, w)
    assert backbone.blocks[-1].attn.fused_attn == timm.layers.use_fused_attn()  # given back as it was

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


def test_rope_vit_attention_and_pca():
    """Eva (the DINOv3 RoPE models): maps over the patch grid with the 2 registers left out, and the model's
    output unchanged by the pass."""
    backbone = tiny_rope_vit()
    images = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        before = backbone(images)
    maps = cls_attention(backbone, images)
    assert maps.shape == (2, 2, 4, 5) and torch.all(maps >= 0) and torch.all(maps.sum(dim=(2, 3)) < 1)
    assert pca_rgb(backbone, images).shape == (2, 3, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), before)


def test_pca_rgb_is_in_unit_range_and_uses_all_components():
    colours = pca_rgb(tiny_vit(), torch.randn(3, 3, 32, 32))
    assert colours.shape == (3, 3, 4, 4)
    assert colours.min() >= 0 and colours.max() <= 1
    for channel in range(3):  # each component is stretched over [0, 1] across the batch
        assert colours[:, channel].min() == pytest.approx(0, abs=1e-6)
        assert colours[:, channel].max() == pytest.approx(1, abs=1e-6)


def test_resnet_has_no_attention_but_a_feature_map_pca():
    resnet = timm.create_model("resnet10t", num_classes=0).eval()
    with pytest.raises(TypeError, match="ResNet has no attention: attention maps need a ViT"):
        cls_attention(resnet, torch.randn(1, 3, 64, 64))
    assert pca_rgb(resnet, torch.randn(2, 3, 64, 96)).shape == (2, 3, 2, 3)  # stride 32


def test_log_to_tensorboard_writes_labelled_enlarged_pictures(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    backbone = tiny_vit().train()
    writer = SummaryWriter(tmp_path)
    tags = log_to_tensorboard(writer, backbone, torch.randn(2, 3, 32, 32), step=7, mean=[0.5] * 3, std=[0.2] * 3)
    writer.close()
    assert backbone.training  # given back in the mode it was in
    assert tags == ["visual/patch_pca", "visual/cls_attention"]
    tile = 7 * 32 + PADDING  # 32 px enlarged 7 times: at least 224 px
    assert tensorboard_images(tmp_path) == {
        "visual/cls_attention": [(7, 4 * tile + PADDING, TITLE_HEIGHT + 2 * tile + PADDING)],  # image + 3 heads
        "visual/patch_pca": [(7, 2 * tile + PADDING, TITLE_HEIGHT + 2 * tile + PADDING)],
    }


def save_run(folder, model_cfg, step: int = 12) -> None:
    from ssd.engine.checkpoint import save_checkpoint
    from ssd.models.backbone import build_backbone

    state = build_backbone(model_cfg).state_dict()
    save_checkpoint(folder / f"checkpoint_{step:08d}.pt", {
        "config": {"model": dataclasses.asdict(model_cfg), "data": {"mean": [0.5] * 3, "std": [0.25] * 3},
                   "eval": {"resize_size": 32, "crop_size": 32}},
        "step": step, "epoch": 0, "method": {f"{role}.backbone.{k}": v for role in ("teacher", "student")
                                             for k, v in state.items()},
    })


def image_files(folder) -> list[str]:
    paths = []
    for number in range(2):
        paths.append(str(folder / f"image{number}.png"))
        Image.new("RGB", (40, 50), (40 * number, 100, 200)).save(paths[-1])
    return paths


def test_command_draws_at_the_runs_size_enlarged_and_labelled(tmp_path, capsys):
    from ssd.config import ModelConfig

    save_run(tmp_path / "my_run", ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8,
                                              drop_path_rate=0.0, timm_kwargs={"depth": 2}))
    written = main([str(tmp_path / "my_run"), *image_files(tmp_path), "--output", str(tmp_path / "out")])
    assert [path.name for path in written] == ["attention_my_run_teacher_step12.png", "pca_my_run_teacher_step12.png"]
    assert "resize 32 / crop 32 (as the weights record)" in capsys.readouterr().out
    attention, pca = (Image.open(path).convert("RGB") for path in written)
    # Rows of 32 px tiles enlarged 7 times (224 px) with 2 px padding, under a title band: the image and 3 heads
    # per attention row, the image and its PCA per PCA row.
    tile = 7 * 32 + PADDING
    assert attention.size == (4 * tile + PADDING, TITLE_HEIGHT + 2 * tile + PADDING)
    assert pca.size == (2 * tile + PADDING, TITLE_HEIGHT + 2 * tile + PADDING)
    # Each tile starts with its label: white text on a black box at its top-left corner.
    for column in range(4):
        corner = (PADDING + column * tile, TITLE_HEIGHT + PADDING)
        label = attention.crop((corner[0], corner[1], corner[0] + 30, corner[1] + 10))
        darkest, brightest = label.convert("L").getextrema()
        assert darkest == 0 and brightest > 200  # the text is anti-aliased: near white

    # The older --out spelling still works.
    again = main([str(tmp_path / "my_run"), *image_files(tmp_path), "--out", str(tmp_path / "old")])
    assert again[0].parent == tmp_path / "old"


def test_command_on_a_resnet_says_it_has_no_attention(tmp_path, capsys):
    from ssd.config import ModelConfig

    save_run(tmp_path / "cnn", ModelConfig(arch="resnet10t", img_size=32, drop_path_rate=0.0))
    written = main([str(tmp_path / "cnn"), *image_files(tmp_path), "--output", str(tmp_path / "out")])
    assert [path.name for path in written] == ["pca_cnn_teacher_step12.png"]
    assert "(ResNet) is not a ViT and has no attention" in capsys.readouterr().out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--output OUTPUT folder for the attention_*.png and pca_*.png pictures (default: visuals)" in text
    assert "(default: 224)" in text and "--out " not in text


def test_images_in_tensorboard_leave_training_unchanged(tmp_path):
    common = ("train.max_steps=4", "log.tensorboard=true", "eval.resize_size=32", "eval.crop_size=32")
    run_training(tiny_overrides(tmp_path, "plain", *common))
    run_training(tiny_overrides(tmp_path, "images", *common, "log.images_every_steps=3", "log.images_count=2"))
    assert_bitwise_equal(final_weights(tmp_path / "images"), final_weights(tmp_path / "plain"))
    drawn = tensorboard_images(tmp_path / "images" / "tb")
    assert {tag: [step for step, _, _ in images] for tag, images in drawn.items()} == {
        "visual/cls_attention": [3, 4], "visual/patch_pca": [3, 4]}  # every 3 steps, and the last
    assert drawn["visual/cls_attention"][0][1:] == (4 * (7 * 32 + PADDING) + PADDING,
                                                    TITLE_HEIGHT + 2 * (7 * 32 + PADDING) + PADDING)
    assert tensorboard_images(tmp_path / "plain" / "tb") == {}


def test_images_without_tensorboard_are_refused_with_the_fix():
    from ssd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="log.images_every_steps=5 draws images into TensorBoard, which "
                                         "log.tensorboard=false turns off: set log.tensorboard=true"):
        load_config(None, ["log.images_every_steps=5", "log.tensorboard=false"])
