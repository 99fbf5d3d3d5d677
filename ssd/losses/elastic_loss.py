"""POA's objective (Zhang et al. ECCV 2024, Sec. 3.3): three branches, one loss.

The intact student learns from the EMA teacher with DINO's cross-view loss. The elastic student (a sub-network
of the intact one) learns from the same teacher targets with the same cross-view loss, and from the intact
student on the *same* view: a cross-entropy to softmax(intact logits / student_temp), the intact side detached
so that a small sub-network never pulls the large one towards itself. With `elastic_weight` w (POA's 1 - lambda,
0.2 in its ViT recipes) and `from_intact_weight` a (1 in POA):

    loss = (1 - w) * H(teacher, intact) + w * (H(teacher, elastic) + a * H(intact, elastic))

POA averages its same-view term over the global and over the local crops separately and adds the two means; here
it is one mean over every crop, so that all three terms are averages of the same kind of cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssd.losses.centering import at_least_fp32
from ssd.losses.dino_loss import dino_cross_entropy


def same_view_cross_entropy(student_logits: torch.Tensor, target_logits: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """Mean over rows of H(softmax(target / T), softmax(student / T)); (M, K) each, no gradient to the target."""
    target_probs = F.softmax(at_least_fp32(target_logits.detach()) / temperature, dim=-1)
    student_log_probs = F.log_softmax(at_least_fp32(student_logits) / temperature, dim=-1)
    return -(target_probs * student_log_probs).sum(dim=-1).mean()


def poa_loss(intact_logits: torch.Tensor, elastic_logits: torch.Tensor, teacher_probs: torch.Tensor,
             num_student_views: int, num_teacher_views: int, student_temp: float, elastic_weight: float,
             from_intact_weight: float) -> dict[str, torch.Tensor]:
    """intact_logits, elastic_logits (V * B, K) over every crop, view-major; teacher_probs (V_t * B, K), the
    centred teacher distribution on the global crops. Returns the total `loss` and its three terms."""
    views = (num_student_views, num_teacher_views, student_temp)
    intact = dino_cross_entropy(intact_logits, teacher_probs, *views)
    elastic_from_teacher = dino_cross_entropy(elastic_logits, teacher_probs, *views)
    elastic_from_intact = same_view_cross_entropy(elastic_logits, intact_logits, student_temp)
    loss = (1.0 - elastic_weight) * intact + elastic_weight * (elastic_from_teacher
                                                                + from_intact_weight * elastic_from_intact)
    return {"loss": loss, "loss_intact": intact, "loss_elastic_teacher": elastic_from_teacher,
            "loss_elastic_intact": elastic_from_intact}
