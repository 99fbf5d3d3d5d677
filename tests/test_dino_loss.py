"""DINO loss against an independent float64 reference: values, gradients, centering, bf16 finiteness."""

import math

import pytest
import torch

from ssd.losses.dino_loss import DINOLoss, dino_cross_entropy


def reference_dino_loss(student, teacher, center, n_student, n_teacher, student_temp, teacher_temp):
    """Written from the paper's Algorithm 1 with explicit loops over views and samples, in float64."""
    batch = student.shape[0] // n_student
    total, pairs = 0.0, 0
    for t in range(n_teacher):
        for s in range(n_student):
            if s == t:
                continue
            pair_loss = 0.0
            for b in range(batch):
                t_logits = (teacher[t * batch + b] - center[0]) / teacher_temp
                p_t = torch.exp(t_logits - torch.logsumexp(t_logits, 0))
                s_logits = student[s * batch + b] / student_temp
                log_p_s = s_logits - torch.logsumexp(s_logits, 0)
                pair_loss = pair_loss - (p_t * log_p_s).sum()
            total = total + pair_loss / batch
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_student,batch,dim", [(2, 3, 7), (6, 4, 16), (10, 2, 32)])
def test_loss_and_gradients_match_float64_reference(n_student, batch, dim):
    generator = torch.Generator().manual_seed(n_student * 100 + dim)
    student = torch.randn(n_student * batch, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2 * batch, dim, generator=generator, dtype=torch.float64)
    center = torch.randn(1, dim, generator=generator, dtype=torch.float64) * 0.1

    loss_module = DINOLoss(dim, student_temp=0.1, center_momentum=0.9).double()
    loss_module.center.copy_(center)
    loss, probs = loss_module(student, teacher, n_student, 2, teacher_temp=0.04)
    (grad,) = torch.autograd.grad(loss, student)

    student_ref = student.detach().clone().requires_grad_(True)
    expected = reference_dino_loss(student_ref, teacher, center, n_student, 2, 0.1, 0.04)
    (grad_ref,) = torch.autograd.grad(expected, student_ref)

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2 * batch, dtype=torch.float64))


def test_pairs_exclude_same_view_and_count_is_right():
    # With identical teacher and student distributions on matching views, a loss that (wrongly) included the
    # same-view pairs would be lower; build views where only cross-view pairs disagree.
    dim, batch = 5, 2
    sharp = torch.zeros(batch, dim)
    sharp[:, 0] = 50.0
    other = torch.zeros(batch, dim)
    other[:, 1] = 50.0
    student = torch.cat([sharp, other])  # view 0 predicts class 0, view 1 predicts class 1
    teacher_probs = torch.cat([torch.nn.functional.one_hot(torch.zeros(batch).long(), dim),
                               torch.nn.functional.one_hot(torch.ones(batch).long(), dim)]).float()
    loss = dino_cross_entropy(student, teacher_probs, 2, 2, student_temp=1.0)
    assert loss.item() == pytest.approx(50.0, rel=1e-3)  # only mismatched pairs (0,1) and (1,0) count


def test_center_is_ema_of_teacher_batch_mean():
    dim = 8
    loss_module = DINOLoss(dim, center_momentum=0.9)
    teacher = torch.randn(6, dim)
    loss_module(torch.randn(12, dim), teacher, 4, 2, teacher_temp=0.04)
    assert torch.equal(loss_module.center, torch.zeros(1, dim))  # the center moves only after the step
    loss_module.update_center()
    torch.testing.assert_close(loss_module.center, 0.1 * teacher.mean(0, keepdim=True))
    # Two micro-batches before one update act as one batch (gradient accumulation).
    other = torch.randn(4, dim)
    loss_module(torch.randn(12, dim), teacher, 4, 2, teacher_temp=0.04)
    loss_module(torch.randn(8, dim), other, 4, 2, teacher_temp=0.04)
    loss_module.update_center()
    both = torch.cat([teacher, other]).mean(0, keepdim=True)
    torch.testing.assert_close(loss_module.center, 0.09 * teacher.mean(0, keepdim=True) + 0.1 * both)


def test_bf16_inputs_give_finite_fp32_loss_and_gradients():
    torch.manual_seed(0)
    dim = 65536
    student = (torch.randn(4 * 8, dim) * 30).bfloat16().requires_grad_(True)
    teacher = (torch.randn(2 * 8, dim) * 30).bfloat16()
    loss, _ = DINOLoss(dim)(student, teacher, 4, 2, teacher_temp=0.04)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert torch.isfinite(student.grad.float()).all()


def test_loss_is_log_k_for_uniform_outputs():
    dim = 128
    loss, _ = DINOLoss(dim)(torch.zeros(10 * 3, dim), torch.zeros(2 * 3, dim), 10, 2, teacher_temp=0.04)
    assert loss.item() == pytest.approx(math.log(dim), rel=1e-6)
