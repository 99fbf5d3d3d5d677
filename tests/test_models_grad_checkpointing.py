"""model.grad_checkpointing: activations recomputed in the backward, the same step (drop-path draws replayed)."""

from __future__ import annotations

import pytest
import torch

from ssd.checkpoint_import import model_config
from ssd.config import ConfigError, load_config
from ssd.methods import build_method
from ssd.models.backbone import build_backbone
from tests.test_methods_masked import DINOV2
from tests.tiny import TINY_OVERRIDES


def step(*overrides: str) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    method = build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, *DINOV2, "model.drop_path_rate=0.2",
                                                           *overrides]))
    generator = torch.Generator().manual_seed(1)
    samples = [{"crops": [torch.randn(3, size, size, generator=generator) for size in (32, 32, 16, 16)], "label": 0,
                "index": i, "epoch": 0} for i in range(4)]
    batch = method.make_collate(0)(samples)
    torch.manual_seed(2)  # the drop-path draws
    loss, _ = method.train()(batch, {"teacher_temp": 0.04, "patch_teacher_temp": 0.05})
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in method.student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", ["false", "true"])
def test_a_checkpointed_step_equals_the_plain_one(packed):
    plain = step(f"model.packed_crops={packed}")
    checkpointed = step(f"model.packed_crops={packed}", "model.grad_checkpointing=true")
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=0)
    assert plain[1].keys() == checkpointed[1].keys()
    for name, gradient in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], gradient, rtol=1e-6, atol=1e-7, msg=name)


def test_the_blocks_really_recompute_and_an_unsupported_model_is_named():
    backbone = build_backbone(model_config({"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
                                            "grad_checkpointing": True, "timm_kwargs": {"depth": 2}}))
    plain = build_backbone(model_config({"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
                                         "timm_kwargs": {"depth": 2}}))
    counts = []
    for network in (plain, backbone):
        calls, saved = [], []
        first_linear = network.blocks[0].mlp.fc1.forward
        network.blocks[0].mlp.fc1.forward = lambda x, run=first_linear, calls=calls: calls.append(1) or run(x)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(1) or t, lambda t: t):
            output = network.train()(torch.randn(2, 3, 32, 32))
        output.sum().backward()
        counts.append((len(calls), len(saved)))
    assert counts[0][0] == 1 and counts[1][0] == 2  # checkpointed: the block runs again in the backward
    assert counts[1][1] < counts[0][1] / 3  # ... and keeps far fewer activations
    with pytest.raises(ConfigError, match="cspresnet50 does not support activation checkpointing"):
        build_backbone(model_config({"arch": "cspresnet50", "grad_checkpointing": True}))
