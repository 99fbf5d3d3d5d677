"""KoLeo against a float64 reference: values, gradients, edge cases (one sample, duplicates), bf16."""

import math

import pytest
import torch

from ssd.losses.koleo_loss import KoLeoLoss, grouped_koleo_loss, koleo_loss


def reference_koleo(features, eps=1e-8):
    """Loops over samples: nearest other sample by cosine, distance ||x_i - x_j + eps||, float64."""
    x = features.double()
    x = x / x.norm(dim=1, keepdim=True).clamp(min=eps)
    total = 0.0
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        nearest = max(others, key=lambda j: float(x[i].detach() @ x[j].detach()))
        distance = (x[i] - x[nearest] + eps).norm()
        total = total - torch.log(distance + eps)
    return total / len(x)


@pytest.mark.parametrize("batch,dim", [(2, 3), (7, 16), (32, 5)])
def test_matches_float64_reference_values_and_gradients(batch, dim):
    features = torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch), dtype=torch.float64)
    leaf = features.clone().requires_grad_(True)
    loss = koleo_loss(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    reference_leaf = features.clone().requires_grad_(True)
    expected = reference_koleo(reference_leaf)
    (grad_ref,) = torch.autograd.grad(expected, reference_leaf)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)


def test_orthonormal_features_are_sqrt2_apart():
    assert koleo_loss(torch.eye(6) * 3).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-6)


def test_single_sample_gives_zero_and_backward_works():
    features = torch.randn(1, 8, requires_grad=True)
    loss = koleo_loss(features)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros(1, 8))


def test_duplicate_images_give_finite_loss_and_gradients():
    features = torch.randn(4, 8)
    features = torch.cat([features, features[:2]]).requires_grad_(True)
    loss = koleo_loss(features)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(features.grad).all()


def test_bf16_gives_finite_fp32_loss_and_gradients():
    features = (torch.randn(64, 384) * 10).bfloat16().requires_grad_(True)
    loss = koleo_loss(features)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert torch.isfinite(features.grad.float()).all()


def test_module_sums_views_separately():
    views = torch.randn(2 * 5, 7)
    expected = koleo_loss(views[:5]) + koleo_loss(views[5:])
    torch.testing.assert_close(KoLeoLoss()(views, num_views=2), expected)
    torch.testing.assert_close(KoLeoLoss()(views), koleo_loss(views))


def test_grouped_koleo_is_the_mean_over_groups_of_the_reference():
    """method.koleo_group_size: DINOv2/DINOv3 compute KoLeo on each GPU's share; the mean over the shares is what
    their gradient average optimises."""
    features = torch.randn(12, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.stack([reference_koleo(group) for group in features.split(4)]).mean()
    torch.testing.assert_close(grouped_koleo_loss(features, 4), expected, rtol=1e-12, atol=1e-12)
    whole = koleo_loss(features)
    assert abs(grouped_koleo_loss(features, 4).item() - whole.item()) > 0.05  # fewer, farther neighbours
    for one_group in (0, 12, 20):
        torch.testing.assert_close(grouped_koleo_loss(features, one_group), whole)
    with pytest.raises(ValueError, match="groups of 5 do not divide a batch of 12"):
        grouped_koleo_loss(features, 5)
