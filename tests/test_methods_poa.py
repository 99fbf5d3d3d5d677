"""POA (elastic students) on the embedded digits: its loss against a float64 reference, the seeded size draw, real
runs from the command line (SIGKILL resume bitwise equal, 2 processes equal to 1), and every trained size
extracted as a timm model whose features are the elastic forward's."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest
import timm
import torch

from ssd.config import ConfigError, load_config
from ssd.losses.elastic_loss import poa_loss
from ssd.methods import build_method
from ssd.methods.poa import head_on_narrower_features
from ssd.models.elastic_vit import ElasticViT
from tests.tiny import (
    REPO,
    TINY_OVERRIDES,
    assert_resume_after_sigkill_is_bitwise_equal,
    final_weights,
    run_training,
    subprocess_env,
    tiny_overrides,
)

# The tiny run as POA: 4 blocks of 6 heads of 32 channels, sub-networks of width 96 or 192 and depth 2 or 4.
POA = ("method.name=poa", "model.timm_kwargs.depth=4", "model.timm_kwargs.num_heads=6", "elastic.widths=[96,192]",
       "elastic.depths=[2,4]")
SIZES = [(96, 2), (96, 4), (192, 2), (192, 4)]  # what a run offers for extraction, the intact size included


def poa_method(*overrides: str):
    torch.manual_seed(0)
    return build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, *POA, *overrides]))


def cross_entropy(target_probs: torch.Tensor, student_logits: torch.Tensor, temp: float) -> torch.Tensor:
    log_probs = student_logits / temp - torch.logsumexp(student_logits / temp, 0)
    return -(target_probs * log_probs).sum()


def reference_poa_loss(intact, elastic, teacher_probs, views, batch, temp, weight, from_intact):
    """POA's three-branch objective with explicit loops over views and samples, in float64."""
    def cross_view(student):
        pairs = [(t, s) for t in range(2) for s in range(views) if s != t]
        return sum(sum(cross_entropy(teacher_probs[t * batch + b], student[s * batch + b], temp)
                       for b in range(batch)) / batch for t, s in pairs) / len(pairs)

    same_view = sum(cross_entropy(torch.softmax(intact[row].detach() / temp, 0), elastic[row], temp)
                    for row in range(views * batch)) / (views * batch)
    return (1 - weight) * cross_view(intact) + weight * (cross_view(elastic) + from_intact * same_view)


