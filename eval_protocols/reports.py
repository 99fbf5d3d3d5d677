"""The JSON layout of evaluation results and the table printed from it.

One function builds the k-NN layout, for both the ``eval_protocols.knn`` command (``--output``) and the end of a
training run (``<run>/knn.json``), so that a script reads either the same way::

    {"protocol": "knn", "weights": ".../checkpoint_00000100.pt", "which": "teacher", "step": 100,
     "arch": "vit_small_patch16_224", "resize": 256, "crop": 224,
     "dataset": "imagefolder", "data_root": "/data/imagenet", "train_split": "train", "test_split": "val",
     "subset": null | {"limit": 1000, "fraction": null, "seed": 0, "available": {"train": .., "test": ..}},
     "on_bad_image": "skip", "max_image_pixels": 50000000,
     "train_size": 1281167, "test_size": 50000, "skipped_images": {"train": 0, "test": 0},
     "ks": [10, 20, 100, 200], "temperature": 0.07, "search": {"backend": "auto", "index": "flat"},
     "results": {"trained teacher": {"k=20": {"top1": 74.1, "top5": 88.9}, ...},
                 "random init (same arch)": {...}, "raw pixels": {...}},
     "seconds": {"trained teacher": {"features": 310.2, "search": 12.5}, ...},
     "date": "2025-01-31T12:00:00"}

Sizes count the images evaluated: after --limit / --fraction and without unreadable images. The linear
protocol shares the header (everything up to ``skipped_images``).
"""

from __future__ import annotations

import datetime


def header(*, protocol: str, weights, which: str, step, arch: str, resize: int, crop: int, dataset: str,
           data_root: str, train_split: str, test_split: str, subset: dict | None, on_bad_image: str,
           max_image_pixels: int) -> dict:
    """What was evaluated, on what, at which input size: the first keys of every report."""
    return {"protocol": protocol, "weights": None if weights is None else str(weights), "which": which,
            "step": step, "arch": arch, "resize": resize, "crop": crop, "dataset": dataset,
            "data_root": str(data_root), "train_split": train_split, "test_split": test_split, "subset": subset,
            "on_bad_image": on_bad_image, "max_image_pixels": max_image_pixels}


def subset_record(limit, fraction, seed: int, available: dict) -> dict | None:
    """None when every image was used; else the options and the split sizes before the cut."""
    if limit is None and fraction is None:
        return None
    return {"limit": limit, "fraction": fraction, "seed": seed, "available": available}


def knn_json(run_header: dict, *, train_size: int, test_size: int, skipped_images: dict, ks, temperature: float,
             search: dict, results: dict, seconds: dict) -> dict:
    """The k-NN report: ``results`` and ``seconds`` are keyed by candidate ("trained teacher", baselines)."""
    return {**run_header, "train_size": train_size, "test_size": test_size, "skipped_images": skipped_images,
            "ks": [int(k) for k in ks], "temperature": temperature, "search": search, "results": results,
            "seconds": seconds, "date": now()}


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def knn_table(report: dict) -> str:
    """Candidates side by side: one row each, one column per k, top-1 then top-5 (percent)."""
    results = report["results"]
    keys = list(next(iter(results.values())))
    width = max(len(name) for name in results) + 2
    lines = [f"k-NN on {report['test_size']} {report['test_split']} images against {report['train_size']} "
             f"{report['train_split']} images (T = {report['temperature']:g}), accuracy in %"]
    for metric, title in (("top1", "top-1"), ("top5", "top-5")):
        lines.append(f"{title:<{width}}" + "".join(f"{key:>9}" for key in keys))
        for name, per_k in results.items():
            lines.append(f"  {name:<{width - 2}}" + "".join(f"{per_k[key][metric]:9.2f}" for key in keys))
    return "\n".join(lines)
