"""k-NN report at the end of a run: where do the trained features stand?

Frozen teacher features are compared with the same architecture at random initialisation (what training
added) and with raw pixels (a strong baseline on simple data such as digits). Written to `<run>/knn.json`.
Unreadable images are left out of both splits or stop the report, as data.on_bad_image says for training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from eval_protocols.features import drop_unreadable, extract
from eval_protocols.knn import knn_classify
from ssd.data import build_dataset, eval_transform
from ssd.files import write_text_atomic
from ssd.models.backbone import build_backbone

log = logging.getLogger("ssd")


def _readable_features(backbone, dataset, transform, cfg, device, skipped: dict, split: str):
    """Pooled features and labels of the readable images; how many were left out goes into ``skipped``."""
    outputs, labels, readable = extract(backbone, dataset, transform, "pooled", batch_size=cfg.eval.batch_size,
                                        num_workers=0, device=device, on_bad_image=cfg.data.on_bad_image,
                                        how_to_skip="set data.on_bad_image=skip")
    skipped[split] = int((~readable).sum())
    outputs, labels = drop_unreadable(outputs, labels, readable)
    return outputs["pooled"], labels


def _accuracies(name, backbone, train_set, test_set, transform, cfg, device, skipped: dict) -> dict:
    backbone = backbone.to(device).eval()
    train_features, train_labels = _readable_features(backbone, train_set, transform, cfg, device, skipped, "train")
    test_features, test_labels = _readable_features(backbone, test_set, transform, cfg, device, skipped, "test")
    results = knn_classify(train_features, train_labels, test_features, test_labels,
                           ks=tuple(cfg.eval.knn_k), temperature=cfg.eval.knn_temperature)
    log.info("k-NN %-22s %s", name, "  ".join(f"{k}: {v['top1']:.1f}%" for k, v in results.items()))
    return results


def knn_report(cfg, teacher_backbone: nn.Module, run_dir: Path, device: torch.device) -> dict:
    train_set = build_dataset(cfg.data, cfg.data.split)
    test_set = build_dataset(cfg.data, cfg.eval.test_split)
    transform = eval_transform(cfg.eval.resize_size, cfg.eval.crop_size, tuple(cfg.data.mean), tuple(cfg.data.std))
    log.info("end-of-run k-NN: %d training and %d held-out images (split %r) at resize %d / crop %d, k in %s, for "
             "the trained teacher, the same architecture at random init, and raw pixels", len(train_set),
             len(test_set), cfg.eval.test_split, cfg.eval.resize_size, cfg.eval.crop_size, list(cfg.eval.knn_k))
    torch.manual_seed(cfg.train.seed)  # the random-init baseline is the run's own initial weights
    candidates = {
        "trained teacher": teacher_backbone,
        "random init (same arch)": build_backbone(cfg.model),
        "raw pixels": nn.Flatten(),
    }
    skipped = {}  # the same for every candidate: the images are the same
    accuracies = {name: _accuracies(name, model, train_set, test_set, transform, cfg, device, skipped)
                  for name, model in candidates.items()}
    report = {**accuracies, "skipped_images": skipped}
    write_text_atomic(Path(run_dir) / "knn.json", json.dumps(report, indent=2))
    k = "k=20" if "k=20" in report["raw pixels"] else next(iter(report["raw pixels"]))
    test_size = len(test_set) - skipped["test"]
    print(f"\nk-NN top-1 accuracy on the held-out split ({test_size} images, {k}):")
    for name, results in accuracies.items():
        print(f"  {name:<24} {results[k]['top1']:6.2f}%")
    if any(skipped.values()):
        print(f"  unreadable images left out: {skipped['train']} training, {skipped['test']} held-out")
    print(f"results: {Path(run_dir) / 'knn.json'}\n")
    return report
