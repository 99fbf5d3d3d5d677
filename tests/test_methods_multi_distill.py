"""DINOv3-style multi-student distillation (method.name=multi_distill): one frozen teacher forward per step shared
by a ViT and a ConvNeXt student, each with its own heads, clipping, lr and moving average, exported by name."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from ssd.config import ConfigError, load_config
from ssd.engine.optim import clip_gradient_sets
from ssd.methods import build_method
from tests.tiny import (
    TINY_OVERRIDES,
    assert_resume_after_sigkill_is_bitwise_equal,
    final_weights,
    run_training,
    tiny_overrides,
)

VIT = "{name: vit, timm_kwargs: {depth: 2, embed_dim: 96, num_heads: 3}}"
# Output stride 8: its 4 x 4 map at 32 px lies on the teacher's 8 px patch grid.
CONVNEXT = ("{name: convnext, arch: convnext_atto, lr_multiplier: 2.0, timm_kwargs: {output_stride: 8, "
            "dims: [16, 32, 48, 64], depths: [1, 1, 1, 1]}}")
MULTI = ("method.name=multi_distill", "method.centering=sinkhorn", "method.koleo_weight=0.1",
         "method.shared_head=false", "method.patch_out_dim=48", "method.mask_probability=1.0",
         "method.mask_min_block=1", "method.momentum_teacher=0.9")


def students_override(*students: str) -> str:
    return f"distill.students=[{', '.join(students or (VIT, CONVNEXT))}]"


def multi_overrides(teacher_run, *students: str) -> tuple[str, ...]:
    return (*MULTI, "teacher.kind=frozen", f"teacher.source={teacher_run}", students_override(*students))


def method_for(teacher_run, *students: str):
    torch.manual_seed(0)
    return build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, *multi_overrides(teacher_run, *students)]))


def batch_for(method, count: int = 4) -> dict:
    generator = torch.Generator().manual_seed(1)
    samples = [{"crops": [torch.randn(3, size, size, generator=generator) for size in (32, 32, 16, 16)], "label": 0,
                "index": i, "epoch": 0} for i in range(count)]
    return method.make_collate(0)(samples)


SCHEDULE = {"teacher_temp": 0.04, "patch_teacher_temp": 0.05, "teacher_momentum": 0.9}


# ---- the shared teacher -------------------------------------------------------------------------------------

@pytest.mark.parametrize("students", [(VIT,), (VIT, CONVNEXT, VIT.replace("vit", "vit2").replace("96", "48"))])
def test_the_teacher_runs_once_per_step_however_many_students_share_it(teacher_run, students):
    method = method_for(teacher_run, *students)
    teacher_forwards = []
    method.teacher.backbone.patch_embed.register_forward_hook(lambda *_: teacher_forwards.append(1))
    student_forwards = {name: [] for name in method.students}
    for name, network in method.students.items():
        network.head.register_forward_hook(lambda *_, name=name: student_forwards[name].append(1))
    loss, outputs = method(batch_for(method), SCHEDULE)
    loss.backward()
    assert len(teacher_forwards) == 1
    assert all(calls for calls in student_forwards.values())  # every student trained on the step
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is None for p in method.averages.parameters())
    for name, network in method.students.items():
        assert all(p.grad is not None for p in network.backbone.parameters()), name
        assert {f"{name}/loss", f"{name}/loss_class", f"{name}/loss_patch", f"{name}/loss_koleo"} <= set(outputs)
    keys = method.state_dict()
    assert not [key for key in keys if key.startswith("teacher.")]  # the frozen teacher is recorded, not stored
    assert {key.split(".")[1] for key in keys if key.startswith("averages.")} == set(method.students)


# ---- the loss, against float64 references ------------------------------------------------------------------

def sinkhorn_reference(scores: torch.Tensor) -> torch.Tensor:
    """SwAV's algorithm as written in its paper, 3 iterations: rows sum to 1, prototypes equally used."""
    q = torch.exp(scores - scores.max()).T  # (K, B)
    num_prototypes, batch = q.shape
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(dim=1, keepdim=True) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).T


