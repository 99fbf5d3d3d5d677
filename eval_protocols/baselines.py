"""What trained features are compared with: the same architecture at random initialisation (what training
added) and raw pixels (what any network has to beat; a strong baseline on simple data such as digits).

The names are those of the end-of-run table and of every JSON report, so that results read the same wherever
they come from.
"""

from __future__ import annotations

import torch
from torch import nn

RANDOM_INIT = "random init (same arch)"
RAW_PIXELS = "raw pixels"
# Command-line spelling -> the name in tables and JSON.
BASELINES = {"random-init": RANDOM_INIT, "raw-pixels": RAW_PIXELS}


def trained_name(which: str) -> str:
    """The name of the evaluated weights themselves: "trained teacher" (or student)."""
    return f"trained {which}"


def chosen_baselines(option: list[str] | None) -> list[str]:
    """``--baselines`` as given: absent -> none; alone -> both; else the named ones, in the canonical order."""
    if option is None:
        return []
    if not option:
        return list(BASELINES)
    return [name for name in BASELINES if name in option]


def random_init_backbone(model_config, seed: int) -> nn.Module:
    """The architecture of ``model_config`` (an ``ssd.config.ModelConfig``) at its initialisation under ``seed``.

    The global RNG is left as it was: the caller may be a training run whose random draws must not shift."""
    from ssd.models.backbone import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(model_config)


def raw_pixels_model() -> nn.Module:
    """The normalised centre crop itself, flattened: (B, 3, H, W) -> (B, 3 H W)."""
    return nn.Flatten()


def baseline_model(kind: str, model_config, seed: int) -> nn.Module:
    if kind == "random-init":
        return random_init_backbone(model_config, seed)
    if kind == "raw-pixels":
        return raw_pixels_model()
    raise ValueError(f"unknown baseline {kind!r}; expected one of {', '.join(BASELINES)}")
