"""Backbone weights from any file ssd meets, loaded into ssd's (timm) backbone with strict key checking.

Accepted: an ssd checkpoint or run folder, an ssd export (folder or ``.safetensors``), and the official
DINO, iBOT, DINOv2 and DINOv3 layouts: released backbone weights, DINO's full ``checkpoint.pth`` (``teacher`` /
``student`` with ``backbone.`` and DDP ``module.`` prefixes), DINOv2's ``teacher_checkpoint.pth`` and its
training checkpoints (``model`` with ``teacher.backbone.`` keys, blocks in ``BlockChunk``s, registers,
``mask_token``, SwiGLU ``w12`` / ``w3``).

Nothing executes pickled code: ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``; the
only class allowed beyond tensors is ``argparse.Namespace``, which DINO stores its arguments in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer

from ssd.engine.sharded_checkpoint import is_sharded_checkpoint, load_whole
from ssd.file_kinds import PICKLE, SAFETENSORS, TORCH_ZIP, describe_file

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPECTED = "expected an ssd run folder or checkpoint, an ssd export, or an official DINO/DINOv2 .pth"


class WeightsError(RuntimeError):
    """Weights that cannot be read or do not fit the backbone; the message says which keys and what to do."""


def resolve_weights_path(path: str | Path) -> Path:
    """The weights file behind ``path``: itself, an export folder's safetensors, or a run's newest checkpoint."""
    path = Path(path).expanduser()
    if is_sharded_checkpoint(path):
        return path
    if path.is_dir():
        if (path / EXPORT_WEIGHTS).is_file():
            return path / EXPORT_WEIGHTS
        from ssd.engine.checkpoint import find_latest_checkpoint

        newest = find_latest_checkpoint(path)
        if newest is None:
            raise WeightsError(f"{path} holds neither {EXPORT_WEIGHTS} nor a readable checkpoint; {EXPECTED}")
        return newest
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}; {EXPECTED}")
    return path


def read_weights_file(path: str | Path) -> dict:
    """The raw content of a weights file, without executing any pickled code."""
    path = resolve_weights_path(path)
    if is_sharded_checkpoint(path):  # a folder of slices (an FSDP run's): its state plus the method's whole tensors
        from ssd.engine.checkpoint import CheckpointError, load_checkpoint

        try:
            return {**load_checkpoint(path), "method": load_whole(path)}  # the optimizer's moments are not needed
        except (CheckpointError, RuntimeError, OSError) as error:
            raise WeightsError(f"cannot read sharded checkpoint {path}: {error}") from error
    # Sniffed first: torch's unpickler rejects an image or a YAML file with the words it uses for a pickle
    # that could run code.
    kind = describe_file(path)
    if kind is None and path.suffix == ".safetensors":
        kind = SAFETENSORS  # a damaged header: safetensors' own error says what is wrong with it
    if kind not in (TORCH_ZIP, PICKLE, SAFETENSORS):
        raise WeightsError(f"{path} is {kind or 'not a torch checkpoint, pickle or safetensors file'}, "
                           f"not weights; {EXPECTED}")
    if kind == SAFETENSORS:
        try:
            return load_file(path)
        except SafetensorError as error:
            raise WeightsError(f"{path} is not a valid safetensors file ({error}): corrupt or truncated, "
                               "re-export it") from error
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is long; the line naming the refused object is the one that helps.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")[:300]
        raise WeightsError(
            f"refusing to load {path}: it holds pickled objects other than tensors ({reason}). Unpickling them "
            "could run arbitrary code. If you trust the file, re-save only its state dict (tensors) and retry."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise WeightsError(f"cannot read {path} ({type(error).__name__}: {error}); is it truncated?") from error


def is_native(content: dict) -> bool:
    """True for ssd's own files (timm key layout); False for official DINO / DINOv2 files."""
    return content.get("format") == "ssd.checkpoint" or content.get("__format__") == "ssd.export"


def trained_network(content: dict, which: str) -> str:
    """`which` as a file can answer it: a run with a frozen or random teacher stores only where that teacher came
    from, and its trained network, what "teacher" means to evaluation and export, is the student. A multi-student
    run names its students (`networks`), the first being what "teacher" and "student" mean."""
    networks = content.get("networks") or {}
    if networks:
        if which in ("teacher", "student"):
            return next(iter(networks))
        if which not in networks:
            raise WeightsError(f"this checkpoint has no network {which!r}: it holds the students "
                               f"{', '.join(networks)} (pass one of them as --which)")
        return which
    if which not in ("teacher", "student"):
        raise WeightsError(f"--which {which!r} names a student of a multi-student run; this file holds a teacher "
                           "and a student: pass --which teacher or --which student")
    if which == "teacher" and content.get("eval_backbone") == "student":
        return "student"
    return which