def reference_student_loss(method, name: str, batch: dict) -> torch.Tensor:
    """One student's DINO + iBOT + KoLeo loss, term by term, from its and the teacher's raw outputs."""
    cfg, network = method.cfg.method, method.students[name]
    crops, masks = batch["crops"], batch["masks"].flatten(0, 1)  # (2B, N)
    global_images = torch.cat(crops[:2])
    with torch.no_grad():
        teacher = method.teacher.backbone.forward_features(global_images)  # (2B, prefix + N, D)
        prefix = method.teacher.backbone.num_prefix_tokens
        teacher_cls = sinkhorn_reference(method.teacher.head(teacher[:, 0]) / SCHEDULE["teacher_temp"])
        teacher_patches = sinkhorn_reference(method.teacher.patch_head(teacher[:, prefix:][masks])
                                             / SCHEDULE["patch_teacher_temp"])
    backbone = network.backbone
    if name.startswith("vit"):
        student = network.encode(global_images, masks)
        global_cls, patches = student.cls, student.patches
        local_cls = network.encode(torch.cat(crops[2:])).cls
    else:  # ConvNeXt: pooled features, and the 4 x 4 map on the teacher's grid
        feature_map = backbone.forward_features(global_images)  # (2B, C, 4, 4)
        global_cls = backbone.forward_head(feature_map, pre_logits=True)
        patches = feature_map.flatten(2).transpose(1, 2)
        local_cls = backbone(torch.cat(crops[2:]))
    student_views = network.head(torch.cat([global_cls, local_cls])).chunk(4)
    cross_entropy = []
    for t, teacher_view in enumerate(teacher_cls.chunk(2)):
        for s, student_view in enumerate(student_views):
            if s != t:
                log_probs = F.log_softmax(student_view / cfg.student_temp, dim=-1)
                cross_entropy.append(-(teacher_view * log_probs).sum(dim=-1).mean())
    class_loss = torch.stack(cross_entropy).mean()
    patch_log_probs = F.log_softmax(network.patch_head(patches[masks]) / cfg.student_temp, dim=-1)
    per_token = -(teacher_patches * patch_log_probs).sum(dim=-1)  # (M,) in row-major order of masks
    image_of_token = masks.nonzero()[:, 0]
    per_image = [per_token[image_of_token == i].mean() for i in range(len(masks)) if masks[i].any()]
    patch_loss = torch.stack(per_image).sum() / len(masks)
    koleo = 0.0
    for view in global_cls.chunk(2):
        unit = F.normalize(view, dim=-1)
        distances = torch.cdist(unit, unit) + torch.diag(torch.full((len(unit),), float("inf"), dtype=unit.dtype))
        koleo = koleo - torch.log(distances.min(dim=1).values).mean()
    return class_loss + cfg.patch_loss_weight * patch_loss + cfg.koleo_weight * koleo


def test_every_students_loss_and_gradient_match_a_float64_reference(teacher_run):
    method = method_for(teacher_run).double().eval()  # eval: no drop-path draws differing between the two passes
    batch = batch_for(method)
    batch["crops"] = [crop.double() for crop in batch["crops"]]
    assert batch["masks"].any()
    loss, outputs = method(batch, SCHEDULE)
    loss.backward()
    total = 0.0
    for name, network in method.students.items():
        ours = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
        network.zero_grad()
        reference = reference_student_loss(method, name, batch)
        reference.backward()
        torch.testing.assert_close(outputs[f"{name}/loss"], reference.detach(), rtol=1e-7, atol=1e-9)
        for parameter_name, parameter in network.named_parameters():
            if parameter.grad is not None and parameter_name in ours:
                torch.testing.assert_close(ours[parameter_name], parameter.grad, rtol=1e-6, atol=1e-6,  # KoLeo adds eps=1e-8
                                           msg=f"{name}: gradient of {parameter_name}")
        total = total + reference.detach()
    torch.testing.assert_close(loss.detach(), total, rtol=1e-7, atol=1e-9)  # the students' losses just add up


def test_students_train_independently(teacher_run):
    """No student's gradient depends on another: changing the ConvNeXt leaves the ViT's gradients as they were."""
    method = method_for(teacher_run)
    batch = batch_for(method)
    torch.manual_seed(5)  # the same drop-path draws in both passes
    method(batch, SCHEDULE)[0].backward()
    before = {n: p.grad.clone() for n, p in method.students["vit"].named_parameters() if p.grad is not None}
    method.zero_grad()
    with torch.no_grad():
        for parameter in method.students["convnext"].parameters():
            parameter.mul_(1.5)
    torch.manual_seed(5)
    method(batch, SCHEDULE)[0].backward()
    for name, parameter in method.students["vit"].named_parameters():
        if name in before:
            torch.testing.assert_close(parameter.grad, before[name], rtol=1e-5, atol=1e-7)


