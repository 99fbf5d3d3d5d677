"""I-JEPA and SALT's two stages (mae, then ijepa with a frozen teacher) end to end on the embedded digits: real
runs from the command line, SIGKILL resume bitwise equal, exports that timm loads with I-JEPA's pooling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from ssd.config import ConfigError, load_config
from ssd.methods import build_method
from tests.tiny import (
    REPO,
    TINY_OVERRIDES,
    assert_resume_after_sigkill_is_bitwise_equal,
    final_weights,
    run_training,
    subprocess_env,
    tiny_overrides,
)

# The tiny run of tests/tiny.py as a JEPA: 4 px patches (an 8 x 8 grid at 32 px, room for 4 target blocks and a
# context), no class token, average pooling, one crop per image, a 1-block predictor.
JEPA = ("method.name=ijepa", "model.patch_size=4", "model.timm_kwargs.class_token=false",
        "model.timm_kwargs.global_pool=avg", "model.timm_kwargs.fc_norm=false", "crops.global_number=1", "crops.local_number=0",
        "method.predictor_dim=32", "method.predictor_depth=1", "method.predictor_heads=2")
MAE = ("method.name=mae", *JEPA[1:])


def jepa_method(*overrides: str):
    torch.manual_seed(0)
    return build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, *JEPA, *overrides]))


def a_batch(method, size: int = 4) -> dict:
    torch.manual_seed(1)
    samples = [{"crops": [torch.randn(3, 32, 32)], "label": 0, "index": i, "epoch": 0} for i in range(size)]
    return method.make_collate(seed=0)(samples)


SCHEDULE = {"teacher_momentum": 0.996, "step": 0}


def test_ijepa_context_encoder_sees_only_the_context_patches():
    method = jepa_method()
    batch = a_batch(method)
    loss, outputs = method(batch, SCHEDULE)
    assert torch.isfinite(loss) and 0 < outputs["context_share"] < 1
    # Change every pixel outside image 0's context patches: its predictions cannot change (no mask tokens or other
    # patches reach the context encoder), while the teacher, which sees the whole crop, does change.
    images = batch["crops"][0]
    patch, grid = 4, 8
    outside = torch.ones(grid * grid, dtype=torch.bool)
    outside[batch["context"][0]] = False
    pixel_mask = outside.view(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)  # (32, 32)
    changed = images.clone()
    changed[0][:, pixel_mask] += 1.0

    def predictions(pictures):
        from ssd.models.predictor import repeat_for_targets
        from ssd.models.tokens import encode

        tokens = encode(method.student.backbone, pictures, keep=batch["context"]).patches
        targets = batch["targets"]
        return method.predictor(repeat_for_targets(tokens, targets.shape[1]),
                                repeat_for_targets(batch["context"], targets.shape[1]), targets.flatten(0, 1))

    with torch.no_grad():
        torch.testing.assert_close(predictions(changed)[:4], predictions(images)[:4])  # image 0's 4 target blocks
        assert not torch.allclose(method.teacher_features(changed)[0], method.teacher_features(images)[0])


def test_ijepa_gradients_reach_student_and_predictor_never_the_teacher():
    method = jepa_method()
    loss, _ = method(a_batch(method), SCHEDULE)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not any(p.requires_grad for p in method.teacher.parameters())
    assert method.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert method.predictor.mask_token.grad.abs().sum() > 0
    trainable = {id(p) for group in method.param_groups() for p in group["params"]}
    assert not trainable & {id(p) for p in method.teacher.parameters()}


def test_teacher_features_from_an_intermediate_block():
    method = jepa_method("teacher.feature_block=0")
    images = a_batch(method)["crops"][0]
    features = method.teacher_features(images)
    assert features.shape == (4, 64, 192)
    torch.testing.assert_close(features.mean(-1), torch.zeros(4, 64), atol=1e-5, rtol=0)  # layer-normed
    assert not torch.allclose(features, jepa_method().teacher_features(images))
    with pytest.raises(ConfigError, match="teacher.feature_block=5, but the teacher has 2 blocks"):
        jepa_method("teacher.feature_block=5").teacher_features(images)


def test_jepa_config_mistakes_are_named():
    with pytest.raises(ConfigError, match="crops.global_number=1 crops.local_number=0"):
        load_config("dino_digits_demo", [*TINY_OVERRIDES, "method.name=ijepa"])
    with pytest.raises(ConfigError, match="model.timm_kwargs.global_pool=avg, model.timm_kwargs.fc_norm=false"):
        jepa_method("model.timm_kwargs.global_pool=token", "model.timm_kwargs.class_token=true")
    with pytest.raises(ConfigError, match="fc_norm=false"):  # timm's default for avg: LayerNorm after pooling
        jepa_method("model.timm_kwargs.fc_norm=true")
    with pytest.raises(ConfigError, match="mae reconstructs pixels and has no teacher"):
        load_config("dino_digits_demo", [*TINY_OVERRIDES, *MAE, "teacher.kind=random"])


def test_mae_decoder_predicts_pixels_of_the_target_patches():
    torch.manual_seed(0)
    method = build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, *MAE]))
    loss, _ = method(a_batch(method), SCHEDULE)
    assert method.decoder.out.out_features == 3 * 4 * 4
    # Normalised pixels of random images: an untrained decoder is off by about their variance (1).
    assert 0.5 < float(loss.detach()) < 2.0
    loss.backward()
    assert method.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_ijepa_sigkill_then_resume_is_bitwise_equal(tmp_path):
    assert_resume_after_sigkill_is_bitwise_equal(tmp_path, (*JEPA, "train.epochs=6", "data.num_workers=1"),
                                                 kill_at_step=6)


@pytest.fixture(scope="module")
def salt_stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("salt")
    run_training(tiny_overrides(root, "stage1", *MAE, "train.max_steps=4"))
    return root / "stage1"


@pytest.mark.slow
def test_salt_stage2_from_stage1_resumes_bitwise_after_sigkill(tmp_path, salt_stage1):
    stage2 = (*JEPA, "teacher.kind=frozen", f"teacher.source={salt_stage1}", "train.epochs=6", "data.num_workers=1")
    assert_resume_after_sigkill_is_bitwise_equal(tmp_path, stage2, kill_at_step=6)
    weights = final_weights(tmp_path / "killed")
    assert not [key for key in weights if key.startswith("teacher.")]  # stage 1's encoder is not stored again


def test_salt_stage2_student_may_be_narrower_than_its_teacher(tmp_path, salt_stage1):
    narrow = ("model.timm_kwargs.embed_dim=96", "model.timm_kwargs.num_heads=3")
    run_training(tiny_overrides(tmp_path, "narrow", *JEPA, *narrow, "teacher.kind=frozen",
                                f"teacher.source={salt_stage1}", "train.max_steps=2"))
    weights = final_weights(tmp_path / "narrow")
    assert weights["student.backbone.pos_embed"].shape[-1] == 96
    assert weights["predictor.out.weight"].shape == (192, 32)  # the learned projection to the teacher's width
    assert weights["predictor.embed.weight"].shape == (32, 96)


def test_export_of_an_ijepa_run_pools_patch_tokens_in_timm(tmp_path):
    from ssd.export import main as export

    run_training(tiny_overrides(tmp_path, "run", *JEPA, "train.max_steps=2"))
    export([str(tmp_path / "run"), "--output", str(tmp_path / "export")])
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                              pretrained_cfg_overlay={"file": str(tmp_path / "export" / "model.safetensors")}).eval()
    assert model.global_pool == "avg" and model.cls_token is None
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)
        torch.testing.assert_close(model(images), tokens.mean(dim=1))  # average of the 64 patch tokens


def recipe_knn(tmp_path, recipe: str, *overrides: str, run_name: str = "demo", timeout: float = 3600) -> dict:
    """k-NN results (k=20) of a recipe run from the command line, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "ssd.train", "--config", recipe, f"output.root={tmp_path}",
                             f"output.run_name={run_name}", "log.progress_bar=false", *overrides],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / run_name / "knn.json").read_text())["results"]
    return {name: values["k=20"]["top1"] for name, values in results.items()}


