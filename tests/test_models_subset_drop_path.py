"""model.drop_path_subset: residual branches on the kept samples only (DINOv2's efficient stochastic depth)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from ssd.checkpoint_import import model_config
from ssd.config import ConfigError
from ssd.models.backbone import build_backbone
from ssd.models.subset_drop_path import SubsetDropPathBlock, SubsetDropPathEvaBlock, add_residual_on_subset

VIT = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "drop_path_rate": 0.2, "drop_path_uniform": True,
       "timm_kwargs": {"depth": 2}}
DINOV3 = {"arch": "vit_small_patch16_dinov3", "img_size": 32, "drop_path_rate": 0.2, "drop_path_uniform": True,
          "timm_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 2}}


def pair(values: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights twice: timm's per-sample DropPath, and the subset forward."""
    torch.manual_seed(0)
    plain = build_backbone(model_config(values))
    subset = build_backbone(model_config({**values, "drop_path_subset": True}))
    subset.load_state_dict(plain.state_dict())
    return plain, subset


@pytest.mark.parametrize("values, block_class", [(VIT, SubsetDropPathBlock), (DINOV3, SubsetDropPathEvaBlock)])
def test_same_weights_and_eval_output_as_timm(values, block_class):
    plain, subset = pair(values)
    assert all(type(block) is block_class for block in subset.blocks)
    assert plain.state_dict().keys() == subset.state_dict().keys()  # exports stay plain timm models
    images = torch.randn(4, 3, 32, 32)
    assert torch.equal(subset.eval()(images), plain.eval()(images))


def test_the_branches_run_on_the_kept_samples_only():
    _, subset = pair(VIT)
    batch_sizes = []
    subset.blocks[0].attn.register_forward_hook(lambda _m, inputs, _o: batch_sizes.append(inputs[0].shape[0]))
    subset.blocks[0].mlp.register_forward_hook(lambda _m, inputs, _o: batch_sizes.append(inputs[0].shape[0]))
    subset.train()(torch.randn(10, 3, 32, 32)).sum().backward()
    assert batch_sizes == [8, 8]  # 10 x (1 - 0.2)


def test_a_residual_on_a_subset_equals_the_full_one_in_expectation():
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(10, 6, generator=generator), torch.randn(6, 6, generator=generator)

    def branch(rows):
        return torch.tanh(rows @ weight)

    torch.manual_seed(1)
    draws = torch.stack([add_residual_on_subset(x, branch, 0.3) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), x + branch(x), rtol=0, atol=0.06)
    # each draw adds exactly round-down(10 x 0.7) = 7 residuals scaled by 10 / 7 and leaves 3 rows as they were
    kept = (draws - x).abs().sum(-1) > 0  # (draws, rows)
    assert (kept.sum(1) == 7).all()
    torch.testing.assert_close(draws[0][kept[0]], (x + branch(x) * 10 / 7)[kept[0]])


@pytest.mark.parametrize("values", [VIT, DINOV3])
def test_each_samples_output_has_the_per_sample_drop_paths_distribution(values):
    """B (1 - p) whole: every sample is kept with probability 1 - p and scaled by 1 / (1 - p) in both forwards, so
    over many seeded draws the mean and spread of each sample's output agree (a wrong scale or rate fails)."""
    plain, subset = pair(values)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # 5 x 0.8 = 4 kept
    with torch.no_grad():
        torch.manual_seed(3)
        ours = torch.stack([subset.train()(images) for _ in range(1500)])
        torch.manual_seed(3)
        theirs = torch.stack([plain.train()(images) for _ in range(1500)])
    scale = theirs.std(0).mean()
    assert (ours.mean(0) - theirs.mean(0)).abs().mean() < 0.1 * scale
    assert (ours.std(0) - theirs.std(0)).abs().mean() < 0.1 * scale
    wrong = copy.deepcopy(subset)
    for block in wrong.blocks:
        block.drop_path1.drop_prob = block.drop_path2.drop_prob = 0.6  # 2 of 5 kept: another distribution
    with torch.no_grad():
        torch.manual_seed(3)
        other = torch.stack([wrong.train()(images) for _ in range(1500)])
    assert (other.std(0) - theirs.std(0)).abs().mean() > 0.2 * scale


def test_training_step_gives_gradients_and_a_cnn_is_refused():
    _, subset = pair(VIT)
    subset.train()(torch.randn(6, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None for p in subset.parameters() if p.requires_grad and p.dim() > 1)
    with pytest.raises(ConfigError, match="model.drop_path_subset=false"):
        build_backbone(model_config({"arch": "resnet10t", "drop_path_subset": True}))
    assert isinstance(timm.create_model("vit_tiny_patch16_224", pretrained=False).blocks[0], timm.models.vision_transformer.Block)


@pytest.mark.slow
def test_a_run_with_subset_drop_path_resumes_bitwise_after_sigkill(tmp_path):
    """The subsets are drawn from torch's RNG, whose state every checkpoint keeps."""
    from tests.test_methods_masked import DINOV2
    from tests.tiny import assert_resume_after_sigkill_is_bitwise_equal

    assert_resume_after_sigkill_is_bitwise_equal(
        tmp_path, (*DINOV2, "model.drop_path_rate=0.3", "model.drop_path_subset=true", "train.epochs=6",
                   "data.num_workers=1"), kill_at_step=12)
