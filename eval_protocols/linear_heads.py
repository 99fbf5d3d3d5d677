"""The grid of linear classifiers trained together on one backbone pass (as DINOv2's linear evaluation does).

A grid point is a ``Setting``: learning rate (per 256 images), how many last blocks' CLS tokens are concatenated
(``n_last_blocks``), and whether the mean patch token of the last block is appended (``avgpool``). Every
point has its own ``nn.Linear``; their losses are summed, and since the features are frozen each head's
gradient is exactly what it would be if trained alone.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
from torch import nn

# DINOv2's grid (per 256 images; scaled by the global batch size): wide, because the best value varies by
# three orders of magnitude between backbones and feature combinations.
DEFAULT_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DEFAULT_N_LAST_BLOCKS = (1, 4)
DEFAULT_AVGPOOL = (False, True)


@dataclass(frozen=True)
class Setting:
    lr_per_256: float  # the lr a head trains with is this x global batch / 256
    n_last_blocks: int
    avgpool: bool

    @property
    def name(self) -> str:
        return f"lr={self.lr_per_256:g} blocks={self.n_last_blocks} avgpool={int(self.avgpool)}"

    def as_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


def make_grid(lrs=DEFAULT_LEARNING_RATES, n_last_blocks=DEFAULT_N_LAST_BLOCKS, avgpool=DEFAULT_AVGPOOL,
              has_tokens: bool = True, depth: int | None = None) -> list[Setting]:
    """All combinations; without tokens (non-ViT backbones) only the pooled output exists, and a ViT of
    ``depth`` blocks gives at most ``depth`` class tokens (larger n_last_blocks become ``depth``)."""
    if not has_tokens:
        n_last_blocks, avgpool = (1,), (False,)
    elif depth is not None:
        n_last_blocks = sorted({min(int(n), depth) for n in n_last_blocks})
    return [Setting(float(lr), int(n), bool(pool)) for n, pool, lr in itertools.product(n_last_blocks, avgpool, lrs)]


def linear_input(outputs: dict, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """The classifier input (B, F) from ``features.backbone_outputs``-style outputs, as in DINOv2's
    ``create_linear_input``: the last n CLS tokens concatenated, then optionally the mean patch token."""
    if "cls" not in outputs:  # a non-ViT: its pooled output is the only feature
        return outputs["pooled"]
    available = outputs["cls"].shape[1]
    if n_last_blocks > available:
        raise ValueError(f"n_last_blocks={n_last_blocks} but only {available} blocks' CLS tokens were extracted")
    features = outputs["cls"][:, -n_last_blocks:].flatten(1)  # (B, n * D)
    if avgpool:
        features = torch.cat([features, outputs["patch_mean"]], dim=1)  # (B, (n + 1) * D)
    return features.float()


class LinearGrid(nn.Module):
    """One linear head per setting; ``forward`` returns their logits in settings order."""

    def __init__(self, settings: list[Setting], example_outputs: dict, num_classes: int):
        super().__init__()
        self.settings = settings
        heads = []
        for setting in settings:
            in_features = linear_input(example_outputs, setting.n_last_blocks, setting.avgpool).shape[1]
            head = nn.Linear(in_features, num_classes)
            # DINO's initialisation: small weights so that every head starts near uniform predictions.
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)
            heads.append(head)
        self.heads = nn.ModuleList(heads)

    def forward(self, outputs: dict) -> list[torch.Tensor]:
        inputs = {}  # settings differing only in lr share the same input
        logits = []
        for setting, head in zip(self.settings, self.heads):
            key = (setting.n_last_blocks, setting.avgpool)
            if key not in inputs:
                inputs[key] = linear_input(outputs, *key)
            logits.append(head(inputs[key]))
        return logits

    def param_groups(self, lr_scale: float) -> list[dict]:
        """One SGD parameter group per head with its own peak lr (``lr_per_256`` x ``lr_scale``)."""
        return [{"params": list(head.parameters()), "lr": setting.lr_per_256 * lr_scale,
                 "peak_lr": setting.lr_per_256 * lr_scale}
                for setting, head in zip(self.settings, self.heads)]


@torch.no_grad()
def count_correct(logits: torch.Tensor, labels: torch.Tensor, top: int) -> int:
    top = min(top, logits.shape[1])
    return int((logits.topk(top, dim=1).indices == labels.view(-1, 1)).any(dim=1).sum())
