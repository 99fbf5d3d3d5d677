"""Masked pixel reconstruction (He et al. 2022, MAE) under multi-block masks: SALT's first stage (Li et al. 2025).

SALT trains its teacher this way, then freezes it and trains a student to predict its latents (stage 2: method
`ijepa` with `teacher.kind=frozen teacher.source=<this run>`).

    encoder   the ViT on the visible (context) patches only, one crop per image
    decoder   a light narrow ViT (the predictor of ssd/models/predictor.py): visible tokens + a mask token at
              every target position -> patch * patch * 3 pixel values
    loss      mean squared error on the target patches' pixels, each patch normalised by its own mean and std
              (`method.pixel_norm`, MAE's better setting)

There is no teacher: evaluation and export read this encoder (average-pooled patch tokens), and stage 2 loads it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ssd.data.multiblock import MultiBlockCollator
from ssd.losses.pixel_loss import masked_pixel_loss
from ssd.methods.ijepa import build_encoder, multiblock_collator
from ssd.models.backbone import encoder_network, patch_size_of
from ssd.models.layer_decay import vit_parameter_groups
from ssd.models.predictor import Predictor, repeat_for_targets
from ssd.models.tokens import encode


class MaskedPixels(nn.Module):
    eval_network = "student"  # the only network: what stage 2 and the evaluations read

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.student = encoder_network(build_encoder(cfg))
        self.patch_size = patch_size_of(self.student.backbone)
        grid = cfg.crops.global_size // self.patch_size
        method = cfg.method
        self.decoder = Predictor(self.student.backbone.num_features, (grid, grid), method.predictor_dim,
                                 method.predictor_depth, method.predictor_heads, out_dim=3 * self.patch_size**2)

    def make_collate(self, seed: int) -> MultiBlockCollator:
        return multiblock_collator(self.cfg, self.patch_size, seed)

    def param_groups(self) -> list[dict]:
        return vit_parameter_groups(self, self.student.backbone, self.cfg.optim)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return []

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        images = batch["crops"][0]  # (B, 3, H, W)
        context, targets = batch["context"], batch["targets"]  # (B, K), (B, T, M)
        num_targets = targets.shape[1]
        target_index = targets.flatten(0, 1)  # (B * T, M)
        visible = encode(self.student.backbone, images, keep=context).patches  # (B, K, D)
        predicted = self.decoder(repeat_for_targets(visible, num_targets), repeat_for_targets(context, num_targets),
                                 target_index)  # (B * T, M, 3 * p * p)
        # Blocks are image-major, so (B * T, M, .) reshapes to each image's T * M target patches.
        loss = masked_pixel_loss(predicted.reshape(len(images), -1, predicted.shape[-1]), images, self.patch_size,
                                 targets.flatten(1), normalize=self.cfg.method.pixel_norm)
        return loss, {"context_share": torch.tensor(context.shape[1] / (images.shape[-1] // self.patch_size) ** 2)}

    def monitor(self, outputs: dict) -> dict:
        return {name: float(value) for name, value in outputs.items()}

    def after_step(self, schedule: dict) -> None:
        return None

    def eval_backbone(self) -> nn.Module:
        return self.student.backbone