def test_each_student_has_its_own_lr_clipping_and_average(teacher_run):
    method = method_for(teacher_run)
    vit, convnext = method.students["vit"], method.students["convnext"]
    groups = method.param_groups()
    owners = {id(p): name for name, network in method.students.items() for p in network.parameters()}
    for group in groups:
        names = {owners[id(p)] for p in group["params"]}
        assert len(names) == 1  # a group never mixes students
        assert group["lr_multiplier"] == (2.0 if names == {"convnext"} else 1.0)
    sets = method.clip_sets()
    trainable = [[p for p in network.parameters() if p.requires_grad] for network in (vit, convnext)]
    assert [[id(p) for p in s] for s in sets] == [[id(p) for p in s] for s in trainable]
    # A huge ConvNeXt gradient is clipped on its own; the ViT's small one stays as it was.
    for parameter in sets[0]:
        parameter.grad = torch.full_like(parameter, 1e-4)
    for parameter in sets[1]:
        parameter.grad = torch.full_like(parameter, 10.0)
    total = clip_gradient_sets(sets, max_norm=1.0, mode="global")
    assert all(torch.equal(p.grad, torch.full_like(p, 1e-4)) for p in sets[0])
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in sets[1]]))
    assert clipped == pytest.approx(1.0, rel=1e-4) and total > 100
    # The averages move toward their own student only.
    with torch.no_grad():
        for parameter in vit.backbone.parameters():
            parameter.add_(1.0)
    before = {name: average.state_dict() for name, average in method.averages.items()}
    before = {name: {k: v.clone() for k, v in state.items()} for name, state in before.items()}
    method.after_step(SCHEDULE)
    assert any(not torch.equal(v, before["vit"][k]) for k, v in method.averages["vit"].state_dict().items())
    assert all(torch.equal(v, before["convnext"][k]) for k, v in method.averages["convnext"].state_dict().items())


# ---- configuration mistakes --------------------------------------------------------------------------------

@pytest.mark.parametrize("students, named", [
    ("[]", "needs distill.students"),
    ("[{name: a, arh: vit_small_patch16_224}]", "did you mean 'arch'"),
    ("[{name: a}, {name: a}]", "taken by an earlier student"),
    ("[{name: teacher}]", "reserved"),
    ("[{name: 2nd}]", "letters, digits"),
    ("[{name: a, lr_multiplier: 0}]", "lr_multiplier=0"),
])
def test_student_list_mistakes_are_named(students, named):
    with pytest.raises(ConfigError, match=named):
        load_config("multi_distill_digits_demo", [f"distill.students={students}"])


def test_students_only_mean_something_to_multi_distill_and_need_the_teachers_patches(teacher_run):
    with pytest.raises(ConfigError, match="distill.students=\\[\\]"):
        load_config("dino_digits_demo", ["distill.students=[{name: a}]"])
    with pytest.raises(ConfigError, match="teacher.kind=frozen"):
        load_config("multi_distill_digits_demo", ["teacher.kind=ema", "teacher.source="])
    with pytest.raises(ConfigError, match="patch_size: 8"):
        method_for(teacher_run, "{name: fine, patch_size: 4, timm_kwargs: {depth: 1}}")


# ---- runs: resume, export, evaluation --------------------------------------------------------------------