@pytest.mark.slow
def test_random_teacher_recipe_beats_random_init(tmp_path):
    """benchmarks/RESULTS.md: the student of a random resnet10t teacher 93.3% against 86.4% at random init."""
    knn = recipe_knn(tmp_path, "dino_random_teacher_digits_demo")
    assert knn["trained student"] > knn["random init (same arch)"] + 3.0, knn


@pytest.mark.long
def test_ijepa_recipe_beats_random_init(tmp_path):
    """benchmarks/RESULTS.md: 63.1% against 57.2% after 60 epochs (19 minutes on 2 cores)."""
    knn = recipe_knn(tmp_path, "ijepa_digits_demo")
    assert knn["trained teacher"] > knn["random init (same arch)"] + 2.0, knn


@pytest.mark.long
def test_salt_two_stages_beat_random_init(tmp_path):
    """Stage 1 (pixel reconstruction) then stage 2 (latents of the frozen stage 1), the two commands of the README."""
    recipe_knn(tmp_path, "salt_stage1_digits_demo", run_name="salt-stage1-digits")
    knn = recipe_knn(tmp_path, "salt_stage2_digits_demo", f"teacher.source={tmp_path / 'salt-stage1-digits'}")
    assert knn["trained student"] > knn["random init (same arch)"] + 2.0, knn


def test_ijepa_on_a_rope_backbone():
    """timm's DINOv3 architectures (Eva with rotary positions): kept context patches keep their own rotations."""
    torch.manual_seed(0)
    without_vit_kwargs = [item for item in JEPA if not item.startswith("model.timm_kwargs")]
    method = build_method(load_config("dino_digits_demo", [
        *TINY_OVERRIDES, *without_vit_kwargs, "model.arch=vit_small_patch16_dinov3",
        "model.timm_kwargs={depth: 1, class_token: false, global_pool: avg, use_fc_norm: false}"]))
    assert type(method.student.backbone).__name__ == "Eva"
    loss, _ = method(a_batch(method), SCHEDULE)
    loss.backward()
    assert torch.isfinite(loss) and method.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_salt_stage2_on_two_processes(tmp_path, salt_stage1):
    """torchrun with 2 gloo processes: each rank masks its own share of the batch (block sizes are drawn per
    process batch, as in I-JEPA), gradients are averaged, and the fixed teacher is not stored."""
    result = run_training(tiny_overrides(tmp_path, "two", *JEPA, "teacher.kind=frozen", f"teacher.source={salt_stage1}",
                                         "train.max_steps=3"), nproc=2)
    assert "on 2 process(es)" in result.stderr
    weights = final_weights(tmp_path / "two")
    assert "predictor.mask_token" in weights and not [key for key in weights if key.startswith("teacher.")]
