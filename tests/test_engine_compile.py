"""train.compile=true: each transformer block compiled on its own (regional compilation), tested on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from ssd.config import load_config
from ssd.engine.compile import compile_regions
from ssd.methods import build_method
from tests.test_methods_masked import DINOV2
from tests.tiny import TINY_OVERRIDES, run_training, tiny_overrides


def batch_for(method, count: int = 4) -> dict:
    generator = torch.Generator().manual_seed(1)
    samples = [{"crops": [torch.randn(3, size, size, generator=generator) for size in (32, 32, 16, 16)], "label": 0,
                "index": i, "epoch": 0} for i in range(count)]
    return method.make_collate(0)(samples)


@pytest.mark.slow
def test_a_compiled_step_equals_the_eager_one():
    """DINOv2 (masked global crops through a hook, class and patch heads, a teacher, two crop sizes): the compiled
    step gives the eager loss and gradients, and the blocks really ran compiled."""
    torch.manual_seed(0)
    cfg = load_config("dino_digits_demo", [*TINY_OVERRIDES, *DINOV2, "model.drop_path_rate=0.0",
                                           "method.mask_probability=1.0"])
    eager = build_method(cfg)
    compiled = copy.deepcopy(eager)
    assert compile_regions(compiled) == {"blocks": 4, "backbones": 0}  # student and teacher, 2 blocks each
    batch = batch_for(eager)
    schedule = {"teacher_temp": 0.04, "patch_teacher_temp": 0.05}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    for method in (eager, compiled):
        loss, _ = method(batch, schedule)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in method.named_parameters() if p.grad is not None}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    # Inductor reorders float32 sums; the low softmax temperatures (0.04 - 0.1) amplify that to a relative error
    # of a few 1e-4 per gradient tensor (measured), where a wrong graph is off by order 1.
    for name, gradient in results[0][1].items():
        error = (results[1][1][name] - gradient).norm() / gradient.norm().clamp(min=1e-12)
        assert error < 2e-3, (name, float(error))

def test_a_cnn_backbone_is_compiled_whole():
    cfg = load_config("dino_digits_demo", [*TINY_OVERRIDES, "model.arch=resnet10t", "model.timm_kwargs={}",
                                           "model.patch_size=0"])
    assert compile_regions(build_method(cfg)) == {"blocks": 0, "backbones": 2}


@pytest.mark.slow
def test_a_compiled_run_from_the_command_line(tmp_path):
    result = run_training(tiny_overrides(tmp_path, "run", "train.compile=true", "train.max_steps=2"), timeout=900)
    assert "train.compile: 4 transformer blocks compiled one by one" in result.stderr
