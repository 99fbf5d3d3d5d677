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

from ssd.cli import EXIT_USAGE, report_error, user_errors
from ssd.config import ConfigError, check_world_size, load_config
from ssd.data import MultiCropAugmentation, build_dataset
from ssd.engine import distributed, signals
from ssd.engine.checkpoint import CheckpointError
from ssd.engine.run_folder import ResumePlan, RunFolderError, open_run_folder, undo_start
from ssd.engine.state import seed_everything
from ssd.engine.trainer import NonFiniteLossError, Trainer, evaluated_networks, plain_network, steps_per_epoch
from ssd.methods import build_method

log = logging.getLogger("ssd")
# sysexits.h EX_TEMPFAIL, "try again later": the run stopped on a signal after saving; running the same command
# resumes it. Distinct from 0 so that `train && export` does not export an unfinished model.
EXIT_PREEMPTED = 75


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


def build_transform(cfg, device_type: str = "cpu") -> MultiCropAugmentation:
    """The multi-crop of cfg.crops; crops.photometric_on=auto leaves the colour steps to the device on a GPU."""
    crops = cfg.crops
    photometric_on = crops.photometric_on
    if photometric_on == "auto":
        photometric_on = "device" if device_type == "cuda" else "loader"
    return MultiCropAugmentation(
        global_size=crops.global_size,
        global_scale=tuple(crops.global_scale),
        local_number=crops.local_number,
        local_size=crops.local_size,
        local_scale=tuple(crops.local_scale),
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
        gram_teacher_size=crops.gram_teacher_size,
        flip_probability=crops.flip_probability,
        color_jitter_probability=crops.color_jitter_probability,
        grayscale_probability=crops.grayscale_probability,
        blur_probabilities=tuple(crops.blur_probabilities),
        solarize_probability=crops.solarize_probability,
        rotation_degrees=crops.rotation_degrees,
        global_number=crops.global_number,
        photometric_on=photometric_on,
    )


def agree_on_run_folder(cfg, run_dir: Path, steps_per_epoch: int, dataset_size: int, dist_info) -> ResumePlan:
    """Rank 0 opens the run folder (lock, checks, config.yaml); every rank learns the outcome, so a refusal
    stops all ranks with the same message instead of leaving them waiting for rank 0."""
    plan, outcome, failure = ResumePlan(), [{}], None
    if dist_info.is_main:
        try:
            plan = open_run_folder(cfg, run_dir, steps_per_epoch, dataset_size)
            outcome = [{"resume": str(plan.path) if plan.path else None}]
        except BaseException as error:
            failure = error
            outcome = [{"error": str(error) if isinstance(error, RunFolderError)
                        else f"rank 0 could not open the run folder ({type(error).__name__}: {error})"}]
    if distributed.is_distributed():
        torch.distributed.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if "error" in outcome[0]:
        raise RunFolderError(outcome[0]["error"])
    if not dist_info.is_main and outcome[0]["resume"]:
        plan = ResumePlan(path=Path(outcome[0]["resume"]))
    return plan


def run_summary(result: dict) -> str:
    """The end-of-run line: time, throughput, final loss and (when measured) the teacher's k-NN."""
    minutes, seconds = divmod(int(result["seconds"]), 60)
    line = (f"summary: {result['steps_done']} steps in {minutes} min {seconds:02d} s, "
            f"{result['images_per_second']:.1f} images/s, final loss {result['final_loss']:.4f}")
    results = result.get("knn", {}).get("results", {})
    knn = next((values for name, values in results.items() if name.startswith("trained ")), {})
    if knn:
        k = "k=20" if "k=20" in knn else next(iter(knn))  # the k the printed table shows
        line += f", k-NN top-1 {knn[k]['top1']:.2f}% ({k})"
    return line


def run(cfg) -> dict:
    """Train in this process (one rank of a job when WORLD_SIZE > 1). Returns status, step and run folder.

    Everything a user can get wrong (config, data, weights, the run folder) is checked before anything is
    written, and refused with an error that names the problem (`ssd.cli.user_errors`)."""
    dist_info = distributed.init_distributed(cfg.train.device)
    setup_logging(dist_info.rank)
    signals.stop_when_launcher_dies()
    check_world_size(cfg, dist_info.world_size)
    seed_everything(cfg.train.seed + dist_info.rank)
    run_dir = resolve_run_dir(cfg, dist_info)
    dataset = build_dataset(cfg.data, cfg.data.split)
    steps = steps_per_epoch(cfg, len(dataset), dist_info.world_size)
    method = build_method(cfg)
    plan = agree_on_run_folder(cfg, run_dir, steps, len(dataset), dist_info)
    training = False
    try:
        if dist_info.is_main:
            log.info("run folder: %s", run_dir.resolve())
        trainer = Trainer(cfg, method, dataset, build_transform(cfg, dist_info.device.type), dist_info, run_dir)
        if plan.path is not None:
            trainer.resume(plan.path, plan.state)
            plan.state = None  # the loaded checkpoint can be a large share of host memory
        elif cfg.train.init_from:
            trainer.initialize_from(cfg.train.init_from)
        if dist_info.is_main:
            log.info("%d images, %d steps per epoch, %d steps in all, global batch %d on %d process(es)",
                     len(dataset), trainer.steps_per_epoch, trainer.schedule.total_steps, cfg.train.batch_size,
                     dist_info.world_size)
            log.info(trainer.schedule.describe())
        training = True
        result = trainer.fit()
        if result["status"] == "finished" and cfg.eval.knn:
            # every process: gathering a sharded (fsdp) network is collective
            networks = {which: (plain_network(backbone, model, dist_info.device), model)
                        for which, (backbone, model) in evaluated_networks(method, cfg).items()}
            if dist_info.is_main:
                from ssd.knn_report import knn_report

                result["knn"] = knn_report(cfg, networks, run_dir, dist_info.device)
            distributed.barrier()
        if dist_info.is_main:
            log.info("%s at step %d; run folder: %s", result["status"], result["step"], run_dir.resolve())
            log.info(run_summary(result))
    except BaseException:
        if not training:
            undo_start(plan, run_dir)
        raise
    finally:
        plan.release()
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
    parser.add_argument("--list-recipes", action="store_true", help="list the recipes with their first comment line")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config (recipe + overrides, validated) and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    return args, args.overrides


def list_recipes() -> str:
    from ssd.config import RECIPES_DIR

    lines = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        lines.append(f"{path.stem:<36} {first}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 finished, 75 (EXIT_PREEMPTED) stopped early by a signal with a checkpoint saved,
    2 a problem with the command's input (config, data, weights, run folder), 1 the run failed."""
    args, overrides = parse_args(argv)
    if args.list_recipes:
        print(list_recipes())
        return 0
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        result = run(cfg)
    except ConfigError as error:
        return report_error(f"config error: {error}", EXIT_USAGE)
    except user_errors(include_checkpoints=False) as error:
        return report_error(f"error: {error}", EXIT_USAGE)
    except (NonFiniteLossError, CheckpointError) as error:
        return report_error(f"error: {error}", 1)
    return EXIT_PREEMPTED if result["status"] == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