@pytest.mark.parametrize("views,batch,prototypes,weight,from_intact", [(2, 3, 7, 0.2, 1.0), (6, 4, 16, 0.5, 0.3)])
def test_loss_and_gradients_match_float64_reference(views, batch, prototypes, weight, from_intact):
    generator = torch.Generator().manual_seed(views * 100 + prototypes)
    intact = torch.randn(views * batch, prototypes, generator=generator, dtype=torch.float64, requires_grad=True)
    elastic = torch.randn(views * batch, prototypes, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_probs = torch.softmax(torch.randn(2 * batch, prototypes, generator=generator, dtype=torch.float64) / 0.04, -1)

    terms = poa_loss(intact, elastic, teacher_probs, views, 2, 0.1, weight, from_intact)
    grads = torch.autograd.grad(terms["loss"], (intact, elastic), retain_graph=True)
    expected = reference_poa_loss(intact, elastic, teacher_probs, views, batch, 0.1, weight, from_intact)
    expected_grads = torch.autograd.grad(expected, (intact, elastic))

    assert terms["loss"].dtype == torch.float64
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-10, atol=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    # The intact student learns from the teacher only: its gradient is (1 - w) x that of its DINO term.
    (intact_only,) = torch.autograd.grad(terms["loss_intact"], intact)
    torch.testing.assert_close(grads[0], (1 - weight) * intact_only, rtol=1e-9, atol=1e-12)


def test_loss_is_finite_in_bfloat16():
    logits = [torch.randn(12, 1024, dtype=torch.bfloat16) * 30 for _ in range(2)]
    teacher_probs = torch.softmax(torch.randn(4, 1024) / 0.04, -1)
    terms = poa_loss(*logits, teacher_probs, 6, 2, 0.1, 0.2, 1.0)
    assert all(torch.isfinite(value) for value in terms.values())


def test_sizes_are_drawn_from_seed_and_step_smaller_ones_more_often():
    method = poa_method()
    assert method.sizes == [(96, 2), (96, 4), (192, 2)]  # never the intact student's own size
    draws = [method.sample_size(step) for step in range(3000)]
    rebuilt, other_seed = poa_method(), poa_method("train.seed=1")
    assert draws[:50] == [rebuilt.sample_size(step) for step in range(50)]  # a resumed run draws the same
    assert draws[:50] != [other_seed.sample_size(step) for step in range(50)]
    counts = collections.Counter(draws)
    # POA's weights: 3 x 3 for the narrowest and shallowest, 3 x 1 for the two others.
    assert counts[(96, 2)] / 3000 == pytest.approx(9 / 15, abs=0.03)
    assert counts[(96, 4)] / 3000 == pytest.approx(3 / 15, abs=0.03)


def test_default_sizes_run_from_half_the_width_and_depth():
    method = poa_method("elastic.widths=[]", "elastic.depths=[]")
    assert sorted({w for w, _ in method.sizes}) == [96, 128, 160, 192]
    assert sorted({d for _, d in method.sizes}) == [2, 3, 4]


def test_config_mistakes_are_named():
    with pytest.raises(ConfigError, match=r"elastic.widths=\[100, 192\]: 100 .* multiple of the head dimension 32"):
        poa_method("elastic.widths=[100,192]")
    with pytest.raises(ConfigError, match=r"elastic.depths=\[2, 6\]: 6 .* 1..4"):
        poa_method("elastic.depths=[2,6]")
    with pytest.raises(ConfigError, match="offer no sub-network smaller than the intact student"):
        poa_method("elastic.widths=[192]", "elastic.depths=[4]")
    with pytest.raises(ConfigError, match=r"elastic.weight=1.5 .* \[0, 1\]"):
        poa_method("elastic.weight=1.5")
    with pytest.raises(ConfigError, match="elastic.from_intact_weight=-1.0"):
        poa_method("elastic.from_intact_weight=-1")
    with pytest.raises(ConfigError, match="model.arch=resnet10t: the elastic student needs a timm VisionTransformer"):
        poa_method("model.arch=resnet10t", "model.timm_kwargs={}")


def test_shared_head_reads_the_first_inputs_scaled_by_the_width_ratio():
    head = poa_method().student.head
    features = torch.randn(5, 96)
    expected_hidden = torch.nn.functional.linear(features * 2.0, head.mlp[0].weight[:, :96], head.mlp[0].bias)
    hidden = {}
    handle = head.mlp[0].register_forward_hook(lambda module, inputs, output: hidden.setdefault("value", output))
    head_on_narrower_features(head, features).sum().backward()
    handle.remove()
    torch.testing.assert_close(hidden["value"], expected_hidden)
    assert head.mlp[0].weight.grad[:, 96:].abs().max() == 0 and head.mlp[0].weight.grad[:, :96].abs().sum() > 0
    full = torch.randn(5, 192)
    assert torch.equal(head_on_narrower_features(head, full), head(full))


def a_batch(method, size: int = 4) -> dict:
    torch.manual_seed(1)
    crops = lambda: [torch.randn(3, 32, 32), torch.randn(3, 32, 32), torch.randn(3, 16, 16), torch.randn(3, 16, 16)]  # noqa: E731
    return method.make_collate(seed=0)([{"crops": crops(), "label": 0, "index": i, "epoch": 0} for i in range(size)])


def test_every_student_parameter_learns_and_the_teacher_never_does():
    method = poa_method().train()
    loss, outputs = method(a_batch(method), {"step": 0, "teacher_temp": 0.04})
    loss.backward()
    assert (outputs["elastic_width"], outputs["elastic_depth"]) == method.sample_size(0)
    assert all(p.grad is not None for p in method.student.parameters() if p.requires_grad)  # DDP: no unused ones
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    stats = method.monitor(outputs)
    assert {"loss_intact", "loss_elastic_teacher", "loss_elastic_intact", "elastic_width", "teacher_entropy"} <= set(stats)


def test_one_teacher_forward_serves_the_intact_and_the_elastic_student():
    """The teacher's targets are computed once per step and shared by both students (its global crops in one
    batch), however the students run."""
    method = poa_method().train()
    teacher_calls, student_calls = [], []
    method.teacher.backbone.patch_embed.register_forward_hook(lambda *_: teacher_calls.append(1))
    method.student.backbone.patch_embed.register_forward_hook(lambda *_: student_calls.append(1))
    method(a_batch(method), {"step": 0, "teacher_temp": 0.04})
    assert len(teacher_calls) == 1
    assert len(student_calls) == 2  # the intact student: one pass per crop size (32 and 16 px)


@pytest.mark.slow
def test_poa_sigkill_then_resume_is_bitwise_equal(tmp_path):
    assert_resume_after_sigkill_is_bitwise_equal(tmp_path, (*POA, "train.epochs=6", "data.num_workers=1"),
                                                 kill_at_step=6)


@pytest.mark.slow
def test_two_processes_draw_the_same_sub_networks_as_one(tmp_path):
    """Same global batch on 1 and 2 gloo processes, same weights: both ranks trained the same sub-network each
    step (a rank with another size would send other gradients), and DDP found no unused parameter."""
    same = (*POA, "model.drop_path_rate=0.0", "model.timm_kwargs.qkv_bias=false", "train.max_steps=6")
    run_training(tiny_overrides(tmp_path, "one", *same))
    result = run_training(tiny_overrides(tmp_path, "two", *same), nproc=2)
    assert "on 2 process(es)" in result.stderr
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def poa_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("poa")
    run_training(tiny_overrides(root, "run", *POA, "train.max_steps=4"))
    return root / "run"


def load_in_timm(export_dir) -> torch.nn.Module:
    config = json.loads((export_dir / "config.json").read_text())
    return timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                             pretrained_cfg_overlay={"file": str(export_dir / "model.safetensors")}).eval()


