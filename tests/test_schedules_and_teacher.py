"""Schedules (lr, weight decay, momentum, teacher temperature), the EMA teacher and the DINO head."""

import math

import pytest
import torch

from ssd.config import load_config
from ssd.engine.optim import clip_gradients, parameter_groups
from ssd.engine.schedules import TrainingSchedule, cosine, linear_warmup_constant, warmup_cosine
from ssd.models.dino_head import DINOHead
from ssd.teachers import ema_update, frozen_copy


def test_warmup_cosine_lr():
    peak, end, warmup, total = 1.0, 0.01, 10, 110
    assert warmup_cosine(0, total, warmup, peak, end) == 0.0
    assert warmup_cosine(5, total, warmup, peak, end) == pytest.approx(0.5)
    assert warmup_cosine(10, total, warmup, peak, end) == pytest.approx(peak)
    assert warmup_cosine(60, total, warmup, peak, end) == pytest.approx((peak + end) / 2)
    assert warmup_cosine(110, total, warmup, peak, end) == pytest.approx(end)
    values = [warmup_cosine(s, total, warmup, peak, end) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_and_teacher_temperature():
    assert cosine(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert linear_warmup_constant(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup_constant(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup_constant(45, 30, 0.04, 0.07) == pytest.approx(0.07)


def test_training_schedule_follows_the_dino_recipe():
    cfg = load_config("dino_vit_small16_imagenet", ["data.root=/tmp"])
    schedule = TrainingSchedule(cfg, steps_per_epoch=1251, world_batch=1024)
    assert schedule.peak_lr == pytest.approx(0.0005 * 1024 / 256)
    first, last = schedule(0), schedule(schedule.total_steps)
    assert first["lr"] == 0.0 and first["freeze_last_layer"] and not schedule(1251)["freeze_last_layer"]
    assert schedule(10 * 1251)["lr"] == pytest.approx(0.002)
    assert first["weight_decay"] == pytest.approx(0.04) and last["weight_decay"] == pytest.approx(0.4)
    assert first["teacher_momentum"] == pytest.approx(0.996) and last["teacher_momentum"] == pytest.approx(1.0)
    assert last["lr"] == pytest.approx(1e-6)


def test_ema_teacher_update_and_no_gradients():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    teacher = frozen_copy(student)
    before = [p.detach().clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(teacher, student, momentum=0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
        assert not new.requires_grad
    assert not teacher.training
    ema_update(teacher, student, momentum=1.0)  # momentum 1 (end of training) freezes the teacher
    frozen = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, teacher.parameters()))


def test_dino_teacher_stays_in_eval_mode_and_mirrors_student_keys():
    from ssd.methods.dino import DINO

    cfg = load_config(None, ["model.arch=vit_tiny_patch16_224", "model.timm_kwargs.depth=1", "head.out_dim=16"])
    method = DINO(cfg).train()
    assert method.student.training and not method.teacher.training
    assert not any(module.training for module in method.teacher.modules())
    keys = method.state_dict().keys()
    student = {k.removeprefix("student.") for k in keys if k.startswith("student.")}
    assert student == {k.removeprefix("teacher.") for k in keys if k.startswith("teacher.")}
    assert "teacher.backbone.cls_token" in keys and "loss.center" in keys


def test_dino_head_shapes_and_normalised_last_layer():
    head = DINOHead(192, out_dim=1000, hidden_dim=64, bottleneck_dim=32, nlayers=3, norm_last_layer=True)
    out = head(torch.randn(5, 192))
    assert out.shape == (5, 1000)
    weight = head.last_layer.weight  # (K, bottleneck); rows are unit vectors when g is fixed at 1
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(1000))
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert "last_layer.parametrizations.weight.original0" not in trainable
    assert DINOHead(8, out_dim=4, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_gradient_clipping(mode):
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    params[1].grad = torch.tensor([0.0, 0.0, 0.0, 0.5])  # norm 0.5
    total = clip_gradients(params, max_norm=1.0, mode=mode)
    assert total.item() == pytest.approx(math.sqrt(25.25))
    if mode == "per_param":
        assert params[0].grad.norm().item() == pytest.approx(1.0, rel=1e-4)
        assert params[1].grad.norm().item() == pytest.approx(0.5)
    else:
        total_after = math.sqrt(params[0].grad.norm() ** 2 + params[1].grad.norm() ** 2)
        assert total_after == pytest.approx(1.0, rel=1e-4)


def test_per_module_clipping_clips_backbone_and_each_head_by_its_own_norm(tmp_path):
    """optim.clip_mode=per_module, DINOv2's and DINOv3's clipping: the trainer's sets are the student's parts (the
    mask token with the backbone, as DINOv2 keeps it), and each part ends at the clip norm on its own."""
    from ssd.config import ConfigError
    from ssd.data import build_dataset
    from ssd.engine.distributed import DistInfo
    from ssd.engine.optim import clip_gradient_sets
    from ssd.engine.trainer import Trainer
    from ssd.methods import build_method
    from ssd.train import build_transform
    from tests.test_methods_masked import DINOV2
    from tests.tiny import tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path, "clip", *DINOV2, "optim.clip_mode=per_module"))
    method = build_method(cfg)
    trainer = Trainer(cfg, method, build_dataset(cfg.data, cfg.data.split), build_transform(cfg), DistInfo(),
                      tmp_path / "clip")
    names = {id(p): name for name, p in method.named_parameters()}
    parts = [sorted({".".join(names[id(p)].split(".")[:2]) for p in part}) for part in trainer.clip_sets]
    assert parts == [["student.backbone", "student.mask_token"], ["student.head"], ["student.patch_head"]]
    assert sum(map(len, trainer.clip_sets)) == len(trainer.trainable)

    for param in trainer.trainable:
        param.grad = torch.full_like(param, 10.0)
    clip_gradient_sets(trainer.clip_sets, cfg.optim.clip_grad, trainer.clip_mode)
    for part in trainer.clip_sets:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in part]))
        assert norm.item() == pytest.approx(cfg.optim.clip_grad, rel=1e-4)

    with pytest.raises(ConfigError, match="per_module clips each part of a DINO-style student"):
        load_config("ijepa_digits_demo", ["optim.clip_mode=per_module"])


def test_collapse_monitors_tell_uniform_from_one_hot_from_healthy():
    from ssd.monitors import collapse_kind, collapse_statistics

    torch.manual_seed(0)
    features = torch.randn(64, 32)
    uniform = torch.full((64, 100), 0.01)
    one_hot = torch.nn.functional.one_hot(torch.full((64,), 3), 100).float()
    healthy = torch.nn.functional.one_hot(torch.arange(64), 100).float()  # sharp, a different prototype each
    assert collapse_kind(collapse_statistics(uniform, features)) == "uniform"
    assert collapse_kind(collapse_statistics(one_hot, features)) == "one-hot"
    stats = collapse_statistics(healthy, features)
    assert collapse_kind(stats) is None
    assert stats["teacher_kl_uniform"] == pytest.approx(math.log(100) - math.log(64), abs=1e-4)
    collapsed_features = collapse_statistics(healthy, torch.ones(64, 32))["teacher_feature_std"]
    assert collapsed_features == pytest.approx(0.0, abs=1e-6) and stats["teacher_feature_std"] > 0.05