def network_model(content: dict, which: str) -> dict:
    """The model config of the `which` network of an ssd checkpoint: a multi-student run records one per student."""
    networks = content.get("networks") or {}
    if networks:
        return dict(networks[trained_network(content, which)]["model"])
    return dict(content["config"]["model"])


def select_backbone_state(content: dict, which: str = "teacher") -> dict[str, torch.Tensor]:
    """The backbone's state dict inside a checkpoint of any supported layout, prefixes removed."""
    which = trained_network(content, which)
    content = {k: v for k, v in content.items() if k != "__format__"}
    if content.get("format") == "ssd.checkpoint":
        state = content["method"]
        networks = content.get("networks") or {}
        prefix = networks[which]["prefix"] if networks else f"{which}.backbone."
    elif isinstance(content.get(which), dict):  # DINO checkpoint.pth, DINOv2 teacher_checkpoint.pth
        state, prefix = content[which], ""
    elif isinstance(content.get("model"), dict):  # DINOv2 (fvcore) training checkpoint
        state, prefix = content["model"], f"{which}."
    else:  # released weights: the backbone's own state dict
        state, prefix = content, ""
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}  # DDP wrapper
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith("backbone.") for k in state):  # drop DINO / iBOT heads kept beside the backbone
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not state:
        raise WeightsError(f"no {which} backbone weights found (top-level keys: {sorted(content)[:12]})")
    return state


