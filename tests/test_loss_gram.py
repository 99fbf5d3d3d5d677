"""Gram anchoring against a float64 reference: values, gradients, detached teacher, scale invariance, bf16."""

import math

import pytest
import torch

from ssd.losses.gram_loss import gram_loss


def reference_gram_loss(student, teacher, normalize, remove_diagonal):
    """Explicit loops over images and token pairs, float64."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        s, t = student[b].double(), teacher[b].double()
        if normalize:
            s, t = s / s.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
        for i in range(s.shape[0]):
            for j in range(s.shape[0]):
                if remove_diagonal and i == j:
                    continue
                total = total + (s[i] @ s[j] - t[i] @ t[j]) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("remove_diagonal", [False, True])
def test_matches_float64_reference_values_and_gradients(normalize, remove_diagonal):
    generator = torch.Generator().manual_seed(int(normalize) * 2 + int(remove_diagonal))
    student = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    teacher = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)
    leaf, reference_leaf = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    loss = gram_loss(leaf, teacher, normalize=normalize, remove_diagonal=remove_diagonal)
    expected = reference_gram_loss(reference_leaf, teacher, normalize, remove_diagonal)
    (grad,) = torch.autograd.grad(loss, leaf)
    (grad_ref,) = torch.autograd.grad(expected, reference_leaf)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-14)


def test_teacher_never_receives_gradient():
    student = torch.randn(2, 6, 8, requires_grad=True)
    teacher = torch.randn(2, 6, 8, requires_grad=True)
    gram_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_invariant_to_per_token_rescaling_when_normalized():
    student, teacher = torch.randn(2, 7, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    scales = torch.rand(2, 7, 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(gram_loss(student * scales, teacher / scales), gram_loss(student, teacher))
    assert not torch.allclose(gram_loss(student * scales, teacher, normalize=False),
                              gram_loss(student, teacher, normalize=False))


def test_identical_features_give_zero_and_single_token_without_diagonal_is_zero():
    features = torch.randn(2, 9, 12)
    assert gram_loss(features, features.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert gram_loss(torch.randn(2, 1, 4), torch.randn(2, 1, 4), remove_diagonal=True).item() == 0.0


def test_bf16_gives_finite_fp32_loss_and_gradients():
    student = (torch.randn(4, 196, 384) * 20).bfloat16().requires_grad_(True)
    teacher = (torch.randn(4, 196, 384) * 20).bfloat16()
    loss = gram_loss(student, teacher)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert torch.isfinite(student.grad.float()).all()
