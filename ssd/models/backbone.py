"""Backbones are plain timm models, so an exported state dict loads into timm without translation.

ViTs are built with `dynamic_img_size=True`: the position embedding is interpolated to each input size, which
lets global and local crops share the same weights. Other architectures (ResNet, ConvNeXt) return pooled
features because the classifier is removed (`num_classes=0`).
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.layers import DropPath

from ssd.config import ConfigError
from ssd.models.subset_drop_path import use_subset_drop_path


def is_vit(arch: str) -> bool:
    return arch.startswith(("vit_", "deit_", "eva02_")) or "vit" in arch.split("_")[0]


def timm_kwargs(model_cfg: Any) -> dict:
    """The keyword arguments ssd passes to `timm.create_model` for this config (also written on export)."""
    kwargs: dict = {"num_classes": 0, "drop_path_rate": float(model_cfg.drop_path_rate)}
    if is_vit(model_cfg.arch):
        kwargs.update(img_size=int(model_cfg.img_size), dynamic_img_size=True)
        if model_cfg.patch_size:
            kwargs["patch_size"] = int(model_cfg.patch_size)
        if model_cfg.num_registers:
            # timm's VisionTransformer calls them reg_tokens, its Eva (the DINOv3 RoPE models) num_reg_tokens.
            name = "num_reg_tokens" if "dinov3" in model_cfg.arch or model_cfg.arch.startswith("eva") else "reg_tokens"
            kwargs[name] = int(model_cfg.num_registers)
    elif model_cfg.num_registers:
        raise ConfigError(f"model.num_registers needs a ViT; '{model_cfg.arch}' is not one: set it to 0")
    extra = model_cfg.timm_kwargs or {}
    if isinstance(extra, DictConfig):  # from a config: plain lists and dicts for timm (a ListConfig breaks
        extra = OmegaConf.to_container(extra, resolve=True)  # ConvNeXt's `depths`, for one)
    kwargs.update(extra)
    return kwargs


def build_backbone(model_cfg: Any) -> nn.Module:
    """A randomly initialised timm model whose forward returns pooled features (B, D)."""
    if model_cfg.arch not in timm.list_models():
        import difflib

        close = difflib.get_close_matches(model_cfg.arch, timm.list_models(), n=3)
        raise ConfigError(f"unknown timm architecture '{model_cfg.arch}'; close names: {', '.join(close)}")
    kwargs = timm_kwargs(model_cfg)
    try:
        model = timm.create_model(model_cfg.arch, pretrained=False, **kwargs)
    except TypeError as error:  # usually a keyword the architecture does not take
        raise ConfigError(
            f"timm could not build '{model_cfg.arch}' with {kwargs}: {error}. Check model.timm_kwargs (replace "
            "it whole with model.timm_kwargs={} or model.timm_kwargs={key: value})"
        ) from error
    if getattr(model_cfg, "drop_path_uniform", False) and model_cfg.drop_path_rate > 0:
        _uniform_drop_path(model, float(model_cfg.drop_path_rate))
    if getattr(model_cfg, "grad_checkpointing", False):
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, AttributeError, NotImplementedError) as error:
            raise ConfigError(f"model.grad_checkpointing=true: timm's {model_cfg.arch} does not support activation "
                              f"checkpointing ({error or type(error).__name__}); set it to false") from None
    if getattr(model_cfg, "drop_path_subset", False) and not use_subset_drop_path(model):
        raise ConfigError(f"model.drop_path_subset=true computes the residual branches of timm ViT blocks on the kept "
                          f"samples; {model_cfg.arch} has none: set model.drop_path_subset=false")
    if not hasattr(model, "num_features"):
        raise ConfigError(f"timm model '{model_cfg.arch}' has no num_features; it cannot be a backbone here")
    return model


def _uniform_drop_path(model: nn.Module, rate: float) -> None:
    """timm raises stochastic depth linearly from 0 in the first block; DINOv2 uses one rate for all blocks."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ConfigError(f"model.drop_path_uniform=true needs a ViT with blocks; {type(model).__name__} has none")
    for block in blocks:
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(rate))


def embed_dim(backbone: nn.Module) -> int:
    return int(backbone.num_features)


def build_student_backbone(model_cfg: Any) -> nn.Module:
    """`build_backbone`, then the weights of `model.pretrained` if it names a file or run to start from."""
    backbone = build_backbone(model_cfg)
    if model_cfg.pretrained:
        from ssd.checkpoint_import import load_backbone_weights

        load_backbone_weights(backbone, model_cfg.pretrained)
    return backbone


def encoder_network(backbone: nn.Module) -> nn.Module:
    """A module holding only `backbone`, so that methods without heads expose `.backbone` like the others'."""
    return nn.ModuleDict({"backbone": backbone})


def patch_size_of(backbone: nn.Module) -> int | None:
    """Patch size of a ViT (timm VisionTransformer or Eva, the DINOv3 RoPE models); None without patches."""
    patch_embed = getattr(backbone, "patch_embed", None)
    return int(patch_embed.patch_size[0]) if patch_embed is not None else None
