"""k-NN of a run's teacher on its held-out split: where do the trained features stand?

- At the end of a run (eval.knn): frozen teacher features next to the same architecture at random
  initialisation (what training added) and raw pixels (a strong baseline on simple data such as digits),
  printed as a table and written to `<run>/knn.json` in the layout of `eval_protocols.reports`.
- During a run (eval.knn_every_epochs): the teacher alone, at the end of every N-th epoch, into metrics.jsonl
  and TensorBoard: a learning curve of the features.

Both use the same data and view: data.split as the bank, eval.test_split as the queries, the centre crop of
eval.resize_size / eval.crop_size. Unreadable images are left out or stop the report, as data.on_bad_image says.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn

from eval_protocols import reports
from eval_protocols.baselines import RANDOM_INIT, RAW_PIXELS, random_init_backbone, raw_pixels_model, trained_name
from eval_protocols.features import drop_unreadable, extract
from eval_protocols.knn import knn_classify
from eval_protocols.subset import limit_dataset
from ssd.data import build_dataset, eval_transform
from ssd.engine.checkpoint import list_checkpoints, step_of
from ssd.engine.state import capture_rng, restore_rng
from ssd.files import write_text_atomic

log = logging.getLogger("ssd")
SUBSET_SEED = 0  # not the run's seed: runs with different seeds are compared on the same images


def held_out_data(cfg, limit: int = 0) -> dict:
    """The bank (data.split) and the queries (eval.test_split), each cut to ``limit`` images (0: all), and the
    centre-crop view both are seen through."""
    limit = limit or None
    return {"train": limit_dataset(build_dataset(cfg.data, cfg.data.split), limit, None, SUBSET_SEED),
            "test": limit_dataset(build_dataset(cfg.data, cfg.eval.test_split), limit, None, SUBSET_SEED),
            "transform": eval_transform(cfg.eval.resize_size, cfg.eval.crop_size, tuple(cfg.data.mean),
                                        tuple(cfg.data.std))}


def knn_of(backbone: nn.Module, data: dict, cfg, device, shard: bool, search: bool = True) -> tuple[dict, dict, dict]:
    """``(accuracies per k, unreadable images per split, seconds)`` of one model. ``shard``: every process of the
    group extracts a part (all must call); else this process extracts everything alone. ``search=False``: the
    features only (a process that helps extract but leaves the search to the main one); accuracies are {}."""
    started = time.perf_counter()
    features, skipped = {}, {}
    for part in ("train", "test"):
        outputs, labels, readable = extract(
            backbone, data[part], data["transform"], "pooled", batch_size=cfg.eval.batch_size, num_workers=0,
            device=device, progress=False, on_bad_image=cfg.data.on_bad_image,
            how_to_skip="set data.on_bad_image=skip", shard=shard)
        skipped[part] = int((~readable).sum())
        outputs, labels = drop_unreadable(outputs, labels, readable)
        features[part] = (outputs["pooled"], labels)
    extracted = time.perf_counter()
    results = knn_classify(*features["train"], *features["test"], ks=tuple(cfg.eval.knn_k),
                           temperature=cfg.eval.knn_temperature) if search else {}
    seconds = {"features": round(extracted - started, 3), "search": round(time.perf_counter() - extracted, 3)}
    return results, skipped, seconds


def run_header(cfg, run_dir: Path, which: str = "teacher", arch: str | None = None) -> dict:
    """The report header for the run's newest checkpoint (the final one: the network evaluated here)."""
    checkpoints = list_checkpoints(run_dir)
    return reports.header(
        protocol="knn", weights=checkpoints[-1] if checkpoints else None, which=which,
        step=step_of(checkpoints[-1]) if checkpoints else None, arch=arch or cfg.model.arch,
        resize=cfg.eval.resize_size, crop=cfg.eval.crop_size, dataset=cfg.data.dataset, data_root=cfg.data.root,
        train_split=cfg.data.split, test_split=cfg.eval.test_split,
        subset=None, on_bad_image=cfg.data.on_bad_image,
        max_image_pixels=cfg.data.max_image_pixels)


def knn_candidates(cfg, networks: dict) -> dict[str, nn.Module]:
    """Table rows: each trained network, its architecture at the run's initial weights, and raw pixels. With
    several networks (students of a multi-student run) each random-init row names whose architecture it is."""
    from ssd.checkpoint_import import model_config

    candidates = {}
    for which, (backbone, _) in networks.items():
        candidates[trained_name(which)] = backbone
    for which, (_, model) in networks.items():
        name = RANDOM_INIT if len(networks) == 1 else f"random init ({which}'s arch)"
        candidates[name] = random_init_backbone(model_config(model), cfg.train.seed)
    candidates[RAW_PIXELS] = raw_pixels_model()
    return candidates


