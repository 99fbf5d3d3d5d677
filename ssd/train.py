"""`python -m ssd.train [--config RECIPE_OR_YAML] [key=value ...]`: pretrain an encoder.

With no arguments it runs the DINO demo on scikit-learn's handwritten digits (shipped inside the installed
package, so it needs no download) and reports k-NN accuracy of the frozen teacher next to a random-init
network and raw pixels. Under torchrun it runs data-parallel; the SLURM launcher calls `run(cfg)`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from ssd.config import ConfigError, load_config, save_config
from ssd.data import MultiCropAugmentation, build_dataset
from ssd.engine import distributed
from ssd.engine.state import seed_everything
from ssd.engine.trainer import Trainer
from ssd.methods import build_method

log = logging.getLogger("ssd")


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def resolve_run_dir(cfg, dist_info) -> Path:
    """`output.root/output.run_name`; an empty run name becomes `<recipe>-<timestamp>`, agreed by all ranks."""
    if not cfg.output.run_name:
        name = [f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if distributed.is_distributed():
            torch.distributed.broadcast_object_list(name, src=0)
        cfg.output.run_name = name[0]
    return Path(cfg.output.root) / cfg.output.run_name


def build_transform(cfg) -> MultiCropAugmentation:
    crops = cfg.crops
    return MultiCropAugmentation(
        global_size=crops.global_size,
        global_scale=tuple(crops.global_scale),
        local_number=crops.local_number,
        local_size=crops.local_size,
        local_scale=tuple(crops.local_scale),
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
    )


def run(cfg) -> dict:
    """Train in this process (one rank of a job when WORLD_SIZE > 1). Returns status, step and run folder."""
    dist_info = distributed.init_distributed(cfg.train.device)
    setup_logging(dist_info.rank)
    seed_everything(cfg.train.seed + dist_info.rank)
    run_dir = resolve_run_dir(cfg, dist_info)
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        log.info("run folder: %s", run_dir.resolve())
    dataset = build_dataset(cfg.data, cfg.data.split)
    method = build_method(cfg)
    trainer = Trainer(cfg, method, dataset, build_transform(cfg), dist_info, run_dir)
    if dist_info.is_main:
        log.info("%d images, %d steps per epoch, %d steps in all, global batch %d on %d process(es)",
                 len(dataset), trainer.steps_per_epoch, trainer.schedule.total_steps, cfg.train.batch_size,
                 dist_info.world_size)
    result = trainer.fit()
    if result["status"] == "finished" and cfg.eval.knn:
        if dist_info.is_main:
            from ssd.knn_report import knn_report

            result["knn"] = knn_report(cfg, method.teacher_backbone(), run_dir, dist_info.device)
        distributed.barrier()
    if dist_info.is_main:
        log.info("%s at step %d; run folder: %s", result["status"], result["step"], run_dir.resolve())
    distributed.shutdown()
    return result


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m ssd.train",
        description="Self-supervised self-distillation pretraining. Recipes live in ssd/configs/; any config "
        "key can be overridden as key=value (e.g. optim.base_lr=1e-3 data.root=/data/imagenet/train).",
    )
    parser.add_argument("--config", default=None,
                        help="recipe name in ssd/configs/ or a YAML file, e.g. a run's config.yaml "
                             "(default: dino_digits_demo)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    return args, args.overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    result = run(cfg)
    return 0 if result["status"] in ("finished", "preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
