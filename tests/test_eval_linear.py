"""Linear probe: validation split, the grid of heads trained at once, model selection, and the commands
(k-NN and linear, sharing one feature cache) on a small real CIFAR-10 ImageFolder."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from eval_protocols import knn, linear
from eval_protocols.linear_heads import LinearGrid, Setting, linear_input, make_grid
from eval_protocols.linear_training import cached_batches, select_and_test, split_train_val, train_grid


def test_validation_split_is_stratified_disjoint_and_seeded():
    labels = [i % 5 for i in range(200)]
    train, val = split_train_val(labels, 0.1, seed=3)
    assert len(val) == 20 and sorted(train + val) == list(range(200))
    assert sorted(labels[i] for i in val) == sorted(list(range(5)) * 4)  # 4 per class
    assert split_train_val(labels, 0.1, seed=3) == (train, val)
    assert split_train_val(labels, 0.1, seed=4)[1] != val


def synthetic_tokens(count: int, seed: int):
    """ViT-like outputs whose class shows only in the mean patch token (so avgpool settings should win)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, (count,), generator=generator)
    patch_mean = torch.randn(count, 8, generator=generator)
    patch_mean[torch.arange(count), labels] += 3.0
    outputs = {"cls": torch.randn(count, 4, 8, generator=generator), "patch_mean": patch_mean}
    return outputs, labels


def test_linear_input_concatenates_like_dinov2():
    outputs, _ = synthetic_tokens(5, 0)
    features = linear_input(outputs, n_last_blocks=2, avgpool=True)
    torch.testing.assert_close(features, torch.cat([outputs["cls"][:, 2], outputs["cls"][:, 3],
                                                    outputs["patch_mean"]], dim=1))
    assert linear_input({"pooled": torch.ones(5, 3)}, 4, True).shape == (5, 3)  # non-ViT: pooled only
    assert len(make_grid((0.1, 1.0), has_tokens=False)) == 2


def test_heads_trained_together_equal_heads_trained_alone():
    outputs, labels = synthetic_tokens(64, 1)
    batches = cached_batches(outputs, labels, batch_size=16, seed=0)
    settings = [Setting(0.5, 1, False), Setting(0.1, 4, True)]
    torch.manual_seed(0)
    together = LinearGrid(settings, outputs, 3)
    torch.manual_seed(0)
    alone = LinearGrid(settings[:1], outputs, 3)
    for grid in (together, alone):
        train_grid(grid, batches, epochs=3, steps_per_epoch=4, lr_scale=1.0, device=torch.device("cpu"))
    torch.testing.assert_close(together.heads[0].weight, alone.heads[0].weight)


def test_best_setting_is_chosen_on_validation_and_reported_on_test():
    train, train_labels = synthetic_tokens(300, 2)
    val, test = synthetic_tokens(100, 3), synthetic_tokens(100, 4)
    settings = make_grid(lrs=(1e-4, 1.0), n_last_blocks=(1, 4))
    torch.manual_seed(0)
    grid = LinearGrid(settings, train, 3)
    train_grid(grid, cached_batches(train, train_labels, 32, 0), epochs=20, steps_per_epoch=10,
               lr_scale=1.0, device=torch.device("cpu"))
    report = select_and_test(grid, val, test, torch.device("cpu"))
    assert len(report["grid"]) == 8 and all("val_top1" in row for row in report["grid"])
    best = report["best"]
    assert best["val_top1"] == max(row["val_top1"] for row in report["grid"])
    assert best["avgpool"] and best["lr_per_256"] == 1.0  # the only features that carry the class, a usable lr
    assert best["test_top1"] > 80 and "test_top1" not in report["grid"][0]


@pytest.fixture(scope="module")
def small_cifar(cifar10_root, tmp_path_factory):
    """A real ImageFolder copy of 40 training and 10 test CIFAR-10 images per class."""
    root = tmp_path_factory.mktemp("cifar_small")
    for split, count in (("train", 40), ("test", 10)):
        for class_folder in sorted((cifar10_root / split).iterdir()):
            (root / split / class_folder.name).mkdir(parents=True)
            for image in sorted(class_folder.iterdir())[:count]:
                shutil.copy(image, root / split / class_folder.name / image.name)
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ssd.config import ModelConfig
    from ssd.engine.checkpoint import save_checkpoint
    from ssd.models.backbone import build_backbone

    model_cfg = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path_rate=0.0,
                            timm_kwargs={"depth": 4})
    torch.manual_seed(0)
    state = build_backbone(model_cfg).state_dict()
    run_dir = tmp_path_factory.mktemp("run")
    save_checkpoint(run_dir / "checkpoint_00000005.pt", {
        "config": {"model": dataclasses.asdict(model_cfg), "data": {"mean": [0.49, 0.48, 0.45],
                                                                     "std": [0.25, 0.24, 0.26]}},
        "step": 5, "epoch": 0,
        "method": {f"{role}.backbone.{k}": v for role in ("teacher", "student") for k, v in state.items()},
    })
    return run_dir


def test_knn_and_fast_linear_commands_share_the_feature_cache(small_cifar, tiny_run, tmp_path):
    common = [str(tiny_run), "--dataset", "imagefolder", "--data-root", str(small_cifar), "--resize", "32",
              "--crop", "32", "--num-workers", "0", "--batch-size", "100", "--cache-dir", str(tmp_path / "cache")]
    knn.main(common + ["--ks", "5", "20", "--output", str(tmp_path / "knn.json")])
    knn_report = json.loads((tmp_path / "knn.json").read_text())
    knn_results = knn_report["results"]["trained teacher"]
    assert set(knn_results) == {"k=5", "k=20"} and knn_report["test_size"] == 100
    assert 10 < knn_results["k=20"]["top1"] < 60  # random ViT on 400 images: above chance
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 2  # train and test splits

    linear.main(common + ["--mode", "fast", "--epochs", "5", "--lrs", "0.01", "1.0",
                          "--output", str(tmp_path / "linear.json")])
    assert sorted((tmp_path / "cache").iterdir()) == cached  # reused, not re-extracted
    report = json.loads((tmp_path / "linear.json").read_text())
    result = report["results"]["trained teacher"]
    assert len(result["grid"]) == 8 and report["train_size"] == 360 and report["val_size"] == 40
    assert result["best"]["name"] in {row["name"] for row in result["grid"]}
    assert 0 <= result["best"]["test_top1"] <= 100 and report["mode"] == "fast"


def test_full_linear_protocol_runs_on_augmented_images(small_cifar, tiny_run, tmp_path):
    report = linear.main([str(tiny_run), "--dataset", "imagefolder", "--data-root", str(small_cifar), "--resize",
                          "32", "--crop", "32", "--num-workers", "0", "--batch-size", "64", "--mode", "full",
                          "--epochs", "1", "--lrs", "0.1", "--n-last-blocks", "1", "--avgpool", "off"])
    assert [row["name"] for row in report["results"]["trained teacher"]["grid"]] == ["lr=0.1 blocks=1 avgpool=0"]
    assert report["lr_scale"] == 0.25 and report["val_size"] == 40
