"""--baselines: the k-NN and linear commands evaluate, beside the weights, the same architecture at random
initialisation and raw pixels, printed side by side and kept in the JSON; --limit makes it seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from eval_protocols import knn, linear

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "drop_path_rate": 0.0,
        "timm_kwargs": {"depth": 2}}


def save_backbone_checkpoint(run_dir: Path, backbone: torch.nn.Module, config: dict, step: int) -> Path:
    """A real ssd checkpoint at ``step`` whose teacher and student are ``backbone``."""
    from ssd.engine.checkpoint import save_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    state = backbone.state_dict()
    return save_checkpoint(run_dir / f"checkpoint_{step:08d}.pt", {
        "config": config, "step": step, "epoch": 0,
        "method": {f"{role}.backbone.{k}": v for role in ("teacher", "student") for k, v in state.items()},
    })


def tiny_checkpoint(run_dir: Path, seed: int, step: int = 7) -> Path:
    """A checkpoint of a 2-block ViT built under ``seed``, recording 32 px eval sizes."""
    from ssd.config import ModelConfig
    from ssd.models.backbone import build_backbone

    model_cfg = ModelConfig(**TINY)
    torch.manual_seed(seed)
    config = {"model": dataclasses.asdict(model_cfg), "data": {"mean": [0.5] * 3, "std": [0.25] * 3},
              "eval": {"resize_size": 32, "crop_size": 32}}
    return save_backbone_checkpoint(run_dir, build_backbone(model_cfg), config, step)


COMMON = ["--dataset", "digits", "--limit", "100", "--num-workers", "0", "--device", "cpu", "--batch-size", "100"]


def test_knn_with_both_baselines_on_a_digits_subset(tmp_path, capsys):
    # The weights are the architecture's initialisation under seed 0, so the random-init baseline (--seed 0)
    # must reproduce them exactly: the baseline is the same architecture, not merely a similar one.
    tiny_checkpoint(tmp_path / "run", seed=0)
    report = knn.main([str(tmp_path / "run"), *COMMON, "--ks", "5", "20", "--baselines",
                       "--output", str(tmp_path / "knn.json")])
    names = ["trained teacher", "random init (same arch)", "raw pixels"]
    assert list(report["results"]) == names and list(report["seconds"]) == names
    assert report["results"]["random init (same arch)"] == report["results"]["trained teacher"]
    assert report["results"]["raw pixels"]["k=5"]["top1"] > 80  # digits: pixels are a strong baseline
    assert all(timing["features"] > 0 and timing["search"] >= 0 for timing in report["seconds"].values())
    assert report["train_size"] == report["test_size"] == 100  # 10 per class from each split
    assert report["subset"] == {"limit": 100, "fraction": None, "seed": 0, "available": {"train": 1437, "test": 360}}
    assert json.loads((tmp_path / "knn.json").read_text())["results"] == report["results"]
    printed = capsys.readouterr().out
    table = printed[printed.index("k-NN on 100 test images"):]
    for name in names:  # one row per candidate, side by side, in top-1 and in top-5
        assert table.count(f"  {name} ") == 2, table


def test_linear_with_the_raw_pixels_baseline(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "run", seed=1)
    report = linear.main([str(tmp_path / "run"), *COMMON, "--mode", "fast", "--epochs", "3", "--lrs", "0.01", "1",
                          "--baselines", "raw-pixels"])
    assert list(report["results"]) == ["trained teacher", "raw pixels"]
    pixels = report["results"]["raw pixels"]
    # Raw pixels have no blocks or patch tokens: one row per learning rate.
    assert [row["name"] for row in pixels["grid"]] == ["lr=0.01 blocks=1 avgpool=0", "lr=1 blocks=1 avgpool=0"]
    assert len(report["results"]["trained teacher"]["grid"]) == 8
    assert report["subset"]["limit"] == 100 and report["train_size"] + report["val_size"] == 100
    printed = capsys.readouterr().out
    comparison = printed[printed.index("test accuracy (%)"):]
    assert "trained teacher" in comparison and "raw pixels" in comparison
