"""Export to timm (safetensors + config.json) and import of ssd, DINO and DINOv2 checkpoint layouts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re

import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from ssd.checkpoint_import import WeightsError, load_backbone_for_eval, load_backbone_weights
from ssd.config import ModelConfig
from ssd.engine.checkpoint import save_checkpoint
from ssd.export import export_backbone, load_export, main, timm_crop_pct
from ssd.models.backbone import build_backbone

TINY = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path_rate=0.1)


def backbone(seed: int, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(ModelConfig(**{**TINY, "timm_kwargs": {"depth": 2}, **changes})).eval()


def ssd_checkpoint(path, model_cfg: ModelConfig, teacher, student, evaluation: dict | None = None):
    method = {**{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()},
              **{f"student.backbone.{k}": v for k, v in student.state_dict().items()},
              "teacher.head.last_layer.weight": torch.zeros(4, 3), "center": torch.zeros(1, 4)}
    config = {"model": dataclasses.asdict(model_cfg), "data": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
              "method": {"name": "dino"}, "eval": evaluation or {}}
    return save_checkpoint(path, {"config": config, "step": 12, "epoch": 1, "method": method})


@pytest.fixture
def run_with_registers(tmp_path):
    model_cfg = ModelConfig(**TINY, num_registers=2, timm_kwargs={"depth": 2})
    teacher, student = backbone(0, num_registers=2), backbone(1, num_registers=2)
    ssd_checkpoint(tmp_path / "run" / "checkpoint_00000012.pt", model_cfg, teacher, student)
    return tmp_path / "run", teacher, student


def test_export_loads_in_timm_with_identical_features(run_with_registers, tmp_path):
    run_dir, teacher, _ = run_with_registers
    out = main([str(run_dir), "--out", str(tmp_path / "export")])
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["reg_tokens"] == 2 and config["model_args"]["patch_size"] == 8
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.4, 0.3] and config["ssd"]["which"] == "teacher"
    assert config["ssd"]["step"] == 12 and config["ssd"]["patch_size"] == 8 and config["ssd"]["num_registers"] == 2

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = teacher(images)
        via_local_dir = load_export(out).eval()(images)
        via_file = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                     pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()(images)
    assert torch.equal(via_local_dir, expected) and torch.equal(via_file, expected)


def test_student_export_and_reimport(run_with_registers, tmp_path):
    run_dir, _, student = run_with_registers
    out = export_backbone(run_dir, tmp_path / "student_export", which="student")
    reloaded, info = load_backbone_for_eval(out)  # an export records its architecture
    assert info["mean"] == [0.5, 0.4, 0.3]
    for key, value in student.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_ssd_checkpoint_loads_teacher_or_student(run_with_registers):
    run_dir, teacher, student = run_with_registers
    for which, expected in (("teacher", teacher), ("student", student)):
        model = backbone(5, num_registers=2)
        load_backbone_weights(model, run_dir, which)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items())


def test_official_dino_checkpoint_layouts(tmp_path):
    teacher, student = backbone(0), backbone(1)
    full = {  # DINO's checkpoint.pth: DDP-wrapped student, plain teacher, heads beside the backbones
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    "module.head.last_layer.weight_g": torch.ones(4, 1)},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    "head.mlp.0.weight": torch.ones(8, 192)},
        "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "dino_loss": {"center": torch.zeros(1, 4)},
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8, out_dim=4),
    }
    torch.save(full, tmp_path / "checkpoint.pth")
    torch.save(teacher.state_dict(), tmp_path / "dino_vittiny8_pretrain.pth")  # the released weights
    for file, which, expected in (("checkpoint.pth", "teacher", teacher), ("checkpoint.pth", "student", student),
                                  ("dino_vittiny8_pretrain.pth", "teacher", teacher)):
        model = backbone(7)
        load_backbone_weights(model, tmp_path / file, which)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items()), (file, which)


def test_official_ibot_checkpoint_layout(tmp_path):
    """iBOT's checkpoint.pth: the student's backbone carries the mask token (`masked_embed`) and iBOT's head has a
    second last layer for patches; the released backbone file is the teacher's state dict."""
    teacher, student = backbone(0), backbone(1)
    full = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    "module.backbone.masked_embed": torch.zeros(1, 192), "module.head.last_layer2.weight_g": torch.ones(4, 1)},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    "head.last_layer.weight_g": torch.ones(4, 1)},
        "epoch": 3, "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=8192),
    }
    torch.save(full, tmp_path / "checkpoint.pth")
    for which, expected in (("teacher", teacher), ("student", student)):
        model = backbone(7)
        load_backbone_weights(model, tmp_path / "checkpoint.pth", which)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items()), which


