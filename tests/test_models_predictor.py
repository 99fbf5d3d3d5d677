"""The I-JEPA-style predictor: shapes, positions travelling with their tokens, several target blocks through a
flattened batch, gradients, initialisation and index checks."""

from __future__ import annotations

import math

import pytest
import torch

from ssd.models.predictor import Predictor, repeat_for_targets, sincos_2d

GRID = (4, 5)  # a non-square grid catches row/column mix-ups


def predictor(out_dim=None, dtype=torch.float64) -> Predictor:
    torch.manual_seed(0)
    return Predictor(24, GRID, predictor_dim=16, depth=2, num_heads=2, out_dim=out_dim).to(dtype).eval()


def example(batch=3, context=7, targets=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(20, generator=generator) for _ in range(batch)])  # disjoint per image
    tokens = torch.randn(batch, context, 24, generator=generator, dtype=dtype)
    return tokens, index[:, :context], index[:, context:context + targets]


def test_shapes_and_default_out_dim():
    tokens, context_index, target_index = example()
    assert predictor()(tokens, context_index, target_index).shape == (3, 4, 24)
    assert predictor(out_dim=8 * 8 * 3)(tokens, context_index, target_index).shape == (3, 4, 192)
    assert predictor()(tokens, context_index.int(), target_index[:, :1]).shape == (3, 1, 24)


def test_sincos_positions_rows_then_columns():
    table = sincos_2d(8, GRID).double()  # (20, 8): row features [sin sin cos cos], then column features
    assert table.shape == (20, 8)
    row, col = divmod(13, GRID[1])  # patch 13 of a 4 x 5 grid: row 2, column 3
    expected = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
                math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    torch.testing.assert_close(table[13], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert torch.unique(table, dim=0).shape[0] == 20  # every patch has its own position
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, GRID)


def test_permuting_context_with_its_indices_changes_nothing():
    model = predictor()
    tokens, context_index, target_index = example()
    with torch.no_grad():
        reference = model(tokens, context_index, target_index)
        order = torch.randperm(7, generator=torch.Generator().manual_seed(1))
        permuted = model(tokens[:, order], context_index[:, order], target_index)
        target_order = torch.tensor([2, 0, 3, 1])
        targets_permuted = model(tokens, context_index, target_index[:, target_order])
    torch.testing.assert_close(permuted, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(targets_permuted, reference[:, target_order], rtol=1e-10, atol=1e-12)


def test_positions_matter():
    model = predictor()
    tokens, context_index, target_index = example()
    with torch.no_grad():
        # At ViT initialisation (std 0.02) the context barely reaches the targets; larger weights make the
        # dependence on the context's positions visible above rounding.
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and parameter.dim() == 2:
                parameter.mul_(20)
        reference = model(tokens, context_index, target_index)
        moved = target_index.clone()
        moved[:, 0] = context_index[:, 0]  # the first target asks for another patch
        other_target = model(tokens, context_index, moved)
        shuffled = model(tokens, context_index.roll(1, dims=1), target_index)  # tokens at other positions
    assert (other_target[:, 0] - reference[:, 0]).abs().max() > 1e-2
    assert (shuffled - reference).abs().max() > 1e-2


def test_several_target_blocks_through_a_flattened_batch():
    """Each block predicted with the repeated context equals predicting that block alone."""
    model = predictor()
    tokens, context_index, _ = example(batch=2, context=6)
    blocks = torch.tensor([[[6, 7, 8], [10, 11, 12]], [[14, 15, 16], [17, 18, 19]]])  # (B, T, M)
    with torch.no_grad():
        flat = model(repeat_for_targets(tokens, 2), repeat_for_targets(context_index, 2), blocks.flatten(0, 1))
        for b in range(2):
            for t in range(2):
                alone = model(tokens[b:b + 1], context_index[b:b + 1], blocks[b, t][None])
                torch.testing.assert_close(flat[b * 2 + t], alone[0], rtol=1e-10, atol=1e-12)
    assert repeat_for_targets(tokens, 3).shape == (6, 6, 24)
    assert torch.equal(repeat_for_targets(tokens, 3)[3:6], tokens[1:2].expand(3, -1, -1))


def test_gradients_reach_every_parameter_and_the_context():
    model = predictor().train()
    tokens, context_index, target_index = example()
    tokens.requires_grad_(True)
    model(tokens, context_index, target_index).square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert tokens.grad.abs().sum() > 0
    assert "positions" not in model.state_dict()  # a fixed function of the grid, not trained, not saved


def test_initialisation_like_a_vit():
    model = Predictor(24, GRID, predictor_dim=64, depth=1, num_heads=4)
    assert 0.01 < model.mask_token.std() < 0.03
    assert 0.015 < model.embed.weight.std() < 0.025 and 0.015 < model.blocks[0].mlp.fc1.weight.std() < 0.025
    assert torch.equal(model.out.bias, torch.zeros_like(model.out.bias))
    assert torch.equal(model.norm.weight, torch.ones(64)) and torch.equal(model.blocks[0].norm1.bias, torch.zeros(64))


def test_bad_indices_are_reported():
    model = predictor()
    tokens, context_index, target_index = example()
    with pytest.raises(ValueError, match=r"target_index must lie in \[0, 20\)"):
        model(tokens, context_index, torch.full_like(target_index, 20))
    with pytest.raises(ValueError, match="context_index must lie in"):
        model(tokens, context_index - 1 - context_index.max(), target_index)
    with pytest.raises(ValueError, match="7 context tokens but 6 context indices"):
        model(tokens, context_index[:, :6], target_index)
    with pytest.raises(ValueError, match=r"target_index must be \(3, count\) integer"):
        model(tokens, context_index, target_index.float())
    with pytest.raises(ValueError, match=r"context_index must be \(3, count\)"):
        model(tokens, context_index[:2], target_index)
