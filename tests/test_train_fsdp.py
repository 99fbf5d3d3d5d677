"""train.parallel=fsdp (FSDP2) on 2 gloo processes: the same training as DDP, checkpoints (sharded folders, or
single files of gathered tensors) that resume at 2 processes bitwise and at 1 process (unsharded), and
evaluation and export that read the gathered weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.test_methods_masked import DINOV2
from tests.test_train_ddp import SAME
from tests.tiny import assert_bitwise_equal, final_weights, run_training, tiny_overrides

FSDP = ("train.parallel=fsdp",)
# As in test_methods_masked: KoLeo off (it turns float rounding at random init into O(1) changes).
MASKED = (*DINOV2, "method.koleo_weight=0", "method.mask_probability=0.75")


@pytest.mark.slow
@pytest.mark.parametrize("method", [(), MASKED, ("teacher.kind=random",)], ids=["dino", "dinov2", "random_teacher"])
def test_fsdp_trains_as_ddp(tmp_path, method):
    """Sharded weights, gradients and AdamW moments, the same updates: DDP's weights within float tolerance, and
    the logged losses too. Each process writes its own half of the checkpoint; read whole, it has DDP's layout."""
    run_training(tiny_overrides(tmp_path, "ddp", *SAME, *method), nproc=2)
    result = run_training(tiny_overrides(tmp_path, "fsdp", *SAME, *method, *FSDP), nproc=2)
    assert "train.parallel=fsdp: 5 FSDP2 units over 2 processes" in result.stderr  # 2 x 2 blocks + the root
    ddp, fsdp = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys()
    folder = tmp_path / "fsdp" / "checkpoint_00000006.dcp"
    sizes = [(folder / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    assert max(sizes) < 0.6 * sum(sizes), sizes  # no process wrote (or gathered) the whole state
    state = checkpoint_state(tmp_path / "fsdp", 6)
    tensors = [*state["method"].values(), *(v for entries in state["optimizer"]["state"].values()
                                            for v in entries.values())]
    assert all(type(t) is torch.Tensor for t in tensors if torch.is_tensor(t))  # whole tensors, no DTensor
    for name in ddp:
        assert fsdp[name].shape == ddp[name].shape, name
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-5, atol=1e-6, msg=name)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("ddp", "fsdp")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def checkpoint_state(run_dir, step: int) -> dict:
    """The checkpoint of `step`, file or sharded folder, with whole tensors."""
    from ssd.engine.checkpoint import checkpoint_path, load_checkpoint

    path = checkpoint_path(run_dir, step)
    return load_checkpoint(path if path.exists() else checkpoint_path(run_dir, step, sharded=True), whole=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sharded", "file"])
def test_an_fsdp_checkpoint_resumes_at_two_processes_bitwise_and_at_one(tmp_path, kind):
    """Saved at 2 processes (each writing its slices, or process 0 a gathered file), resumed at 2 with FSDP bit
    for bit, at 1 process, and at 2 with DDP."""
    from ssd.engine.checkpoint import checkpoint_path

    same = (*SAME, *FSDP, "checkpoint.keep=0", f"checkpoint.format={kind}")
    run_training(tiny_overrides(tmp_path, "whole", *same), nproc=2)
    assert checkpoint_path(tmp_path / "whole", 6, sharded=kind == "sharded").exists()
    optimizer = checkpoint_state(tmp_path / "whole", 3)["optimizer"]
    reference = checkpoint_state(tmp_path / "whole", 6)
    numbered = [p for group in optimizer["param_groups"] for p in group["params"]]
    assert numbered == list(range(len(numbered)))  # Optimizer.state_dict()'s own layout, as DDP writes it
    assert set(optimizer["state"]) <= set(numbered) and len(optimizer["state"]) >= len(numbered) - 2  # last layer
    assert optimizer["state"][0]["exp_avg"].shape == reference["method"]["student.backbone.cls_token"].shape
    for processes, parallel in ((2, "fsdp"), (1, "fsdp"), (2, "ddp")):
        resumed = tmp_path / f"resumed{processes}{parallel}"
        shutil.copytree(tmp_path / "whole", resumed)
        remove(checkpoint_path(resumed, 6, sharded=kind == "sharded"))  # the run stopped after step 3
        result = run_training(tiny_overrides(tmp_path, resumed.name, *same, f"train.parallel={parallel}"),
                              nproc=processes)
        assert "resumed from" in result.stderr and "at step 3" in result.stderr
        if (processes, parallel) == (2, "fsdp"):
            assert_bitwise_equal(final_weights(resumed), final_weights(tmp_path / "whole"))
            moments = checkpoint_state(resumed, 6)["optimizer"]["state"]
            assert all(torch.equal(moments[i]["exp_avg"], reference["optimizer"]["state"][i]["exp_avg"])
                       for i in moments)
        else:  # unsharded: another reduction order, the same training
            for name, value in final_weights(tmp_path / "whole").items():
                torch.testing.assert_close(final_weights(resumed)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def remove(path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.slow
def test_fsdp_run_evaluates_and_exports_the_gathered_network(tmp_path):
    from ssd.export import load_export
    from ssd.export import main as export

    knn = ("eval.knn=true", "eval.knn_k=[5]", "eval.resize_size=32", "eval.crop_size=32", "eval.knn_every_epochs=1",
           "eval.knn_limit=40")
    run_training(tiny_overrides(tmp_path, "run", *SAME, *FSDP, *knn), nproc=2)
    report = json.loads((tmp_path / "run" / "knn.json").read_text())
    assert 0 < report["results"]["trained teacher"]["k=5"]["top1"] <= 100
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1_k5" in record for record in logged)  # the periodic k-NN ran on the gathered teacher
    out = export([str(tmp_path / "run"), "--output", str(tmp_path / "export")])
    model = load_export(out).eval()
    weights = final_weights(tmp_path / "run")
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[f"teacher.backbone.{key}"]), key


@pytest.mark.slow
def test_fsdp_with_compiled_blocks_trains_as_eager(tmp_path):
    """train.compile=true compiles each block before fully_shard wraps it: the same training as eager FSDP."""
    run_training(tiny_overrides(tmp_path, "eager", *SAME, *FSDP), nproc=2)
    result = run_training(tiny_overrides(tmp_path, "compiled", *SAME, *FSDP, "train.compile=true"), nproc=2,
                          timeout=600)
    assert "4 transformer blocks compiled one by one" in result.stderr and "5 FSDP2 units" in result.stderr
    eager, compiled = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_bf16_parameters_keep_fp32_master_weights(tmp_path):
    """train.fsdp_bf16_params: blocks compute with bf16 copies of the weights, gradients are reduced in fp32 and
    the sharded weights, optimizer state and checkpoint stay fp32; the losses follow the fp32 run closely."""
    run_training(tiny_overrides(tmp_path, "fp32", *SAME, *FSDP), nproc=2)
    result = run_training(tiny_overrides(tmp_path, "bf16", *SAME, *FSDP, "train.fsdp_bf16_params=true"), nproc=2)
    assert "(bf16 parameters, fp32 gradient reduction)" in result.stderr
    weights = final_weights(tmp_path / "bf16")
    assert all(value.dtype == torch.float32 for value in weights.values() if value.is_floating_point())
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("fp32", "bf16")]
    assert losses[1] == pytest.approx(losses[0], rel=0.05) and losses[1] != losses[0]


def test_an_unknown_parallel_mode_is_refused():
    from ssd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.parallel"):
        load_config("dino_digits_demo", ["train.parallel=zero3"])


@pytest.mark.slow
def test_fsdp_run_draws_training_images_from_the_gathered_teacher(tmp_path):
    """log.images_every_steps with sharded weights: every process gathers the teacher, process 0 draws it; the
    training is the same as without images, bit for bit."""
    from tests.test_visualize import tensorboard_images

    common = (*SAME, *FSDP, "log.tensorboard=true", "eval.resize_size=32", "eval.crop_size=32")
    run_training(tiny_overrides(tmp_path, "plain", *common), nproc=2)
    run_training(tiny_overrides(tmp_path, "images", *common, "log.images_every_steps=4", "log.images_count=2"),
                 nproc=2)
    assert_bitwise_equal(final_weights(tmp_path / "images"), final_weights(tmp_path / "plain"))
    drawn = tensorboard_images(tmp_path / "images" / "tb")
    assert {tag: [step for step, _, _ in images] for tag, images in drawn.items()} == {
        "visual/cls_attention": [4, 6], "visual/patch_pca": [4, 6]}  # every 4 steps, and the last


@pytest.mark.slow
def test_sigterm_to_an_fsdp_run_saves_and_resumes_bitwise(tmp_path):
    """Preemption of a sharded run: torchrun forwards SIGTERM, the processes gather the whole state, save it at a
    step boundary and exit; the same command resumes to the uninterrupted run's weights, bit for bit."""
    import os
    import signal

    from tests.test_faults_signals import (
        WITH_WORKERS,
        assert_stopped_with_checkpoint,
        processes_running,
        start,
        wait_for_steps,
    )

    run_training(tiny_overrides(tmp_path, "whole", *WITH_WORKERS, *FSDP), nproc=2)
    overrides = tiny_overrides(tmp_path, "run", *WITH_WORKERS, *FSDP)
    process = start(overrides, nproc=2)
    wait_for_steps(tmp_path / "run", process)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output  # torchrun reports the stop as a failure of its own
    assert_stopped_with_checkpoint(tmp_path / "run", output, launcher_traceback=True)
    assert not processes_running(str(tmp_path / "run")), output
    result = run_training(overrides, nproc=2)
    assert "resumed from" in result.stderr
    assert_bitwise_equal(final_weights(tmp_path / "run"), final_weights(tmp_path / "whole"))