def knn_report(cfg, networks: dict, run_dir: Path, device: torch.device) -> dict:
    """The end-of-run table and `<run>/knn.json` for the trained `networks` ({which: (backbone, model config
    dict)}: the EMA teacher, the student of a fixed teacher, or each student of a multi-student run). Runs on
    one process (rank 0) while the others wait."""
    data = held_out_data(cfg)
    which = ", ".join(networks)
    log.info("end-of-run k-NN: %d training and %d held-out images (split %r) at resize %d / crop %d, k in %s, for "
             "the trained %s, the same architecture at random init, and raw pixels", len(data["train"]),
             len(data["test"]), cfg.eval.test_split, cfg.eval.resize_size, cfg.eval.crop_size, list(cfg.eval.knn_k), which)
    results, seconds = {}, {}
    for name, model in knn_candidates(cfg, networks).items():
        results[name], skipped, seconds[name] = knn_of(model, data, cfg, device, shard=False)
        log.info("k-NN %-22s %s", name, "  ".join(f"{k}: {v['top1']:.1f}%" for k, v in results[name].items()))
    arch = ", ".join(dict.fromkeys(model["arch"] for _, model in networks.values()))
    report = reports.knn_json(
        run_header(cfg, run_dir, which, arch), train_size=len(data["train"]) - skipped["train"],
        test_size=len(data["test"]) - skipped["test"], skipped_images=skipped, ks=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature, search={"backend": "auto", "index": "flat"}, results=results,
        seconds=seconds)
    write_text_atomic(Path(run_dir) / "knn.json", json.dumps(report, indent=2) + "\n")
    print("\n" + reports.knn_table(report))
    if any(skipped.values()):
        print(f"  unreadable images left out: {skipped['train']} training, {skipped['test']} held-out")
    print(f"results: {Path(run_dir) / 'knn.json'}\n")
    return report


class PeriodicKnn:
    """eval.knn_every_epochs > 0: the evaluated network's k-NN at the end of every N-th epoch (no baselines: they do not
    change during training), on at most eval.knn_limit images per split.

    Every process extracts a shard of the features and the main process searches, so all processes must call
    it together. The RNG states are put back afterwards: a data loader draws a seed from the global generator,
    and drop-path masks drawn after it would otherwise differ from a run without this k-NN (or a resumed one)."""

    def __init__(self, cfg, steps_per_epoch: int, device: torch.device, is_main: bool, which: str = "teacher"):
        self.cfg, self.device, self.is_main = cfg, device, is_main
        self.which = which  # the network evaluated: the EMA teacher, or the student of a fixed teacher
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = cfg.eval.knn_every_epochs * steps_per_epoch
        self.data = None  # built at the first evaluation: a run without one pays nothing

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def __call__(self, backbone: nn.Module, step: int) -> dict:
        """The values to log at ``step`` on the main process ({} on the others)."""
        rng = capture_rng()
        try:
            if self.data is None:
                self.data = held_out_data(self.cfg, self.cfg.eval.knn_limit)
            results, skipped, seconds = knn_of(backbone, self.data, self.cfg, self.device, shard=True,
                                               search=self.is_main)
        finally:
            restore_rng([rng], 0)
        if not self.is_main:
            return {}
        sizes = {part: len(self.data[part]) - skipped[part] for part in ("train", "test")}
        epoch = step // self.steps_per_epoch
        limit = f", eval.knn_limit={self.cfg.eval.knn_limit}" if self.cfg.eval.knn_limit else ""
        log.info("k-NN of the %s after epoch %d (step %d) on %d held-out images against %d training images%s: "
                 "top-1 %s (%.1f s)", self.which, epoch, step, sizes["test"], sizes["train"], limit,
                 "  ".join(f"{k} {v['top1']:.1f}%" for k, v in results.items()), sum(seconds.values()))
        values = {"epoch": epoch, "knn_train_images": sizes["train"], "knn_test_images": sizes["test"],
                  "knn_seconds": round(sum(seconds.values()), 3)}
        for k, accuracy in results.items():
            values[f"knn_top1_{k.replace('=', '')}"] = accuracy["top1"]
            values[f"knn_top5_{k.replace('=', '')}"] = accuracy["top5"]
        return values
