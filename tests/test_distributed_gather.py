"""`all_gather_with_grad` in real gloo processes: a loss over the gathered global batch (KoLeo's nearest
neighbours), with DDP's gradient average, gives exactly the single-process gradient (float64)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ssd.engine.distributed import all_gather_with_grad
from ssd.losses.koleo_loss import koleo_loss
from tests.test_loss_sinkhorn import run_gloo


def _koleo_worker(rank, inputs, weights, out_dir):
    world = dist.get_world_size()
    rows = len(inputs) // world
    trainable = weights.clone().requires_grad_(True)
    local = inputs[rank * rows:(rank + 1) * rows] @ trainable  # (B / world, D)
    gathered = all_gather_with_grad(local)
    loss = koleo_loss(gathered)
    loss.backward()
    gradient = trainable.grad.clone()
    dist.all_reduce(gradient)  # what DDP does with every parameter's gradient ...
    gradient /= world  # ... an average over ranks
    torch.save({"loss": loss.detach(), "gradient": gradient, "gathered": gathered.detach()},
               f"{out_dir}/rank{rank}.pt")


def test_loss_over_the_gathered_batch_has_the_single_process_gradient(tmp_path):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    weights = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    run_gloo(_koleo_worker, 2, tmp_path, inputs, weights, str(tmp_path))

    single = weights.clone().requires_grad_(True)
    expected_loss = koleo_loss(inputs @ single)
    expected_loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["gathered"], inputs @ weights, rtol=0, atol=1e-12)
        torch.testing.assert_close(result["loss"], expected_loss.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(result["gradient"], single.grad, rtol=0, atol=1e-12)
    assert single.grad.abs().max() > 1e-3


def test_without_a_process_group_it_is_the_identity():
    tensor = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(tensor) is tensor