def official_dinov2_state(depth=2, dim=192, grid=4, patch=8, registers=2, seed=0) -> dict:
    """A state dict with DINOv2's key names and shapes (dinov2/models/vision_transformer.py), random values."""
    generator = torch.Generator().manual_seed(seed)
    def rand(*shape):
        return 0.02 * torch.randn(*shape, generator=generator)
    state = {"cls_token": rand(1, 1, dim), "pos_embed": rand(1, 1 + grid * grid, dim), "mask_token": rand(1, dim),
             "register_tokens": rand(1, registers, dim), "patch_embed.proj.weight": rand(dim, 3, patch, patch),
             "patch_embed.proj.bias": rand(dim), "norm.weight": 1 + rand(dim), "norm.bias": rand(dim)}
    for i in range(depth):
        for name, shape in (("norm1.weight", (dim,)), ("norm1.bias", (dim,)), ("attn.qkv.weight", (3 * dim, dim)),
                            ("attn.qkv.bias", (3 * dim,)), ("attn.proj.weight", (dim, dim)),
                            ("attn.proj.bias", (dim,)), ("ls1.gamma", (dim,)), ("norm2.weight", (dim,)),
                            ("norm2.bias", (dim,)), ("mlp.fc1.weight", (4 * dim, dim)), ("mlp.fc1.bias", (4 * dim,)),
                            ("mlp.fc2.weight", (dim, 4 * dim)), ("mlp.fc2.bias", (dim,)), ("ls2.gamma", (dim,))):
            state[f"blocks.{i}.{name}"] = rand(*shape) + (1 if name.endswith("norm1.weight") else 0)
    return state


def in_block_chunks(key: str, blocks_per_chunk: int = 1) -> str:
    """DINOv2 training keys: blocks.<chunk>.<global index>. (BlockChunk pads earlier slots with Identity)."""
    return re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // blocks_per_chunk}.{m.group(1)}.", key)


def dinov2_backbone(no_embed_class: bool, img_size: int = 32):
    kwargs = {"depth": 2, "init_values": 1e-5, "no_embed_class": no_embed_class}
    return backbone(3, num_registers=2, img_size=img_size, timm_kwargs=kwargs)


