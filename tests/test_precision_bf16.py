"""bf16 autocast, the GPU default (train.precision=auto), run on CPU for every method: CI has no GPU, so this is
where the mixed-precision path of each forward (heads, masks, predictors, fixed teachers, elastic slices) runs.

Each method trains 3 steps from the command line under `train.precision=bf16`; the losses stay finite and the
weights stay fp32 (autocast computes in bf16, the optimizer keeps fp32 parameters)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.test_method_dinov3 import DINOV3
from tests.test_methods_distill import FEATURES, MASKED
from tests.test_methods_jepa import JEPA, MAE
from tests.test_methods_masked import DINOV2, IBOT
from tests.test_methods_multi_distill import MULTI, students_override
from tests.test_methods_poa import POA
from tests.tiny import final_weights, run_training, tiny_overrides

RANDOM_TEACHER = ("teacher.kind=random",)
METHODS = {
    "dino": (),
    "ibot": IBOT,
    "dinov2": DINOV2,
    "dinov3": DINOV3,
    "ijepa": JEPA,
    "mae": MAE,
    "ijepa_random_teacher": (*JEPA, *RANDOM_TEACHER),
    # A ViT student here: a resnet10t student under CPU bf16 autocast got a garbage gradient (NaN or 1e17 in
    # layer4.0.conv1, where 16 px crops are 1 x 1) in about 1 run of 3 with identical losses, an uninitialised
    # read in torch's CPU bf16 backward, not in this code (investigation in the issue note).
    "feature_distill": (FEATURES[0], *RANDOM_TEACHER),
    "masked_kd": (*MASKED, "model.patch_size=8", *RANDOM_TEACHER),
    "poa": POA,
    "multi_distill": (*MULTI, students_override(), *RANDOM_TEACHER),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_under_bf16_autocast(tmp_path, name):
    result = run_training(tiny_overrides(tmp_path, "run", *METHODS[name], "train.precision=bf16",
                                         "train.max_steps=3", "log.every_steps=1"))
    assert "precision: bfloat16 autocast on cpu" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    weights = final_weights(tmp_path / "run")
    floats = [value for value in weights.values() if value.is_floating_point()]
    assert all(value.dtype == torch.float32 for value in floats)
    assert all(torch.isfinite(value).all() for value in floats)
