"""2 processes under torchrun (DDP, gloo) give the same weights as 1 process with the same global batch."""

import torch

from tests.tiny import final_weights, run_training, tiny_overrides

# No drop-path: each rank draws its own masks, so only a deterministic network can match across world sizes.
# No qkv bias: the key bias gets a gradient that is exactly zero in exact arithmetic (softmax ignores a shift
# shared by all keys), so its float gradient is rounding noise, and Adam turns noise into full +-lr steps whose
# signs depend on summation order. Every other parameter's gradient carries signal.
SAME = ("model.drop_path_rate=0.0", "model.timm_kwargs.qkv_bias=false", "train.max_steps=6", "train.batch_size=8")


def test_two_process_ddp_matches_one_process(tmp_path):
    run_training(tiny_overrides(tmp_path, "one", *SAME))
    result = run_training(tiny_overrides(tmp_path, "two", *SAME), nproc=2)
    assert "on 2 process(es)" in result.stderr
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    moved = 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
        moved += int(name.startswith("student."))
    assert moved > 10
    # Training moved the weights well beyond the tolerance, so equality is not the trivial "nothing moved".
    run_training(tiny_overrides(tmp_path, "start", *SAME[:2], "train.max_steps=1", "train.batch_size=8"))
    start = final_weights(tmp_path / "start")["student.backbone.blocks.0.attn.qkv.weight"]
    assert (start - one["student.backbone.blocks.0.attn.qkv.weight"]).abs().max() > 1e-4


def test_gradient_accumulation_matches_full_batch(tmp_path):
    run_training(tiny_overrides(tmp_path, "full", *SAME))
    run_training(tiny_overrides(tmp_path, "accum", *SAME, "train.grad_accum_steps=2"))
    full, accum = final_weights(tmp_path / "full"), final_weights(tmp_path / "accum")
    for name in full:
        torch.testing.assert_close(accum[name], full[name], rtol=1e-5, atol=1e-6)
