"""Export a checkpoint's backbone (teacher by default) for use outside ssd.

    python -m ssd.export checkpoints/my_run --output exports/my_run

writes ``exports/my_run/model.safetensors`` (the timm state dict) and ``exports/my_run/config.json`` (timm's
Hugging Face layout: architecture, constructor arguments, and the preprocessing ssd evaluates the run with:
input size = eval.crop_size, crop_pct from eval.resize_size, bicubic, centre crop, the run's mean and std;
plus an ``ssd`` section saying where the weights came from). timm loads it, with its transform, by

    model = timm.create_model("local-dir:exports/my_run", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from ssd.checkpoint_import import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    WeightsError,
    load_state_from_content,
    model_config,
    network_model,
    read_weights,
    trained_network,
)
from ssd.cli import run_command
from ssd.files import write_text_atomic

FORMAT_VERSION = 1


def timm_crop_pct(resize: int, crop: int) -> float:
    """The crop fraction for which timm's eval transform resizes the shorter side to exactly ``resize`` before
    its ``crop`` centre crop. timm computes ``floor(crop / crop_pct)``, so crop / resize itself can land one pixel
    short through rounding (crop 40, resize 53 gives 52); the fraction is nudged down by the smallest steps
    until it does not."""
    crop_pct = crop / resize
    while math.floor(crop / crop_pct) < resize:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return crop_pct


def preprocessing(resize: int, crop: int, mean, std) -> dict:
    """timm's ``pretrained_cfg`` entries describing ``ssd.data.eval_transform(resize, crop, mean, std)``:
    shorter side to ``resize`` (bicubic), ``crop`` x ``crop`` centre crop, normalisation."""
    return {
        "input_size": [3, int(crop), int(crop)],
        "crop_pct": timm_crop_pct(int(resize), int(crop)),
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


def export_config(backbone: torch.nn.Module, model_cfg, inputs: dict, source: dict) -> dict:
    """timm's ``config.json`` for ``backbone`` built from ``model_cfg`` (an ``ssd.config.ModelConfig``);
    ``inputs`` is the ``preprocessing`` the run is evaluated with."""
    from ssd.models.backbone import patch_size_of, timm_kwargs

    # Training-only arguments would change nothing at inference but make the export look like a training model.
    model_args = {k: v for k, v in timm_kwargs(model_cfg).items() if k not in ("drop_path_rate", "drop_rate")}
    return {
        "architecture": model_cfg.arch,
        "num_classes": 0,
        "num_features": int(backbone.num_features),
        "model_args": model_args,
        "pretrained_cfg": {
            **inputs,
            "fixed_input_size": False,  # ssd's ViTs interpolate their position embedding
            "num_classes": 0,
        },
        "ssd": {
            "format_version": FORMAT_VERSION,
            "image_size": int(model_cfg.img_size),  # the position-embedding grid, not the input size
            "patch_size": patch_size_of(backbone),  # None for non-ViTs
            "num_registers": int(model_cfg.num_registers),
            "model": dataclasses.asdict(model_cfg),
            **source,
        },
    }


def write_export(backbone: torch.nn.Module, config: dict, out_dir: str | Path) -> Path:
    """Write weights and config; each file goes to a temporary name first so a crash leaves no half export."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory or are non-contiguous views, so each is copied.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    temporary = out_dir / f".{EXPORT_WEIGHTS}.tmp"
    save_file(tensors, temporary, metadata={"format": "pt", "architecture": config["architecture"]})
    make_shareable(temporary)
    os.replace(temporary, out_dir / EXPORT_WEIGHTS)
    write_text_atomic(out_dir / EXPORT_CONFIG, json.dumps(config, indent=2) + "\n")
    return out_dir


def make_shareable(path: Path) -> None:
    """Give ``path`` the permissions of any new file (0o666 less the umask): safetensors writes 0o600, which
    hides an export from the colleagues who can read the rest of the run folder."""
    umask = os.umask(0)  # the only way to read the umask is to set it, so it is put straight back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def export_backbone(checkpoint: str | Path, out_dir: str | Path, which: str = "teacher") -> Path:
    """Export the ``which`` backbone of an ssd checkpoint (file or run folder) to ``out_dir``."""
    from ssd.models.backbone import build_backbone

    path, state = read_weights(checkpoint)
    if state.get("format") != "ssd.checkpoint":
        raise WeightsError(f"{path} is not an ssd checkpoint; export reads ssd runs (official weights already "
                           "load with ssd.checkpoint_import.load_backbone_weights)")
    which = trained_network(state, which)
    model_cfg = model_config(network_model(state, which))
    backbone = build_backbone(model_cfg)
    load_state_from_content(backbone, state, which, str(path))
    source = {"checkpoint": str(path.resolve()), "which": which, "step": state.get("step"),
              "method": state["config"].get("method", {}).get("name")}
    return write_export(backbone, export_config(backbone, model_cfg, run_preprocessing(state["config"]), source),
                        out_dir)


def run_preprocessing(config: dict) -> dict:
    """The ``preprocessing`` of a run's recorded config: its eval sizes and data normalisation (the schema's
    defaults where a config recorded by an older version lacks them)."""
    from ssd.config import DataConfig, EvalConfig

    data, evaluation = config.get("data", {}), config.get("eval", {})
    return preprocessing(evaluation.get("resize_size", EvalConfig.resize_size),
                         evaluation.get("crop_size", EvalConfig.crop_size),
                         data.get("mean", DataConfig().mean), data.get("std", DataConfig().std))


def load_export(out_dir: str | Path) -> torch.nn.Module:
    """The exported backbone as a timm model, through timm's own ``local-dir:`` loader."""
    return timm.create_model(f"local-dir:{Path(out_dir).resolve()}", pretrained=True)


def main(argv=None) -> Path:
    from eval_protocols.common import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m ssd.export", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="ssd checkpoint file or run folder (its newest checkpoint is used)")
    parser.add_argument("--output", "--out", dest="output", required=True,
                        help="output folder (model.safetensors + config.json)")
    parser.add_argument("--which", default="teacher", metavar="{teacher,student,<student name>}",
                        help="which backbone to export; the teacher is the one DINO evaluates (a run with a frozen "
                        "or random teacher exports its student, the network it trained; a multi_distill run names "
                        "each student, the first by default)")
    args = parser.parse_args(argv)
    out_dir = export_backbone(args.checkpoint, args.output, args.which)
    config = json.loads((out_dir / EXPORT_CONFIG).read_text())
    print(f"exported the {args.which} backbone of {config['ssd']['checkpoint']} to {out_dir}")
    print(f"  timm.create_model('local-dir:{out_dir.resolve()}', pretrained=True)")
    return out_dir


def cli() -> int:
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
