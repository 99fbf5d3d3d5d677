"""Sinkhorn-Knopp against a float64 reference, its marginals, overflow, and real 2-process gloo equality."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssd.losses.sinkhorn import sinkhorn_knopp


def reference_sinkhorn(logits, temp, iterations):
    """SwAV's Algorithm in the (samples, prototypes) orientation, float64, no stabilising shift."""
    batch, prototypes = logits.shape
    q = torch.exp(logits.double() / temp)
    q = q / q.sum()
    for _ in range(iterations):
        q = q / (q.sum(dim=0, keepdim=True) * prototypes)  # columns here are prototypes
        q = q / (q.sum(dim=1, keepdim=True) * batch)  # rows here are samples
    return q * batch


@pytest.mark.parametrize("batch,prototypes,iterations", [(6, 4, 3), (16, 64, 3), (5, 5, 1)])
def test_matches_float64_reference(batch, prototypes, iterations):
    logits = torch.randn(batch, prototypes, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
    expected = reference_sinkhorn(logits, 0.1, iterations)
    result = sinkhorn_knopp(logits, 0.1, iterations)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sinkhorn_knopp(logits.float(), 0.1, iterations), expected.float())


def test_marginals_after_many_iterations():
    batch, prototypes = 32, 8
    logits = torch.randn(batch, prototypes, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = sinkhorn_knopp(logits * 3, 0.5, iterations=500)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.sum(dim=0), torch.full((prototypes,), batch / prototypes, dtype=torch.float64))
    # With 3 iterations every sample still sums to 1 (the last step normalises samples); prototypes do not yet.
    q3 = sinkhorn_knopp(logits.float() * 3, 0.5)
    torch.testing.assert_close(q3.sum(dim=1), torch.ones(batch), rtol=0, atol=1e-6)


def test_logits_that_overflow_fp32_exp_give_the_exact_result():
    # logits / temp up to ~500: exp overflows fp32 (> 88) but not fp64, so the unshifted reference is exact.
    logits = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)) * 5
    result = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, reference_sinkhorn(logits, 0.04, 3).float(), rtol=1e-4, atol=1e-6)


def test_bf16_gives_finite_fp32_without_gradient():
    logits = (torch.randn(8, 4096) * 10).bfloat16().requires_grad_(True)
    result = sinkhorn_knopp(logits, 0.04)
    assert result.dtype == torch.float32 and not result.requires_grad
    assert torch.isfinite(result).all()


# Real gloo processes, rendezvous through a file (no port to pick). Other loss tests reuse run_gloo.
def _gloo_entry(rank, world_size, store, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(worker, world_size, tmp_path, *args):
    """Runs worker(rank, *args) in `world_size` real gloo processes; worker must be a module-level function."""
    mp.spawn(_gloo_entry, args=(world_size, str(tmp_path / "store"), worker, args), nprocs=world_size, join=True)


def _sinkhorn_worker(rank, logits, splits, out_dir):
    for name, sizes in splits.items():
        shard = logits.split(sizes)[rank]
        torch.save(sinkhorn_knopp(shard, 0.05), f"{out_dir}/{name}_rank{rank}.pt")


def test_two_processes_with_half_the_batch_match_one_process(tmp_path):
    logits = torch.randn(8, 32, generator=torch.Generator().manual_seed(3)) * 2
    splits = {"even": [4, 4], "uneven": [3, 5]}  # uneven: masked patch tokens differ per rank
    run_gloo(_sinkhorn_worker, 2, tmp_path, logits, splits, str(tmp_path))
    expected = sinkhorn_knopp(logits, 0.05)
    for name in splits:
        rows = torch.cat([torch.load(tmp_path / f"{name}_rank{rank}.pt") for rank in range(2)])
        torch.testing.assert_close(rows, expected, rtol=0, atol=1e-6)