@pytest.mark.parametrize("official_grid", [4, 6])  # 6: trained at another resolution, position grid resampled
def test_official_dinov2_with_registers_matches_timm_conversion(tmp_path, official_grid):
    official = official_dinov2_state(grid=official_grid)
    chunked = {"model": {**{f"teacher.backbone.{in_block_chunks(k)}": v for k, v in official.items()},
                         "teacher.dino_head.mlp.0.weight": torch.zeros(3, 3)}, "iteration": 10}
    torch.save(official, tmp_path / "dinov2_vitt8_reg2_pretrain.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}}, tmp_path / "teacher_checkpoint.pth")
    torch.save(chunked, tmp_path / "model_0000009.rank_0.pth")  # BlockChunk keys: blocks.<chunk>.<index>

    # Reference: timm's own DINOv2 conversion, into the no_embed_class layout timm uses for DINOv2 + registers.
    reference = dinov2_backbone(no_embed_class=True)
    reference.load_state_dict(checkpoint_filter_fn(dict(official), reference))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(images)
    for file in ("dinov2_vitt8_reg2_pretrain.pth", "teacher_checkpoint.pth", "model_0000009.rank_0.pth"):
        for no_embed_class in (True, False):  # ssd's default ViT layout gives registers (zero) positions
            model = dinov2_backbone(no_embed_class)
            load_backbone_weights(model, tmp_path / file)
            with torch.no_grad():
                torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_mismatched_weights_name_keys_and_hint(tmp_path):
    torch.save(official_dinov2_state(registers=2), tmp_path / "dinov2.pth")
    with pytest.raises(WeightsError) as error:  # no LayerScale and no registers in the model
        load_backbone_weights(backbone(0), tmp_path / "dinov2.pth")
    message = str(error.value)
    assert "unexpected" in message and "blocks.0.ls1.gamma" in message and "reg_token" in message
    assert "init_values" in message and "num_registers" in message


def test_official_file_needs_an_architecture(tmp_path):
    torch.save(backbone(0).state_dict(), tmp_path / "dino.pth")
    with pytest.raises(WeightsError, match="--arch"):
        load_backbone_for_eval(tmp_path / "dino.pth")
    model, info = load_backbone_for_eval(tmp_path / "dino.pth", model_values={**TINY, "timm_kwargs": {"depth": 2}})
    assert info["model"]["arch"] == TINY["arch"]


class _Payload:
    """Unpickling this would create a file: a stand-in for any code a malicious checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1)}, "evil": _Payload(str(marker))},
               tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refusing to load .*evil.pth.*arbitrary code"):
        load_backbone_weights(backbone(0), tmp_path / "evil.pth")
    assert not marker.exists()


def test_official_dinov3_layout_loads_into_the_timm_rope_model(tmp_path):
    """DINOv3's released layout, written here from a timm model by the inverse renaming: storage tokens,
    LayerScale gammas, a qkv bias whose key part is masked, RoPE periods and the mask token."""
    import timm

    def rope_vit(seed):
        torch.manual_seed(seed)
        return timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, img_size=32,
                                 patch_size=8, depth=2, embed_dim=64, num_heads=2, qkv_bias=True, global_pool="token")

    source = rope_vit(0)
    official = {}
    for key, value in source.state_dict().items():
        if key.endswith("q_bias"):
            v_bias = source.state_dict()[key.replace("q_bias", "v_bias")]
            official[key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
            official[key.replace("q_bias", "qkv.bias_mask")] = torch.ones(3 * len(value))
        elif not key.endswith("v_bias"):
            official[key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
                     .replace("gamma_2", "ls2.gamma")] = value
    official["rope_embed.periods"] = torch.ones(8)
    official["mask_token"] = torch.zeros(1, 64)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}}, tmp_path / "dinov3_checkpoint.pth")
    assert "storage_tokens" in official and "blocks.0.ls1.gamma" in official
    model = rope_vit(1)
    load_backbone_weights(model, tmp_path / "dinov3_checkpoint.pth", "teacher")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


# ---- the export describes ssd's own evaluation, and one timm line loads any export ---------------------------
def exported_run(tmp_path, model_cfg: ModelConfig, evaluation: dict | None = None):
    """``(run folder, export folder)`` of a one-checkpoint run of ``model_cfg`` (teacher and student differ)."""
    teachers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        teachers.append(build_backbone(model_cfg).eval())
    run_dir = tmp_path / "run"
    ssd_checkpoint(run_dir / "checkpoint_00000012.pt", model_cfg, *teachers, evaluation)
    return run_dir, export_backbone(run_dir, tmp_path / "export")


def load_as_readme_says(export_dir):
    """The README's lines, word for word: the model and the transform timm builds from the export alone."""
    model = timm.create_model(f"local-dir:{export_dir}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    return model, transform


def photo_files(folder) -> list:
    """Non-square photos-like files (smooth gradients and noise), PNG and JPEG, wider and taller than square."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    files = []
    for number, (width, height, suffix) in enumerate([(61, 45, "png"), (38, 70, "jpg"), (300, 260, "png")]):
        ramp = torch.linspace(0, 1, width).view(1, 1, width) * torch.linspace(0.3, 1, height).view(1, height, 1)
        pixels = (0.7 * ramp + 0.3 * torch.rand(3, height, width, generator=generator)).clamp(0, 1)
        files.append(folder / f"photo{number}.{suffix}")
        Image.fromarray((pixels.permute(1, 2, 0) * 255).byte().numpy()).save(files[-1])
    return files


def ssd_evaluation(run_dir, files):
    """What ssd's protocols compute for ``files``: sizes resolved from the run, eval_transform, pooled features."""
    from eval_protocols.common import resolve_sizes
    from eval_protocols.features import backbone_outputs
    from ssd.data import eval_transform, load_rgb

    model, info = load_backbone_for_eval(run_dir)
    args = argparse.Namespace(resize=None, crop=None, which="teacher")
    resolve_sizes(args, info)
    transform = eval_transform(args.resize, args.crop, info["mean"], info["std"])
    pixels = [transform(load_rgb(file)) for file in files]
    with torch.no_grad():
        features = [backbone_outputs(model.eval(), image[None], "pooled")["pooled"] for image in pixels]
    return pixels, features


# (53, 40): crop / resize makes timm resize to 52, one pixel short, unless the crop fraction is nudged.
@pytest.mark.parametrize("resize, crop", [(32, 32), (256, 224), (53, 40)])
def test_timm_transform_and_features_equal_ssd_evaluation(tmp_path, resize, crop):
    model_cfg = ModelConfig(**TINY, num_registers=1, timm_kwargs={"depth": 2})
    run_dir, export_dir = exported_run(tmp_path, model_cfg, {"resize_size": resize, "crop_size": crop})
    pretrained = json.loads((export_dir / "config.json").read_text())["pretrained_cfg"]
    assert pretrained["input_size"] == [3, crop, crop] and pretrained["interpolation"] == "bicubic"
    assert pretrained["crop_mode"] == "center" and pretrained["mean"] == [0.5, 0.4, 0.3]

    files = photo_files(tmp_path)
    expected_pixels, expected_features = ssd_evaluation(run_dir, files)
    model, transform = load_as_readme_says(export_dir)
    from PIL import Image

    for file, ssd_pixels, ssd_features in zip(files, expected_pixels, expected_features):
        with Image.open(file) as image:
            pixels = transform(image.convert("RGB"))
        assert pixels.shape == (3, crop, crop)
        torch.testing.assert_close(pixels, ssd_pixels, rtol=0, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(model(pixels[None]), ssd_features, rtol=1e-5, atol=1e-5)


def test_crop_fraction_gives_timm_the_exact_resize():
    import math

    for resize in range(1, 700, 3):
        for crop in range(1, resize + 1, 5):
            assert math.floor(crop / timm_crop_pct(resize, crop)) == resize, (resize, crop)
    assert timm_crop_pct(256, 224) == 0.875 and timm_crop_pct(32, 32) == 1.0


@pytest.mark.parametrize("model_cfg", [
    ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, num_registers=2, timm_kwargs={"depth": 2}),
    ModelConfig(arch="vit_small_patch16_dinov3", img_size=32, patch_size=8, num_registers=2,
                timm_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2}),
    ModelConfig(arch="resnet10t", img_size=32),
], ids=["vit-patch8-32px-registers", "eva-rope-dinov3", "resnet"])
def test_readme_lines_load_any_export(tmp_path, model_cfg):
    run_dir, export_dir = exported_run(tmp_path, model_cfg, {"resize_size": 36, "crop_size": 32})
    model, transform = load_as_readme_says(export_dir)
    teacher, _ = load_backbone_for_eval(run_dir)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), teacher.eval()(images), rtol=0, atol=0)
    # The longer form, for code that reads config.json itself, builds the same model and transform.
    config = json.loads((export_dir / "config.json").read_text())
    overlay = dict(config["pretrained_cfg"], file=str(export_dir / "model.safetensors"))
    explicit = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                 **config["model_args"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(explicit(images), model(images), rtol=0, atol=0)
    assert timm.data.resolve_data_config({}, model=explicit) == timm.data.resolve_data_config({}, model=model)
