"""Regression onto target-encoder features, I-JEPA's loss (Assran et al. 2023).

The predictor's outputs at the target patches regress the EMA encoder's features of the same patches. I-JEPA
first layer-normalises each target feature vector over its channels (no affine weights): every token then has
zero mean and unit variance, so the loss cannot shrink by the target encoder scaling its features down, and
tokens weigh alike. The default distance is smooth L1 with beta 1 (quadratic below 1, linear above, PyTorch's
default and I-JEPA's choice), averaged over every element.

The targets are normalised inside, with gradients flowing through the normalisation if the caller left them
attached; the training step detaches them (the EMA target encoder gets no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("smooth_l1", "l2", "l1")


def latent_regression_loss(predicted: torch.Tensor, targets: torch.Tensor, kind: str = "smooth_l1",
                           normalize_targets: bool = True) -> torch.Tensor:
    """predicted, targets (B, M, D) -> scalar, the mean over B * M * D elements, computed in at least fp32."""
    if kind not in KINDS:
        raise ValueError(f"unknown latent loss kind '{kind}'; choose one of {', '.join(KINDS)}")
    if predicted.shape != targets.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and targets {tuple(targets.shape)} differ in shape")
    dtype = torch.promote_types(torch.promote_types(predicted.dtype, targets.dtype), torch.float32)
    predicted, targets = predicted.to(dtype), targets.to(dtype)  # bf16 squares and sums lose too much
    if normalize_targets:
        targets = F.layer_norm(targets, targets.shape[-1:])  # (B, M, D), eps 1e-5 as I-JEPA's default
    if kind == "smooth_l1":
        return F.smooth_l1_loss(predicted, targets, beta=1.0)
    if kind == "l2":
        return F.mse_loss(predicted, targets)
    return F.l1_loss(predicted, targets)
