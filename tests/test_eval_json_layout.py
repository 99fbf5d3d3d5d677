"""One layout for k-NN results: a run's knn.json (end of training) and the knn command's --output JSON come from
the same function, so the same weights and data give the same document (up to timings and date)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from eval_protocols import knn
from tests.test_eval_baselines import TINY, save_backbone_checkpoint


def digits_image_folder(root: Path, per_class: dict) -> Path:
    """root/<split>/<digit>/<n>.png: real PNG files of the first images of each digit in each split."""
    from ssd.data import DigitsDataset

    for split, count in per_class.items():
        digits, saved = DigitsDataset(split), {}
        for index, label in enumerate(digits.targets):
            if saved.get(label, 0) < count:
                (root / split / str(label)).mkdir(parents=True, exist_ok=True)
                digits.load(index)[0].save(root / split / str(label) / f"{index}.png")
                saved[label] = saved.get(label, 0) + 1
    return root


@pytest.fixture
def finished_run(tmp_path) -> tuple:
    """A config as a run on an image folder would have it and its final checkpoint (step 12), teacher = a
    seeded tiny ViT."""
    from ssd.config import Config, ModelConfig
    from ssd.models.backbone import build_backbone

    cfg = Config()
    cfg.model = ModelConfig(**TINY)
    cfg.data.dataset = "imagefolder"
    cfg.data.root = str(digits_image_folder(tmp_path / "digits", {"train": 12, "test": 6}))
    cfg.eval.resize_size, cfg.eval.crop_size, cfg.eval.batch_size, cfg.eval.knn_k = 32, 32, 128, [5, 20]
    torch.manual_seed(3)
    teacher = build_backbone(cfg.model)
    save_backbone_checkpoint(tmp_path / "run", teacher, dataclasses.asdict(cfg), step=12)
    return cfg, teacher, tmp_path / "run"


def test_end_of_run_report_and_command_write_the_same_document(finished_run, tmp_path):
    from ssd.knn_report import knn_report

    cfg, teacher, run_dir = finished_run
    from_run = knn_report(cfg, {"teacher": (teacher, dataclasses.asdict(cfg.model))}, run_dir, torch.device("cpu"))
    written = json.loads((run_dir / "knn.json").read_text())
    assert written == from_run
    from_command = knn.main([str(run_dir), "--dataset", "imagefolder", "--data-root", cfg.data.root, "--ks", "5",
                             "20", "--baselines", "--num-workers", "0", "--device", "cpu", "--batch-size", "128",
                             "--output", str(tmp_path / "knn.json")])
    assert list(from_command) == list(from_run)  # the same keys in the same order
    for key in from_run:
        if key in ("seconds", "date", "weights"):
            continue
        if key == "results":
            for name, per_k in from_run["results"].items():  # same features up to float summation order
                for k, accuracy in per_k.items():
                    assert from_command["results"][name][k] == pytest.approx(accuracy, abs=0.6), (name, k)
            continue
        assert from_command[key] == from_run[key], key
    assert Path(from_command["weights"]).resolve() == Path(from_run["weights"]).resolve() == (
        run_dir / "checkpoint_00000012.pt").resolve()
    assert from_run["step"] == 12 and from_run["test_size"] == 60 and from_run["subset"] is None
    assert set(from_run["seconds"]) == set(from_run["results"]) == {
        "trained teacher", "random init (same arch)", "raw pixels"}


def test_training_summary_reads_the_layout():
    from ssd.train import run_summary

    report = {"results": {"trained teacher": {"k=10": {"top1": 50.0, "top5": 90.0},
                                              "k=20": {"top1": 61.25, "top5": 93.0}}}}
    line = run_summary({"seconds": 65, "steps_done": 20, "images_per_second": 12.5, "final_loss": 1.5,
                        "knn": report})
    assert line.endswith("k-NN top-1 61.25% (k=20)")
