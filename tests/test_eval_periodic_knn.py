"""eval.knn_every_epochs: the teacher's k-NN at epoch ends during training, logged to metrics.jsonl and
TensorBoard, without changing what training computes (a run with it ends bitwise equal to one without)."""

from __future__ import annotations

import json
import subprocess

import pytest

from ssd.config import ConfigError, load_config
from tests import tiny

# 35 digits, 4 steps per epoch, 5 epochs: a k-NN after epochs 2 and 4 (steps 8 and 16), 40 held-out images.
PERIODIC = ("eval.knn_every_epochs=2", "eval.knn_limit=40", "eval.knn_k=[5]", "eval.resize_size=32",
            "eval.crop_size=32")


def start(overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(tiny.train_command(overrides), cwd=tiny.REPO, env=tiny.subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_periodic_knn_is_logged_and_leaves_training_bitwise_unchanged(tmp_path):
    # drop_path_rate=0.1 (tiny's): a random draw shifted by the k-NN would change the weights.
    runs = {"without": start(tiny.tiny_overrides(tmp_path, "without", "log.tensorboard=true")),
            "with": start(tiny.tiny_overrides(tmp_path, "with", "log.tensorboard=true", *PERIODIC))}
    outputs = {name: process.communicate(timeout=300) for name, process in runs.items()}
    for name, process in runs.items():
        assert process.returncode == 0, outputs[name][1][-3000:]
    tiny.assert_bitwise_equal(tiny.final_weights(tmp_path / "with"), tiny.final_weights(tmp_path / "without"))

    log = outputs["with"][1]
    assert "k-NN of the teacher after epoch 2 (step 8) on 40 held-out images against 35 training images, " \
           "eval.knn_limit=40: top-1 k=5" in log
    assert "k-NN of the teacher" not in outputs["without"][1]
    records = [json.loads(line) for line in (tmp_path / "with" / "metrics.jsonl").read_text().splitlines()]
    knn_records = [record for record in records if "knn_top1_k5" in record]
    assert [record["step"] for record in knn_records] == [8, 16]
    assert all(0 <= record["knn_top1_k5"] <= 100 and record["knn_test_images"] == 40 for record in knn_records)
    assert records[-1]["step"] == 20 and "loss" in records[-1]  # training lines go on as before

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "with" / "tb")).Reload()
    assert [event.step for event in board.Scalars("eval/knn_top1_k5")] == [8, 16]


def test_two_processes_extract_together_and_the_main_one_logs(tmp_path):
    overrides = tiny.tiny_overrides(tmp_path, "ddp", "train.max_steps=8", *PERIODIC[1:], "eval.knn_every_epochs=1")
    result = tiny.run_training(overrides, nproc=2, timeout=240)
    assert "on 2 process(es)" in result.stderr
    # 2 processes x 4 images per step: 4 steps per epoch, a k-NN at steps 4 and 8, logged once each.
    assert result.stderr.count("k-NN of the teacher after epoch") == 2
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "knn_top1_k5" in record] == [4, 8]


@pytest.mark.parametrize("key", ["eval.knn_every_epochs=-1", "eval.knn_limit=-5"])
def test_negative_values_are_refused(key):
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        load_config(None, [key])


def test_crop_size_must_fit_the_patches_when_periodic_knn_is_on():
    with pytest.raises(ConfigError, match="eval.crop_size"):
        load_config(None, ["model.patch_size=16", "eval.crop_size=40", "eval.knn_every_epochs=1"])


def test_a_run_with_a_fixed_teacher_says_it_evaluates_the_student(tmp_path):
    """A random (or frozen) teacher never changes: the network evaluated, and named, is the student."""
    overrides = tiny.tiny_overrides(tmp_path, "random", "train.max_steps=4", "teacher.kind=random", *PERIODIC[1:],
                                    "eval.knn_every_epochs=1")
    result = tiny.run_training(overrides)
    assert "k-NN of the student after epoch 1 (step 4)" in result.stderr
    assert "k-NN of the teacher" not in result.stderr
