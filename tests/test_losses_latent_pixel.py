"""I-JEPA's latent regression and MAE's pixel loss against float64 references written out element by element."""

from __future__ import annotations

import pytest
import torch

from ssd.losses.latent_loss import latent_regression_loss
from ssd.losses.pixel_loss import masked_pixel_loss, patchify, unpatchify


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def reference_latent(predicted, targets, kind, normalize):
    """Per token: standardise the target over channels (biased variance, eps 1e-5), then the distance."""
    total, count = 0.0, 0
    for b in range(predicted.shape[0]):
        for m in range(predicted.shape[1]):
            target = targets[b, m]
            if normalize:
                target = (target - target.mean()) / torch.sqrt(((target - target.mean()) ** 2).mean() + 1e-5)
            for d in range(predicted.shape[2]):
                diff = predicted[b, m, d] - target[d]
                if kind == "smooth_l1":
                    value = 0.5 * diff ** 2 if diff.abs() < 1 else diff.abs() - 0.5
                elif kind == "l2":
                    value = diff ** 2
                else:
                    value = diff.abs()
                total, count = total + value, count + 1
    return total / count


@pytest.mark.parametrize("kind", ["smooth_l1", "l2", "l1"])
@pytest.mark.parametrize("normalize", [True, False])
def test_latent_loss_matches_reference_values_and_gradients(kind, normalize):
    g = generator(1)
    # scale 2: differences fall on both sides of smooth L1's beta = 1
    predicted = (2 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    targets = (3 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64) + 1).requires_grad_(True)
    value = latent_regression_loss(predicted, targets, kind, normalize)
    expected = reference_latent(predicted, targets, kind, normalize)
    grads = torch.autograd.grad(value, (predicted, targets))
    expected_grads = torch.autograd.grad(expected, (predicted, targets))
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):  # targets too: detaching is the caller's business
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_latent_loss_ignores_target_scale_when_normalising():
    g = generator(2)
    predicted, targets = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    torch.testing.assert_close(latent_regression_loss(predicted, 100 * targets + 3),
                               latent_regression_loss(predicted, targets), rtol=1e-4, atol=1e-5)


def test_latent_loss_finite_in_bfloat16():
    g = generator(3)
    predicted = (50 * torch.randn(4, 16, 64, generator=g)).bfloat16().requires_grad_(True)
    targets = (50 * torch.randn(4, 16, 64, generator=g)).bfloat16()
    for kind in ("smooth_l1", "l2", "l1"):
        value = latent_regression_loss(predicted, targets, kind)
        (grad,) = torch.autograd.grad(value, predicted)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
        expected = latent_regression_loss(predicted.double(), targets.double(), kind)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)


def test_latent_loss_rejects_unknown_kind_and_shape_mismatch():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="unknown latent loss kind 'cosine'"):
        latent_regression_loss(x, x, "cosine")
    with pytest.raises(ValueError, match=r"predicted \(2, 3, 4\) and targets \(2, 3, 5\) differ"):
        latent_regression_loss(x, torch.zeros(2, 3, 5))


def test_patchify_layout_and_roundtrip():
    g = generator(4)
    images = torch.randn(2, 3, 8, 12, generator=g)  # a 2 x 3 grid of 4-pixel patches
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch 4 is row 1, column 1; its value 5 * 3 + 2 is (row 1, column 1) inside the patch, channel 2
    assert patches[1, 4, 5 * 3 + 2] == images[1, 2, 4 + 1, 4 + 1]
    assert torch.equal(unpatchify(patches, 4, (2, 3)), images)
    assert torch.equal(patchify(unpatchify(patches, 4, (2, 3)), 4), patches)
    with pytest.raises(ValueError, match="do not fit a 3x3 grid"):
        unpatchify(patches, 4, (3, 3))


def test_patchify_rejects_sizes_not_multiple_of_patch():
    with pytest.raises(ValueError, match="10x12 is not a multiple of the patch size 4"):
        patchify(torch.zeros(1, 3, 10, 12), 4)
    with pytest.raises(ValueError, match="8x10 is not a multiple"):
        masked_pixel_loss(torch.zeros(1, 1, 48), torch.zeros(1, 3, 8, 10), 4, torch.zeros(1, 1, dtype=torch.long))


def reference_pixel(predicted, images, patch, index, normalize):
    """Cut each indexed patch out of the image by hand, (row, column, channel) order, float64."""
    total = 0.0
    cols = images.shape[3] // patch
    for b in range(index.shape[0]):
        for m in range(index.shape[1]):
            row, col = divmod(int(index[b, m]), cols)
            block = images[b, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch]  # (C, p, p)
            target = block.permute(1, 2, 0).reshape(-1)
            if normalize:
                mean = target.mean()
                variance = ((target - mean) ** 2).sum() / (target.numel() - 1)
                target = (target - mean) / torch.sqrt(variance + 1e-6)
            total = total + ((predicted[b, m] - target) ** 2).mean()
    return total / index.numel()


@pytest.mark.parametrize("normalize", [True, False])
def test_pixel_loss_matches_reference_values_and_gradients(normalize):
    g = generator(5)
    images = torch.randn(2, 3, 8, 12, generator=g, dtype=torch.float64) * 2 + 1
    index = torch.tensor([[0, 5, 3], [4, 1, 2]])  # different patches per image, unsorted
    predicted = torch.randn(2, 3, 48, generator=g, dtype=torch.float64).requires_grad_(True)
    value = masked_pixel_loss(predicted, images, 4, index, normalize)
    expected = reference_pixel(predicted, images, 4, index, normalize)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(value, predicted)[0],
                               torch.autograd.grad(expected, predicted)[0], rtol=1e-10, atol=1e-14)


def test_pixel_loss_without_normalisation_is_plain_mse_on_raw_patches():
    g = generator(6)
    images = torch.rand(2, 3, 8, 8, generator=g)
    index = torch.tensor([[3, 0], [1, 2]])
    predicted = torch.rand(2, 2, 48, generator=g)
    raw = patchify(images, 4)[torch.arange(2)[:, None], index]  # (2, 2, 48)
    torch.testing.assert_close(masked_pixel_loss(predicted, images, 4, index, normalize=False),
                               torch.nn.functional.mse_loss(predicted, raw))
    # a perfect prediction of the normalised patches costs nothing
    normalised = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    assert masked_pixel_loss(normalised, images, 4, index).item() < 1e-10
    assert torch.isfinite(masked_pixel_loss(predicted.bfloat16(), images.bfloat16(), 4, index))


def test_pixel_loss_rejects_mismatched_prediction():
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"predicted \(2, 2, 47\) does not match"):
        masked_pixel_loss(torch.zeros(2, 2, 47), images, 4, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match index"):
        masked_pixel_loss(torch.zeros(2, 3, 48), images, 4, torch.zeros(2, 2, dtype=torch.long))
