"""Extract one sub-network of a POA run (method.name=poa) as a standalone timm model.

    python -m ssd.extract_subnet checkpoints/my_poa_run --width 96 --depth 2 --output exports/my_poa_run-96x2

cuts the (width, depth) sub-network out of the run's EMA teacher, the network evaluation reads (POA, Zhang et
al. ECCV 2024, Sec. 3.4: the first width channels, the first width / head_dim heads and MLP units, depth blocks
evenly spaced from the first to the last), and writes the export layout of `python -m ssd.export`:
model.safetensors and config.json, a plain timm VisionTransformer of that size (embed_dim, depth, num_heads in
its model_args) that timm loads with

    model = timm.create_model("local-dir:exports/my_poa_run-96x2", pretrained=True)

Its features equal those of the elastic forward of that size during training. The sizes a run trained are its
elastic.widths x elastic.depths, and the intact network (width and depth of model.arch).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ssd.checkpoint_import import (
    WeightsError,
    load_state_from_content,
    model_config,
    read_weights,
    trained_network,
)
from ssd.cli import run_command
from ssd.config import ElasticConfig
from ssd.export import export_config, run_preprocessing, write_export
from ssd.methods.poa import offered_sizes
from ssd.models.backbone import build_backbone, timm_kwargs
from ssd.models.elastic_vit import ElasticViT, kept_blocks, slice_vit_weights, subnet_timm_kwargs


def extract_subnet(checkpoint: str | Path, width: int, depth: int, out_dir: str | Path,
                   which: str = "teacher") -> Path:
    """Write the (width, depth) sub-network of the `which` backbone of a POA checkpoint (file or run folder)."""
    path, state = read_weights(checkpoint)
    if state.get("format") != "ssd.checkpoint":
        raise WeightsError(f"{path} is not an ssd checkpoint: extract_subnet reads the run folder or checkpoint of "
                           "a method.name=poa run")
    config = state["config"]
    method = config.get("method", {}).get("name")
    if method != "poa":
        raise WeightsError(f"{path} is a method.name={method} run: only POA (method.name=poa) trains its "
                           "sub-networks; export the whole network with python -m ssd.export")
    model_cfg = model_config(dict(config["model"]))
    backbone = build_backbone(model_cfg)
    which = trained_network(state, which)
    load_state_from_content(backbone, state, which, str(path))
    elastic = ElasticViT(backbone, model_cfg.arch, timm_kwargs(model_cfg))
    names = {field.name for field in dataclasses.fields(ElasticConfig)}
    widths, depths = offered_sizes(ElasticConfig(**{k: v for k, v in config.get("elastic", {}).items() if k in names}),
                                   elastic)
    intact = (elastic.full_width, elastic.full_depth)
    if (width, depth) != intact and (width not in widths or depth not in depths):
        raise WeightsError(f"width {width} and depth {depth} is not a size this run trained: it offers widths "
                           f"{widths} x depths {depths} (elastic.widths / elastic.depths) and the intact network, "
                           f"width {intact[0]} and depth {intact[1]}")
    sub_cfg = dataclasses.replace(model_cfg, timm_kwargs=subnet_timm_kwargs(model_cfg.timm_kwargs, width, depth,
                                                                           elastic.head_dim))
    subnet = build_backbone(sub_cfg)
    subnet.load_state_dict(slice_vit_weights(backbone.state_dict(), width, depth), strict=True)
    source = {"checkpoint": str(path.resolve()), "which": which, "step": state.get("step"), "method": method,
              "subnet": {"width": width, "depth": depth, "blocks": kept_blocks(elastic.full_depth, depth),
                         "intact_width": intact[0], "intact_depth": intact[1]}}
    return write_export(subnet, export_config(subnet, sub_cfg, run_preprocessing(config), source), out_dir)


def main(argv=None) -> Path:
    from eval_protocols.common import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m ssd.extract_subnet", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="run folder (its newest checkpoint) or checkpoint file of a POA run")
    parser.add_argument("--width", type=int, required=True, help="embedding width, one of the run's elastic.widths")
    parser.add_argument("--depth", type=int, required=True, help="number of blocks, one of the run's elastic.depths")
    parser.add_argument("--output", "--out", dest="output", required=True,
                        help="output folder (model.safetensors + config.json)")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="cut from the EMA teacher (what POA evaluates) or from the intact student")
    args = parser.parse_args(argv)
    out_dir = extract_subnet(args.checkpoint, args.width, args.depth, args.output, args.which)
    print(f"extracted the {args.width} wide, {args.depth} deep sub-network of {args.checkpoint} to {out_dir}")
    print(f"  timm.create_model('local-dir:{out_dir.resolve()}', pretrained=True)")
    return out_dir


def cli() -> int:
    return run_command(main)


if __name__ == "__main__":
    sys.exit(cli())
