"""DINOv3 (Siméoni et al. 2025): DINOv2's losses on a RoPE ViT, plus Gram anchoring.

Gram anchoring keeps patch features local over long runs: the Gram matrix of the student's L2-normalised patch
features (the masked global crops' tokens, as the other losses see them) is regressed to that of a Gram
teacher, a frozen snapshot of the EMA teacher. The snapshot is taken at `method.gram_start_step` and refreshed
every `method.gram_refresh_steps`; the loss (weight `method.gram_weight`) is active from the first snapshot on.
With `crops.gram_teacher_size` the Gram teacher sees each global crop again at that larger size (same box and
flip, no colour changes, cropped from the original image as DINOv3 does) and its patch features are pooled back
to the student's grid.

The snapshot is a module of the method, so it is checkpointed and a resumed run anchors to the same weights.
Constant schedules after warmup (`optim.schedule=constant`) and the high-resolution adaptation stage
(`train.init_from`) are configuration; see the dinov3_* recipes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd.losses.gram_loss import gram_loss
from ssd.methods.ibot import NUM_GLOBAL_VIEWS, MaskedDistillation
from ssd.models.tokens import encode
from ssd.teachers import frozen_copy, store_origin_instead


class DINOv3(MaskedDistillation):
    def __init__(self, cfg):
        super().__init__(cfg)
        # Parameters that never train: frozen_copy turns gradients off, so no optimizer group holds them.
        self.gram_teacher = frozen_copy(self.teacher.backbone)
        if cfg.teacher.kind != "ema":  # snapshots of a fixed teacher are that teacher: not stored either
            store_origin_instead(self, self.teacher_origin, "gram_teacher")

    def train(self, mode: bool = True) -> DINOv3:
        super().train(mode)
        self.gram_teacher.eval()
        return self

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        loss, outputs, student, global_images = self.compute_losses(batch, schedule)
        method = self.cfg.method
        gram = loss.new_zeros(())
        if method.gram_weight > 0 and schedule["step"] >= method.gram_start_step:
            if self.cfg.crops.gram_teacher_size:  # the global crops again at the Gram teacher's size, last
                global_images = torch.cat(batch["crops"][-NUM_GLOBAL_VIEWS:])
            gram = gram_loss(student.patches, self._gram_teacher_patches(global_images, student.patches.shape[1]))
            loss = loss + method.gram_weight * gram
        outputs["loss_gram"] = gram.detach()
        return loss, outputs

    @torch.no_grad()
    def _gram_teacher_patches(self, images: torch.Tensor, num_patches: int) -> torch.Tensor:
        """(2B, N, D) Gram-teacher patch features on the student's grid; larger inputs are average-pooled to it
        (DINOv3 resizes its high-resolution teacher features down to the student's)."""
        patches = encode(self.gram_teacher, images).patches  # (2B, N', D)
        if patches.shape[1] == num_patches:
            return patches
        grid = self.cfg.crops.global_size // self.patch_size
        large = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        features = patches.transpose(1, 2).reshape(len(images), -1, *large)  # (2B, D, h', w')
        return F.adaptive_avg_pool2d(features, grid).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def after_step(self, schedule: dict) -> None:
        super().after_step(schedule)
        method = self.cfg.method
        next_step = schedule["step"] + 1
        since_start = next_step - method.gram_start_step
        if method.gram_weight > 0 and since_start >= 0 and since_start % method.gram_refresh_steps == 0:
            self.refresh_gram_teacher()

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        for target, source in zip(self.gram_teacher.state_dict().values(), self.teacher.backbone.state_dict().values()):
            target.copy_(source)
