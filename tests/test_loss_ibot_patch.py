"""iBOT patch loss against a float64 reference: padded and gathered forms, centre protocol, gloo, bf16."""

import math

import pytest
import torch

from ssd.losses.ibot_patch_loss import (
    IBOTPatchLoss,
    ibot_masked_cross_entropy,
    ibot_patch_cross_entropy,
    masked_token_weights,
)
from tests.test_loss_sinkhorn import run_gloo


def reference_ibot_loss(student, teacher_probs, masks, student_temp):
    """iBOT Eq. 2 with explicit loops over images and tokens, float64."""
    total = 0.0
    for b in range(student.shape[0]):
        image_loss, count = 0.0, 0
        for n in range(student.shape[1]):
            if masks[b, n]:
                s_logits = student[b, n].double() / student_temp
                log_p_s = s_logits - torch.logsumexp(s_logits, 0)
                image_loss = image_loss - (teacher_probs[b, n].double() * log_p_s).sum()
                count += 1
        total = total + (image_loss / count if count else 0.0)
    return total / student.shape[0]


def example(batch=4, tokens=9, dim=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, tokens, dim, generator=generator, dtype=torch.float64)
    teacher_logits = torch.randn(batch, tokens, dim, generator=generator, dtype=torch.float64)
    masks = torch.rand(batch, tokens, generator=generator) < 0.5
    masks[0] = False  # an image without any masked token
    masks[1, 0] = True
    return student, teacher_logits, masks


@pytest.mark.parametrize("seed", [0, 1])
def test_padded_and_gathered_match_reference_values_and_gradients(seed):
    student, teacher_logits, masks = example(seed=seed)
    teacher_probs = teacher_logits.softmax(-1)
    padded_in = student.clone().requires_grad_(True)
    padded = ibot_patch_cross_entropy(padded_in, teacher_probs, masks, 0.1)
    gathered_in = student.clone().requires_grad_(True)
    gathered = ibot_masked_cross_entropy(gathered_in[masks], teacher_probs[masks],
                                         masked_token_weights(masks, torch.float64),
                                         num_images=student.shape[0], student_temp=0.1)
    reference_in = student.clone().requires_grad_(True)
    expected = reference_ibot_loss(reference_in, teacher_probs, masks, 0.1)

    grads = [torch.autograd.grad(value, leaf)[0]
             for value, leaf in [(padded, padded_in), (gathered, gathered_in), (expected, reference_in)]]
    torch.testing.assert_close(padded, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gathered, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-10, atol=1e-14)


def test_no_masked_token_gives_zero_not_nan():
    student, teacher_logits, _ = example()
    masks = torch.zeros(student.shape[:2], dtype=torch.bool)
    assert ibot_patch_cross_entropy(student, teacher_logits.softmax(-1), masks, 0.1).item() == 0.0
    weights = masked_token_weights(masks)
    assert weights.shape == (0,)
    assert ibot_masked_cross_entropy(student[masks], student[masks], weights, 4, 0.1).item() == 0.0


def test_module_centres_teacher_and_matches_reference():
    student, teacher_logits, masks = example()
    center = torch.randn(1, 11, dtype=torch.float64) * 0.1
    module = IBOTPatchLoss(11).double()
    module.center.copy_(center)
    weights = masked_token_weights(masks, torch.float64)
    loss, probs = module(student[masks], teacher_logits[masks], weights, 4, teacher_temp=0.07)
    expected_probs = torch.softmax((teacher_logits - center) / 0.07, dim=-1)
    torch.testing.assert_close(probs, expected_probs[masks])
    torch.testing.assert_close(loss, reference_ibot_loss(student, expected_probs, masks, 0.1))


def test_center_update_accumulates_micro_batches_like_one_batch():
    module = IBOTPatchLoss(6, center_momentum=0.9)
    first, second = torch.randn(5, 6), torch.randn(3, 6)
    for tokens in (first, second):
        module(torch.randn_like(tokens), tokens, torch.ones(len(tokens)), 2, teacher_temp=0.07)
    assert torch.equal(module.center, torch.zeros(1, 6))  # only moves after the optimizer step
    module.update_center()
    torch.testing.assert_close(module.center, 0.1 * torch.cat([first, second]).mean(0, keepdim=True))
    module.update_center()  # nothing collected since: unchanged
    torch.testing.assert_close(module.center, 0.1 * torch.cat([first, second]).mean(0, keepdim=True))


def _center_worker(rank, shards, out_dir):
    module = IBOTPatchLoss(shards[0].shape[1])
    tokens = shards[rank]
    module(torch.randn_like(tokens), tokens, torch.ones(len(tokens)), 2, teacher_temp=0.07)
    module.update_center()
    torch.save(module.center, f"{out_dir}/center{rank}.pt")


def test_center_over_two_processes_equals_one_big_batch(tmp_path):
    # Different token counts per rank (masked tokens vary): the global mean, not the mean of rank means.
    shards = [torch.randn(2, 5), torch.randn(7, 5)]
    run_gloo(_center_worker, 2, tmp_path, shards, str(tmp_path))
    expected = 0.1 * torch.cat(shards).mean(0, keepdim=True)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"center{rank}.pt"), expected)


def test_bf16_inputs_give_finite_fp32_loss_and_gradients():
    torch.manual_seed(0)
    masks = torch.rand(4, 196) < 0.4
    student = (torch.randn(int(masks.sum()), 8192) * 30).bfloat16().requires_grad_(True)
    teacher = (torch.randn(int(masks.sum()), 8192) * 30).bfloat16()
    loss, _ = IBOTPatchLoss(8192)(student, teacher, masked_token_weights(masks), 4, teacher_temp=0.04)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert torch.isfinite(student.grad.float()).all()


def test_uniform_outputs_give_log_k_per_masked_image():
    masks = torch.tensor([[True, False, True], [False, False, False]])
    zeros = torch.zeros(int(masks.sum()), 64)
    loss, _ = IBOTPatchLoss(64)(zeros, zeros, masked_token_weights(masks), 2, teacher_temp=0.04)
    assert loss.item() == pytest.approx(math.log(64) / 2, rel=1e-6)  # the unmasked image counts as 0
