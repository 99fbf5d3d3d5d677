"""2 processes under torchrun (DDP, gloo) give the same weights as 1 process with the same global batch."""

import torch

from tests.tiny import final_weights, run_training, tiny_overrides

# No drop-path: each rank draws its own masks, so only a deterministic network can match across world sizes.
SAME = ("model.drop_path_rate=0.0", "train.max_steps=6", "train.batch_size=8")


def test_two_process_ddp_matches_one_process(tmp_path):
    run_training(tiny_overrides(tmp_path, "one", *SAME))
    result = run_training(tiny_overrides(tmp_path, "two", *SAME), nproc=2)
    assert "on 2 process(es)" in result.stderr
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    moved = 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
        moved += int(name.startswith("student."))
    assert moved > 10
    initial = {}
    # Training changed the weights: equality is not the trivial "nothing moved".
    run_training(tiny_overrides(tmp_path, "zero", *SAME[:1], "train.max_steps=1", "train.batch_size=8"))
    initial = final_weights(tmp_path / "zero")
    assert not torch.equal(initial["student.backbone.blocks.0.attn.qkv.weight"],
                           one["student.backbone.blocks.0.attn.qkv.weight"])


def test_gradient_accumulation_matches_full_batch(tmp_path):
    run_training(tiny_overrides(tmp_path, "full", *SAME))
    run_training(tiny_overrides(tmp_path, "accum", *SAME, "train.grad_accum_steps=2"))
    full, accum = final_weights(tmp_path / "full"), final_weights(tmp_path / "accum")
    for name in full:
        torch.testing.assert_close(accum[name], full[name], rtol=1e-4, atol=1e-5, msg=name)