def test_every_trained_size_extracts_to_timm_with_the_elastic_features(poa_run, tmp_path):
    from ssd.checkpoint_import import load_backbone_for_eval
    from ssd.extract_subnet import main as extract
    from ssd.models.backbone import timm_kwargs

    teacher, info = load_backbone_for_eval(poa_run)
    teacher.eval()
    model_cfg = load_config("dino_digits_demo", [*TINY_OVERRIDES, *POA]).model
    elastic = ElasticViT(teacher, model_cfg.arch, timm_kwargs(model_cfg))
    images = torch.randn(2, 3, 32, 32)
    for width, depth in SIZES:
        out = extract([str(poa_run), "--width", str(width), "--depth", str(depth), "--output", str(tmp_path / f"{width}x{depth}")])
        model = load_in_timm(out)
        assert model.embed_dim == width and len(model.blocks) == depth
        with torch.no_grad():
            torch.testing.assert_close(model(images), elastic(images, width, depth), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the intact size is the teacher itself, as ssd.export writes it
        torch.testing.assert_close(load_in_timm(tmp_path / "192x4")(images), teacher(images), rtol=0, atol=0)


def test_extracting_a_size_the_run_did_not_train_is_refused(poa_run, tmp_path):
    command = [sys.executable, "-m", "ssd.extract_subnet", str(poa_run), "--width", "128", "--depth", "2",
               "--output", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "width 128 and depth 2 is not a size this run trained: it offers widths [96, 192] x depths [2, 4]" in result.stderr
    assert not (tmp_path / "out").exists()


def test_extract_subnet_refuses_runs_of_other_methods(tmp_path):
    from ssd.checkpoint_import import WeightsError
    from ssd.extract_subnet import extract_subnet

    run_training(tiny_overrides(tmp_path, "dino", "train.max_steps=1"))
    with pytest.raises(WeightsError, match="method.name=dino run: only POA"):
        extract_subnet(tmp_path / "dino", 96, 2, tmp_path / "out")


@pytest.mark.long
def test_poa_recipe_beats_random_init_at_every_size(tmp_path):
    """benchmarks/RESULTS.md: after the recipe's 308 steps the teacher and each extracted size beat a random init of
    their own size (k-NN k=20), by 1.4 points (192 x 2) to 17.5 points (96 x 4)."""
    run = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "ssd.train", "--config", "poa_digits_demo", f"output.root={tmp_path}",
                    "output.run_name=demo", "log.progress_bar=false"], cwd=REPO, env=subprocess_env(), check=True,
                   capture_output=True, timeout=3600)
    for width, depth in SIZES:
        out = tmp_path / f"{width}x{depth}"
        for command in (["ssd.extract_subnet", str(run), "--width", str(width), "--depth", str(depth), "--output", str(out)],
                        ["eval_protocols.knn", str(out), "--dataset", "digits", "--holdout-fraction", "0.2", "--resize",
                         "32", "--crop", "32", "--ks", "20", "--baselines", "random-init", "--device", "cpu",
                         "--output", str(out / "knn.json")]):
            subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=subprocess_env(), check=True,
                           capture_output=True, timeout=600)
        results = json.loads((out / "knn.json").read_text())["results"]
        trained, random_init = (results[name]["k=20"]["top1"] for name in ("trained teacher", "random init (same arch)"))
        assert trained > random_init, (width, depth, trained, random_init)
