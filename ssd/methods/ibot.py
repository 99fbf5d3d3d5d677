"""Masked self-distillation: iBOT (Zhou et al. 2022) and DINOv2 (Oquab et al. 2023) on one engine.

    class tokens:  DINO's loss between the teacher's global views and every student view (a view is never
                   matched to itself); the student's global views are masked, as in both papers
    patch tokens:  for each global view, the student sees it masked, the teacher unmasked; on the masked
                   patches only, the student's patch distribution matches the teacher's (iBOT's L_MIM):
                   per image the mean over its masked patches, then the mean over all (view, image) pairs
    DINOv2 adds:   KoLeo on the student's class tokens (per global view), Sinkhorn-Knopp instead of the EMA
                   centre (`method.centering=sinkhorn`), a separate patch head, registers, LayerScale,
                   layer-wise lr decay, a smaller patch-embedding lr and square-root lr scaling (recipes).

The two heads run on what they score only: the class head on class tokens, the patch head on masked patch
tokens, gathered with the collator's masks (teacher and student gather the same positions). `dino` and
`dinov2` differ only in configuration, so both names build this class.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ssd.data.masking import MaskingCollator
from ssd.engine.distributed import all_gather_with_grad
from ssd.losses.dino_loss import DINOLoss, dino_cross_entropy
from ssd.losses.ibot_patch_loss import IBOTPatchLoss, ibot_masked_cross_entropy, masked_token_weights
from ssd.losses.koleo_loss import grouped_koleo_loss
from ssd.losses.sinkhorn import sinkhorn_knopp
from ssd.methods.dino import build_head
from ssd.models.backbone import build_student_backbone, patch_size_of
from ssd.models.layer_decay import vit_parameter_groups
from ssd.models.packed_crops import encode_packed
from ssd.models.token_network import TokenNetwork
from ssd.models.tokens import require_tokens
from ssd.monitors import collapse_statistics
from ssd.teachers import (
    EvaluatesTrainedNetwork,
    build_teacher,
    keep_eval,
    store_origin_instead,
    update_teacher,
)

NUM_GLOBAL_VIEWS = 2


class MaskedDistillation(EvaluatesTrainedNetwork, nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        backbone = build_student_backbone(cfg.model)
        require_tokens(backbone, cfg.method.name)
        method = cfg.method
        patch_dim = method.patch_out_dim or cfg.head.out_dim
        if method.shared_head and patch_dim != cfg.head.out_dim:
            raise ValueError(f"method.shared_head=true scores patches with the class head, so method.patch_out_dim "
                             f"({patch_dim}) must be 0 or head.out_dim ({cfg.head.out_dim})")
        self.student = self._network(backbone, patch_dim)
        # An EMA teacher starts with the student's weights, as in the papers; teacher.kind=frozen/random builds
        # one of its own (its width, the same prototypes).
        self.teacher, origin = build_teacher(cfg, self.student, lambda network: self._network(network, patch_dim))
        require_tokens(self.teacher.backbone, cfg.method.name)
        store_origin_instead(self, origin, "teacher")
        self.dino_loss = DINOLoss(cfg.head.out_dim, method.student_temp, method.center_momentum)
        self.patch_loss = IBOTPatchLoss(patch_dim, method.student_temp, method.center_momentum)
        self.patch_size = patch_size_of(backbone)

    def _network(self, backbone: nn.Module, patch_dim: int) -> TokenNetwork:
        patch_head = None if self.cfg.method.shared_head else build_head(self.cfg, backbone.num_features, patch_dim)
        return TokenNetwork(backbone, build_head(self.cfg, backbone.num_features), patch_head)

    # ---- engine contract -------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> MaskedDistillation:
        super().train(mode)
        keep_eval(self.teacher)
        return self

    def make_collate(self, seed: int) -> MaskingCollator:
        method = self.cfg.method
        grid = self.cfg.crops.global_size // self.patch_size
        return MaskingCollator(grid, ratio_range=tuple(method.mask_ratio), probability=method.mask_probability,
                               num_masked_views=NUM_GLOBAL_VIEWS, seed=seed, min_block=method.mask_min_block,
                               spread_in_batch=method.mask_spread_in_batch)

    def param_groups(self) -> list[dict]:
        return vit_parameter_groups(self, self.student.backbone, self.cfg.optim)

    def student_networks(self) -> list[nn.Module]:
        """The networks the optimizer trains, for optim.clip_mode=per_module (ssd.engine.optim.network_parts)."""
        return [self.student]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters frozen during the first `optim.freeze_last_layer_epochs` epochs (both heads)."""
        heads = [self.student.head] + ([self.student.patch_head] if self.student.patch_head is not None else [])
        return [p for head in heads for p in head.last_layer.parameters()]

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        loss, outputs, _, _ = self.compute_losses(batch, schedule)
        return loss, outputs

    def compute_losses(self, batch: dict, schedule: dict):
        """(loss, outputs, the student's tokens of the masked global crops, the global crops (2B, 3, H, W)):
        what subclasses (DINOv3's Gram anchoring) build on."""
        crops = batch["crops"]  # V tensors (B, 3, H, W): the global crops first
        masks = batch["masks"].flatten(0, 1)  # (2B, N), view-major like the concatenated global crops
        global_images = torch.cat(crops[:NUM_GLOBAL_VIEWS])  # (2B, 3, H, W)
        rows, columns = torch.nonzero(masks, as_tuple=True)  # the M masked (image, patch) positions
        # Each masked patch weighs 1 / (masked patches of its image): a per-image mean, as iBOT defines it.
        token_weights = masked_token_weights(masks)  # (M,)

        targets = self.teacher_targets(global_images, rows, columns, schedule)
        loss, outputs, student = self.student_losses(self.student, global_images, crops, masks, rows, columns,
                                                     token_weights, targets)
        outputs.update(teacher_probs=targets["cls_probs"], teacher_features=targets["cls_features"],
                       masked_share=masks.float().mean().detach())
        return loss, outputs, student, global_images

    @torch.no_grad()
    def teacher_targets(self, global_images: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                        schedule: dict) -> dict:
        """What every student matches, computed once per step: the teacher's class-token distributions of the
        global crops (2B, K), its patch distributions at the M masked positions (M, K_patch), centred (EMA center,
        whose statistics are collected here, or Sinkhorn-Knopp), and its class tokens (for the monitors)."""
        teacher = self.teacher.encode(global_images)
        cls_logits = self.teacher.head(teacher.cls)  # (2B, K)
        patch_logits = self.teacher.score_patches(teacher.patches[rows, columns])  # (M, K_patch)
        return {"cls_probs": self._centred(cls_logits, schedule["teacher_temp"], self.dino_loss),
                "patch_probs": self._centred(patch_logits, schedule["patch_teacher_temp"], self.patch_loss),
                "cls_features": teacher.cls}

    def _centred(self, logits: torch.Tensor, temp: float, centre_owner: nn.Module) -> torch.Tensor:
        if self.cfg.method.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temp)
        centre_owner.collect(logits)
        return centre_owner.teacher_probs(logits, temp)

    def student_losses(self, network: TokenNetwork, global_images: torch.Tensor, crops: list[torch.Tensor],
                       masks: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, token_weights: torch.Tensor,
                       targets: dict, group=None):
        """One student's DINO, iBOT and KoLeo losses against `targets`: (loss, outputs, its tokens of the masked
        global crops (2B, 3, H, W), which are the first two of `crops`)."""
        local_crops = self.local_crops(crops)
        if self.cfg.model.packed_crops and local_crops:  # all crop sizes through the blocks together
            student, local = encode_packed(network.backbone, [global_images, torch.cat(local_crops)], [masks, None],
                                           network.mask_token)
            local_cls = local.cls
        else:
            student = network.encode(global_images, masks)
            local_cls = network.encode(torch.cat(local_crops)).cls if local_crops else None
        loss, outputs = self.losses_from_features(network, student.cls, local_cls, student.patches[rows, columns],
                                                  token_weights, len(masks), targets, group)
        # Keeps the mask token in the graph when no patch of this micro-batch is masked (DDP expects a gradient
        # for every parameter on every rank).
        return loss + 0.0 * network.mask_token.sum(), outputs, student

    def local_crops(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        return crops[NUM_GLOBAL_VIEWS:NUM_GLOBAL_VIEWS + self.cfg.crops.local_number]  # extra crops follow

    def losses_from_features(self, network: TokenNetwork, global_cls: torch.Tensor, local_cls: torch.Tensor | None,
                             masked_patches: torch.Tensor, token_weights: torch.Tensor, num_images: int,
                             targets: dict, group=None) -> tuple[torch.Tensor, dict]:
        """DINO on the class embeddings of the global (2B, D) and local (L * B, D) crops, iBOT on the embeddings at
        the M masked positions (M, D), KoLeo on the global ones over the batch of the processes in `group` (default:
        all): (weighted sum, detached terms)."""
        method = self.cfg.method
        student_cls_logits = network.head(global_cls if local_cls is None else torch.cat([global_cls, local_cls]))
        student_patch_logits = network.score_patches(masked_patches)  # (M, K_patch)
        num_views = len(student_cls_logits) // (len(global_cls) // NUM_GLOBAL_VIEWS)
        cls_loss = dino_cross_entropy(student_cls_logits, targets["cls_probs"], num_views, NUM_GLOBAL_VIEWS,
                                      method.student_temp)
        patch_loss = ibot_masked_cross_entropy(student_patch_logits, targets["patch_probs"], token_weights,
                                               num_images, method.student_temp)
        loss = cls_loss + method.patch_loss_weight * patch_loss
        koleo = loss.new_zeros(())
        if method.koleo_weight > 0:
            # Over the global batch, not each process's share: the same loss on any number of processes (every
            # rank computes it whole; DDP's gradient average then counts it once). method.koleo_group_size splits
            # it into groups of that many images, as DINOv2 and DINOv3 compute it per GPU.
            koleo = sum(grouped_koleo_loss(all_gather_with_grad(view, group), method.koleo_group_size)
                        for view in global_cls.chunk(NUM_GLOBAL_VIEWS))
            loss = loss + method.koleo_weight * koleo
        return loss, {"loss_class": cls_loss.detach(), "loss_patch": patch_loss.detach(), "loss_koleo": koleo.detach()}

    def monitor(self, outputs: dict) -> dict:
        stats = collapse_statistics(outputs["teacher_probs"], outputs["teacher_features"])
        stats.update({name: float(value) for name, value in outputs.items() if self.is_logged(name)})
        return stats

    def is_logged(self, output_name: str) -> bool:
        return output_name.startswith("loss_") or output_name == "masked_share"

    @torch.no_grad()
    def update_centres(self) -> None:
        if self.cfg.method.centering == "ema":
            self.dino_loss.update_center()
            self.patch_loss.update_center()

    @torch.no_grad()
    def after_step(self, schedule: dict) -> None:
        self.update_centres()
        update_teacher(self.cfg.teacher.kind, self.teacher, self.student, schedule["teacher_momentum"])