@pytest.mark.slow
def test_multi_distill_resumes_bitwise_after_sigkill(tmp_path, teacher_run):
    assert_resume_after_sigkill_is_bitwise_equal(tmp_path, (*multi_overrides(teacher_run), "data.num_workers=1"),
                                                 kill_at_step=6)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_the_students_as_one_does(tmp_path, teacher_run, parallel):
    """Sinkhorn-Knopp sees the global batch, DDP averages each student's gradients (FSDP shards each student's
    blocks and reduces them): the same global batch on 1 and 2 gloo processes gives the same students and averages. As in test_methods_masked: no drop path, no qkv bias
    (a key bias gets a zero gradient up to rounding, which Adam turns into lr-sized steps) and no KoLeo (checked
    in float64 across processes by tests/test_distributed_gather.py)."""
    vit = VIT.replace("depth: 2,", "depth: 2, qkv_bias: false,")
    same = (*multi_overrides(teacher_run, vit, CONVNEXT), "method.koleo_weight=0", "model.drop_path_rate=0.0",
            "train.max_steps=3")
    run_training(tiny_overrides(tmp_path, "one", *same))
    result = run_training(tiny_overrides(tmp_path, "two", *same, f"train.parallel={parallel}"), nproc=2)
    assert "on 2 process(es)" in result.stderr
    assert ("FSDP2 units over 2 processes" in result.stderr) == (parallel == "fsdp")
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys() and any(key.startswith("averages.convnext.") for key in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_students_split_over_processes_train_as_on_one_process(tmp_path, teacher_run):
    """distill.placement=split on 2 processes: the ViT trains on process 0 and the ConvNeXt on process 1, each on
    the whole global batch after every process ran the teacher on its own half; the same students as one process
    training both. The run logs both students' losses."""
    vit = VIT.replace("depth: 2,", "depth: 2, qkv_bias: false,")
    same = (*multi_overrides(teacher_run, vit, CONVNEXT), "method.koleo_weight=0", "model.drop_path_rate=0.0",
            "train.max_steps=3", "log.every_steps=1")
    run_training(tiny_overrides(tmp_path, "one", *same))
    result = run_training(tiny_overrides(tmp_path, "split", *same, "distill.placement=split"), nproc=2)
    assert "on 2 process(es)" in result.stderr
    assert "2 students from one teacher forward per step: vit on processes 0-0, convnext on processes 1-1" in result.stderr
    one, split = final_weights(tmp_path / "one"), final_weights(tmp_path / "split")
    assert one.keys() == split.keys()
    for name in one:
        torch.testing.assert_close(split[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for key in ("vit/loss_class", "convnext/loss_patch", "loss"):
        assert logged[-1][key] == pytest.approx(reference[-1][key], rel=1e-4), key


def test_split_placement_needs_a_multiple_of_the_students_in_processes(teacher_run):
    with pytest.raises(ConfigError, match="multiple of 2 processes"):
        build_method(load_config("dino_digits_demo", [*TINY_OVERRIDES, *multi_overrides(teacher_run),
                                                      "distill.placement=split"]))
    with pytest.raises(ConfigError, match="distill.placement=shared"):
        load_config("dino_digits_demo", ["distill.placement=split"])
    with pytest.raises(ConfigError, match="use distill.placement=shared .* or train.parallel=ddp"):
        load_config("multi_distill_digits_demo", ["distill.placement=split", "train.parallel=fsdp"])


def test_every_student_exports_to_timm_and_evaluates_by_name(tmp_path, teacher_run):
    from eval_protocols.common import load_backbone
    from ssd.checkpoint_import import WeightsError
    from ssd.export import main as export

    run_training(tiny_overrides(tmp_path, "run", *multi_overrides(teacher_run), "train.max_steps=2"))
    weights = final_weights(tmp_path / "run")
    images = torch.randn(2, 3, 32, 32)
    for which, arch in (("vit", "vit_tiny_patch16_224"), ("convnext", "convnext_atto")):
        out = export([str(tmp_path / "run"), "--which", which, "--output", str(tmp_path / which)])
        config = json.loads((out / "config.json").read_text())
        assert config["architecture"] == arch and config["ssd"]["which"] == which
        model = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True).eval()
        for key, value in model.state_dict().items():
            assert torch.equal(value, weights[f"averages.{which}.{key}"]), key
        from argparse import Namespace

        backbone, info = load_backbone(Namespace(weights=str(tmp_path / "run"), which=which, arch=None))
        assert info["model"]["arch"] == arch
        torch.testing.assert_close(backbone.eval()(images), model(images))
    # the default ("teacher") is the first student; a name the run does not have is refused with the names
    default = export([str(tmp_path / "run"), "--output", str(tmp_path / "default")])
    assert json.loads((default / "config.json").read_text())["ssd"]["which"] == "vit"
    with pytest.raises(WeightsError, match="holds the students vit, convnext"):
        export([str(tmp_path / "run"), "--which", "vit_large", "--output", str(tmp_path / "nothing")])


@pytest.mark.long
def test_multi_distill_recipe_students_beat_random_init(tmp_path):
    """The README's commands: the DINOv2 demo as the teacher, then a ViT and a ConvNeXt student of it in one job;
    benchmarks/RESULTS.md "Distillation on digits"."""
    from tests.test_methods_jepa import recipe_knn

    recipe_knn(tmp_path, "dinov2_digits_demo", run_name="dinov2-digits")
    knn = recipe_knn(tmp_path, "multi_distill_digits_demo", f"teacher.source={tmp_path / 'dinov2-digits'}")
    assert knn["trained vit"] > knn["random init (vit's arch)"] + 2.0, knn
    assert knn["trained convnext"] > knn["random init (convnext's arch)"] + 2.0, knn


# ---- split placement: who trains on what --------------------------------------------------------------------

def test_split_placement_gives_each_student_a_block_that_covers_the_global_batch():
    from ssd.methods.student_placement import plan_placement

    plans = [plan_placement("split", ["small", "conv"], rank, 4) for rank in range(4)]
    assert [plan.student for plan in plans] == ["small", "small", "conv", "conv"]
    assert [plan.ranks for plan in plans] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert [plan.sources for plan in plans] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert all(plan.loss_scale == 2.0 for plan in plans)
    shared = plan_placement("shared", ["small", "conv"], 1, 4)
    assert shared.student is None and shared.sources == (1,) and shared.loss_scale == 1.0


def local_step(rank: int, images: int = 2, patches: int = 4, prototypes: int = 3) -> tuple:
    """What process `rank` holds after its teacher forward: crops, masks (2, B, N) and targets, its patch targets
    in the order of its masked positions (view-major)."""
    generator = torch.Generator().manual_seed(rank)
    crops = [torch.randn(images, 3, size, size, generator=generator) for size in (4, 4, 2)]
    masks = torch.rand(2, images, patches, generator=generator) < 0.5
    cls_probs = torch.rand(2 * images, prototypes, generator=generator)
    patch_probs = torch.rand(int(masks.sum()), prototypes, generator=generator)
    return crops, masks, {"cls_probs": cls_probs, "patch_probs": patch_probs, "cls_features": torch.zeros(1)}


def expected_regroup(sources: tuple[int, ...]) -> tuple:
    """The batch of `sources`' samples built directly: targets looked up by (process, view, image, patch)."""
    steps = {j: local_step(j) for j in sources}
    crops = [torch.cat([steps[j][0][v] for j in sources]) for v in range(3)]
    masks = torch.cat([steps[j][1] for j in sources], dim=1)  # (2, B', N)
    patch_of, cls_of = {}, {}
    for j in sources:
        _, local_masks, targets = steps[j]
        for row, (view_image, patch) in enumerate(local_masks.flatten(0, 1).nonzero().tolist()):
            patch_of[(j, *divmod(view_image, local_masks.shape[1]), patch)] = targets["patch_probs"][row]
        for view_image, probs in enumerate(targets["cls_probs"]):
            cls_of[(j, *divmod(view_image, local_masks.shape[1]))] = probs
    owner = [(j, i) for j in sources for i in range(steps[j][1].shape[1])]  # new image index -> (process, image)
    cls = torch.stack([cls_of[(owner[i][0], v, owner[i][1])] for v in range(2) for i in range(len(owner))])
    patch = torch.stack([patch_of[(owner[i][0], v, owner[i][1], p)] for v in range(2) for i in range(len(owner))
                         for p in range(masks.shape[2]) if masks[v, i, p]])
    return crops, masks, cls, patch


def _regroup_worker(rank, out_dir):
    from ssd.methods.student_placement import plan_placement, regroup

    plan = plan_placement("split", ["small", "conv"], rank, 4)
    crops, masks, targets = regroup(*local_step(rank), plan.sources)
    torch.save({"crops": crops, "masks": masks, "cls": targets["cls_probs"], "patch": targets["patch_probs"],
                "sources": plan.sources}, f"{out_dir}/rank{rank}.pt")


def test_regrouping_hands_each_process_its_sources_samples_with_their_targets(tmp_path):
    from tests.test_loss_sinkhorn import run_gloo

    run_gloo(_regroup_worker, 4, tmp_path, str(tmp_path))
    for rank in range(4):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        crops, masks, cls, patch = expected_regroup(result["sources"])
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(result["crops"], crops))
        assert torch.equal(result["masks"], masks) and result["masks"].dtype == torch.bool
        assert torch.equal(result["cls"], cls) and torch.equal(result["patch"], patch)
        assert len(patch) == int(masks.sum()) > 0
