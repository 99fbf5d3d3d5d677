"""Evaluation reads the run: without --resize/--crop the protocols use the sizes the weights record (a run's
eval.resize_size / eval.crop_size, an export's input size and crop fraction) and say what they evaluate."""

from __future__ import annotations

import json

from eval_protocols import knn
from ssd.export import main as export
from tests.tiny import run_training, tiny_overrides


def test_knn_takes_sizes_from_the_run_and_from_its_export(tmp_path, capsys):
    run_training(tiny_overrides(tmp_path, "run", "train.max_steps=2", "eval.resize_size=40", "eval.crop_size=32"))
    common = ["--dataset", "digits", "--ks", "5", "--num-workers", "0", "--device", "cpu"]
    knn.main([str(tmp_path / "run"), *common, "--output", str(tmp_path / "run.json")])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "run.json").read_text())
    assert (report["resize"], report["crop"]) == (40, 32)
    assert "at resize 40 / crop 32 (as the weights record)" in printed and "step 2" in printed
    assert "vit_tiny_patch16_224" in printed

    export([str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    knn.main([str(tmp_path / "export"), *common, "--output", str(tmp_path / "export.json")])
    exported = json.loads((tmp_path / "export.json").read_text())
    assert exported["crop"] == 32  # the export records the model's input size and timm's crop fraction

    knn.main([str(tmp_path / "run"), *common, "--resize", "36", "--crop", "24", "--output", str(tmp_path / "x.json")])
    assert (json.loads((tmp_path / "x.json").read_text())["crop"]) == 24  # what the user gives wins
