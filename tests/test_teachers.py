"""teacher.kind=ema|frozen|random: frozen and random teachers never train, are not stored again in checkpoints,
are rebuilt identically, and a resumed run refuses a teacher that changed. Real runs from the command line."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from ssd.config import ConfigError, load_config
from ssd.engine.checkpoint import find_latest_checkpoint, load_checkpoint
from ssd.methods import build_method
from ssd.teachers import weights_sha256
from tests.tiny import REPO, TINY_OVERRIDES, final_weights, run_training, subprocess_env, tiny_overrides, train_command


def method_for(*overrides: str):
    torch.manual_seed(0)  # as a run seeds before building its method
    return build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, *overrides]))


def test_random_teacher_is_the_same_for_the_same_seed_and_differs_for_another():
    first = method_for("teacher.kind=random", "teacher.seed=3")
    again = method_for("teacher.kind=random", "teacher.seed=3")
    other = method_for("teacher.kind=random", "teacher.seed=4")
    assert weights_sha256(first.teacher) == weights_sha256(again.teacher) != weights_sha256(other.teacher)
    assert not any(p.requires_grad for p in first.teacher.parameters())
    # The student's own init does not depend on the teacher's seed (the teacher is drawn from a forked RNG).
    assert weights_sha256(first.student) == weights_sha256(other.student)


@pytest.mark.parametrize("how", ["copy", "perturb", "interpolate"])
def test_student_starts_from_the_random_teacher_as_asked(how):
    independent = method_for("teacher.kind=random", "teacher.seed=3")
    method = method_for("teacher.kind=random", "teacher.seed=3", f"teacher.student_init={how}",
                        "teacher.student_init_scale=0.2")
    name = "backbone.blocks.0.attn.qkv.weight"
    teacher, own = independent.teacher.state_dict()[name], independent.student.state_dict()[name]
    expected = {"copy": teacher, "perturb": teacher + 0.2 * own,
                "interpolate": (1 - 0.2**2) ** 0.5 * teacher + 0.2 * own}[how]
    torch.testing.assert_close(method.student.state_dict()[name], expected)


def test_teacher_config_mistakes_are_named():
    with pytest.raises(ConfigError, match="teacher.kind=frozen needs teacher.source"):
        load_config("dino_digits_demo", ["teacher.kind=frozen"])
    with pytest.raises(ConfigError, match="teacher.source is read by teacher.kind=frozen only"):
        load_config("dino_digits_demo", ["teacher.source=/x.pt"])
    with pytest.raises(ConfigError, match="teacher.student_init=copy is for random teachers"):
        load_config("dino_digits_demo", ["teacher.student_init=copy"])
    with pytest.raises(ConfigError, match="expected one of ema, frozen, random"):
        load_config("dino_digits_demo", ["teacher.kind=moving"])
    with pytest.raises(ConfigError, match="teacher.feature_block picks the features that method.name=ijepa"):
        load_config("dino_digits_demo", ["teacher.feature_block=2"])
    with pytest.raises(ConfigError, match="does not exist|not found"):
        method_for("teacher.kind=frozen", "teacher.source=/nonexistent/weights.pt")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A tiny DINO run whose teacher (backbone and head) becomes the frozen teacher of the tests below."""
    root = tmp_path_factory.mktemp("source")
    run_training(tiny_overrides(root, "source", "train.max_steps=3"))
    return root / "source"


def test_frozen_teacher_never_trains_and_is_not_stored_again(tmp_path, source_run):
    source_file = find_latest_checkpoint(source_run)
    run_training(tiny_overrides(tmp_path, "run", "teacher.kind=frozen", f"teacher.source={source_file}",
                                "train.max_steps=4"))
    state = load_checkpoint(find_latest_checkpoint(tmp_path / "run"))
    source = load_checkpoint(source_file)["method"]
    assert not [key for key in state["method"] if key.startswith("teacher.")], "teacher weights stored again"
    origin = state["method"]["teacher_origin._extra_state"]
    assert origin["kind"] == "frozen" and origin["file"] == str(source_file.resolve()) and len(origin["file_sha256"]) == 64
    # No optimizer state beyond the student's parameters.
    method = method_for("teacher.kind=frozen", f"teacher.source={source_file}")
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert all(not name.startswith("teacher.") for name, p in method.named_parameters() if p.requires_grad)
    assert len(state["optimizer"]["state"]) <= len(trainable)
    # The teacher built for the run holds the source's teacher backbone and head, untouched by training.
    method.load_state_dict(state["method"])
    for name, value in method.teacher.state_dict().items():
        assert torch.equal(value, source[f"teacher.{name}"]), name
    # The student trained: evaluation and export read it.
    assert state["eval_backbone"] == "student"
    assert not torch.equal(state["method"]["student.backbone.blocks.0.attn.qkv.weight"],
                           source["student.backbone.blocks.0.attn.qkv.weight"])