def convert_official_vit(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Official DINO / DINOv2 ViT keys and token layout -> the layout of the timm ``model``."""
    converted = {}
    for key, value in state.items():
        if key in ("mask_token", "masked_embed"):  # DINOv2's / iBOT's mask token: a plain timm ViT has no use for it
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # BlockChunk: inner indices are global
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)  # SwiGLU: timm's packed fc1 holds w12 as-is
        key = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)
        converted[key] = value
    if "register_tokens" in converted:
        converted["reg_token"] = converted.pop("register_tokens")
    if "pos_embed" not in converted or model.pos_embed is None:
        return converted
    # Official position embeddings cover [CLS, patches]; registers get none. timm either adds the CLS
    # position into the CLS token (no_embed_class) or expects positions for every prefix token, where zeros
    # for the registers reproduce "no position" exactly.
    pos_cls, pos_patches = converted["pos_embed"][:, :1], converted["pos_embed"][:, 1:]
    grid = model.patch_embed.grid_size
    if pos_patches.shape[1] != grid[0] * grid[1]:
        pos_patches = resample_abs_pos_embed(pos_patches, new_size=list(grid), num_prefix_tokens=0)
    if model.no_embed_class:
        converted["cls_token"] = converted["cls_token"] + pos_cls
        converted["pos_embed"] = pos_patches
    else:
        registers = torch.zeros(1, model.num_prefix_tokens - 1, pos_cls.shape[-1], dtype=pos_cls.dtype)
        converted["pos_embed"] = torch.cat([pos_cls, registers, pos_patches], dim=1)
    return converted


def _hints(missing: list[str], unexpected: list[str]) -> list[str]:
    hints = []
    if any(".ls1." in k for k in unexpected):
        hints.append("the weights use LayerScale (DINOv2): set model.timm_kwargs.init_values=1e-5")
    if "reg_token" in unexpected:
        hints.append("the weights have register tokens: set model.num_registers to their number")
    if "reg_token" in missing:
        hints.append("the model has register tokens the weights lack: set model.num_registers=0")
    return hints


def load_state_strict(backbone: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that fails with every missing, unexpected and mis-shaped key named."""
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        lines = [f"weights from {source} do not fit the backbone ({type(backbone).__name__}):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")
        lines += [f"  hint: {hint}" for hint in _hints(missing, unexpected)]
        lines.append("  check model.arch / img_size / patch_size / num_registers against the weights")
        raise WeightsError("\n".join(lines))
    backbone.load_state_dict(state, strict=True)


def load_state_from_content(backbone: torch.nn.Module, content: dict, which: str, source: str) -> None:
    """Load the ``which`` backbone of already-read file ``content`` (see ``read_weights_file``)."""
    state = select_backbone_state(content, which)
    if not is_native(content) and isinstance(backbone, VisionTransformer):
        state = convert_official_vit(state, backbone)
    elif not is_native(content) and isinstance(backbone, Eva) and "storage_tokens" in state:
        # Official DINOv3 (RoPE) weights: timm's own converter renames storage tokens to registers, LayerScale
        # gammas, splits the qkv bias and drops the RoPE periods, which timm recomputes.
        state = eva_checkpoint_filter_fn(state, backbone)
    load_state_strict(backbone, state, source)


def read_weights(path: str | Path) -> tuple[Path, dict]:
    """``(file, content)``: the file behind ``path`` and what it holds, exports marked as such."""
    path = resolve_weights_path(path)
    content = read_weights_file(path)
    if path.suffix == ".safetensors":
        content = {**content, "__format__": "ssd.export"}
    return path, content


def load_backbone_weights(backbone: torch.nn.Module, path: str | Path, which: str = "teacher") -> Path:
    """Load the ``which`` backbone of any supported file into ``backbone``; returns the file actually read.

    This is what ``model.pretrained`` plugs into: call it on the freshly built student (and teacher)."""
    path, content = read_weights(path)
    load_state_from_content(backbone, content, which, str(path))
    return path


def model_info(path: Path, content: dict, which: str = "teacher") -> dict | None:
    """``{"model": model-config dict, "mean", "std"}`` recorded by an ssd checkpoint (of its ``which`` network)
    or export, else None."""
    if path.suffix == ".safetensors":
        config_file = path.with_name(EXPORT_CONFIG)
        return read_export_config(config_file) if config_file.is_file() else None
    if content.get("format") != "ssd.checkpoint":
        return None
    config = content["config"]
    evaluation = config.get("eval", {})
    return {"model": network_model(content, which), "mean": list(config["data"]["mean"]), "std": list(config["data"]["std"]),
            "resize": evaluation.get("resize_size"), "crop": evaluation.get("crop_size"), "step": content.get("step")}


def read_export_config(config_file: Path) -> dict:
    """The model config, mean and std in an export's config.json; a broken file is named with its error."""
    try:
        config = json.loads(config_file.read_bytes())
        pretrained = config["pretrained_cfg"]
        crop = int(pretrained["input_size"][-1])
        return {"model": config["ssd"]["model"], "mean": pretrained["mean"], "std": pretrained["std"],
                "crop": crop, "resize": round(crop / float(pretrained.get("crop_pct", 1.0))),
                "step": config["ssd"].get("step")}
    except json.JSONDecodeError as error:
        problem = f"is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
    except ValueError as error:  # bytes that are not text at all
        problem = f"is not a JSON text file ({describe_file(config_file) or error})"
    except (KeyError, TypeError) as error:
        problem = f"lacks the ssd.model / pretrained_cfg.mean / std entries ssd.export writes ({error!r} missing)"
    raise WeightsError(f"{config_file} {problem}: fix it, or re-export with python -m ssd.export")


def model_config(values: dict):
    """An ``ssd.config.ModelConfig`` from a plain dict; keys unknown to this version are dropped, and
    ``pretrained`` is cleared so that building the backbone never reads a second file."""
    from ssd.config import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**{k: v for k, v in values.items() if k in names}, "pretrained": ""})


def load_backbone_for_eval(path: str | Path, which: str = "teacher", model_values: dict | None = None):
    """A backbone built from the architecture the file records (or ``model_values`` for official files that
    record none) with its weights loaded: ``(backbone, info)``, info holding model config, mean, std and file.
    The file is read once: a run's checkpoint can hold gigabytes of optimizer state."""
    from ssd.models.backbone import build_backbone

    path, content = read_weights(path)
    info = model_info(path, content, which) or {"model": None, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    values = info["model"] or model_values
    if values is None:
        raise WeightsError(f"{path} does not record its architecture (official DINO/DINOv2 file): pass --arch "
                           "(and --img-size / --patch-size / --num-registers / --timm-kwargs as needed)")
    backbone = build_backbone(model_config(values))
    load_state_from_content(backbone, content, which, str(path))
    info.update(file=str(path), model=dataclasses.asdict(model_config(values)), which=trained_network(content, which))
    return backbone, info