def test_resume_refuses_a_teacher_file_that_changed(tmp_path, source_run):
    teacher_file = tmp_path / "teacher.pt"
    shutil.copy(find_latest_checkpoint(source_run), teacher_file)
    overrides = tiny_overrides(tmp_path, "run", "teacher.kind=frozen", f"teacher.source={teacher_file}",
                               "train.max_steps=3")
    run_training(overrides)
    content = torch.load(teacher_file, weights_only=True)
    content["method"]["teacher.backbone.blocks.0.attn.qkv.weight"] += 1.0  # someone retrained or replaced it
    torch.save(content, teacher_file)
    resumed = subprocess.run(train_command([*overrides, "train.max_steps=5"]), cwd=REPO, env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert "the frozen teacher changed since this run started" in resumed.stderr
    assert str(teacher_file) in resumed.stderr and "Traceback" not in resumed.stderr


def test_random_teacher_run_resumes_and_evaluates_the_student(tmp_path):
    overrides = tiny_overrides(tmp_path, "run", "teacher.kind=random", "teacher.seed=5", "train.max_steps=3")
    run_training(overrides)
    run_training([*overrides, "train.max_steps=4", "train.allow_changes=true"])
    weights = final_weights(tmp_path / "run")
    assert not [key for key in weights if key.startswith("teacher.")]
    from ssd.export import main as export

    export([str(tmp_path / "run"), "--output", str(tmp_path / "export")])
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], weights["student.backbone.blocks.0.attn.qkv.weight"])


def test_frozen_teacher_of_another_architecture_from_a_timm_weights_file(tmp_path):
    """A ResNet teacher (512 wide) for a ViT-tiny student (192 wide): each has its own DINO head onto the same
    prototypes; the teacher's weights come from a plain timm state dict."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(7)
    resnet = timm.create_model("resnet10t", num_classes=0)
    save_file(resnet.state_dict(), tmp_path / "resnet10t.safetensors")
    method = method_for("teacher.kind=frozen", f"teacher.source={tmp_path / 'resnet10t.safetensors'}",
                        "teacher.arch=resnet10t")
    for name, value in resnet.state_dict().items():
        assert torch.equal(method.teacher.backbone.state_dict()[name], value), name
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    loss, _ = method.train()({"crops": crops}, {"teacher_temp": 0.04, "teacher_momentum": 0.996})
    loss.backward()
    assert method.teacher.head.mlp[0].in_features == 512 and method.student.head.mlp[0].in_features == 192
    assert all(p.grad is None for p in method.teacher.parameters())
    assert not method.teacher.training  # BatchNorm of a frozen ResNet keeps its running statistics


def test_frozen_teacher_from_an_official_dinov2_checkpoint(tmp_path):
    """DINOv2's teacher_checkpoint.pth layout (registers, LayerScale) as the frozen teacher of a DINO student: the
    teacher computes what timm's own DINOv2 conversion of the same weights computes."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from tests.test_export import dinov2_backbone, official_dinov2_state

    official = official_dinov2_state()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}}, tmp_path / "teacher_checkpoint.pth")
    method = method_for("teacher.kind=frozen", f"teacher.source={tmp_path / 'teacher_checkpoint.pth'}",
                        "teacher.arch=vit_tiny_patch16_224",
                        "teacher.timm_kwargs={depth: 2, init_values: 1.0e-5, reg_tokens: 2, no_embed_class: true}")
    reference = dinov2_backbone(no_embed_class=True)
    reference.load_state_dict(checkpoint_filter_fn(dict(official), reference))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(method.teacher.backbone(images), reference(images), rtol=1e-5, atol=1e-5)
    assert len(method.teacher_origin.record["file_sha256"]) == 64


def test_dinov3_with_a_random_teacher_stores_neither_teacher_nor_gram_snapshot():
    """DINOv3's Gram teacher is a snapshot of the teacher: with a fixed teacher it is that teacher, not stored either;
    a state dict round trip leaves both as built."""
    from tests.test_method_dinov3 import DINOV3

    method = method_for(*DINOV3, "teacher.kind=random", "teacher.seed=2")
    state = method.state_dict()
    assert not [key for key in state if key.startswith(("teacher.", "gram_teacher."))]
    assert state["teacher_origin._extra_state"]["kind"] == "random"
    built = {name: value.clone() for name, value in method.gram_teacher.state_dict().items()}
    method.load_state_dict(state)
    for name, value in method.gram_teacher.state_dict().items():
        assert torch.equal(value, built[name]), name
    torch.manual_seed(0)
    other_seed = method_for(*DINOV3, "teacher.kind=random", "teacher.seed=3")
    with pytest.raises(ConfigError, match="random teacher .* no longer comes out the same"):
        other_seed.load_state_dict(state)
