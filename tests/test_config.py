"""Config: recipes, overrides, validation messages, the resolved config in the run folder reproduces the run."""

import pytest
import yaml

from ssd.config import RECIPES_DIR, ConfigError, load_config
from tests.tiny import assert_bitwise_equal, final_weights, run_training, tiny_overrides


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe, ["data.root=/somewhere"])
    # Recipes are named after their method (the longest method name they start with), SALT's two stages after
    # the paper (mae, then ijepa).
    from ssd.methods import METHODS

    named = max((name for name in METHODS if recipe.startswith(name + "_")), key=len, default=None)
    expected = {"salt_stage1": "mae", "salt_stage2": "ijepa"}.get("_".join(recipe.split("_")[:2]), named)
    assert cfg.recipe == recipe and cfg.method.name == expected


def test_masked_recipes_follow_the_released_settings():
    ibot = load_config("ibot_vit_small16_imagenet", [])
    assert (ibot.method.name, ibot.head.out_dim, ibot.method.patch_out_dim, ibot.method.shared_head) == (
        "ibot", 8192, 8192, True)
    assert (ibot.crops.local_number, list(ibot.crops.global_scale), list(ibot.crops.local_scale)) == (
        10, [0.25, 1.0], [0.05, 0.25])
    assert (list(ibot.method.mask_ratio), ibot.method.mask_probability, ibot.train.epochs) == ([0.1, 0.5], 0.5, 800)
    for size, arch, batch in (("small", "vit_small_patch14_dinov2", 1024), ("large", "vit_large_patch14_dinov2", 2048)):
        dinov2 = load_config(f"dinov2_vit_{size}14_imagenet", [])
        assert (dinov2.model.arch, dinov2.train.batch_size, dinov2.model.drop_path_uniform) == (arch, batch, True)
        # ssl_default_config.yaml: ibot.separate_head false (one head); dinov2/layers/dino_head.py leaves the
        # weight-norm scale trainable; collate_data_and_cast spreads the mask ratios over the batch; KoLeo and
        # clip_grad_norm_ per GPU (64 images) and per student module.
        assert (dinov2.method.koleo_weight, dinov2.method.shared_head, dinov2.head.out_dim) == (0.1, True, 65536)
        assert (dinov2.head.norm_last_layer, dinov2.method.mask_spread_in_batch) == (False, True)
        assert (dinov2.method.koleo_group_size, dinov2.optim.clip_mode) == (64, "per_module")
        assert (dinov2.optim.base_lr, dinov2.optim.lr_scaling, dinov2.optim.lr_reference_batch) == (0.004, "sqrt", 1024)
        assert (dinov2.optim.layerwise_decay, dinov2.optim.patch_embed_lr_mult, dinov2.method.momentum_teacher) == (
            0.9, 0.2, 0.992)
        assert dinov2.crops.local_size % 14 == 0 and dinov2.crops.global_size % 14 == 0


def test_paper_recipe_has_dino_defaults():
    cfg = load_config("dino_vit_small16_imagenet", [])
    assert (cfg.model.arch, cfg.head.out_dim, cfg.train.batch_size, cfg.train.epochs) == (
        "vit_small_patch16_224", 65536, 1024, 100)
    assert (cfg.crops.global_size, cfg.crops.local_number, cfg.crops.local_size) == (224, 8, 96)
    assert list(cfg.crops.global_scale) == [0.4, 1.0] and list(cfg.crops.local_scale) == [0.05, 0.4]
    assert (cfg.method.momentum_teacher, cfg.method.student_temp, cfg.method.teacher_temp) == (0.996, 0.1, 0.04)
    assert (cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.0005, 0.04, 0.4)
    assert (cfg.optim.clip_grad, cfg.optim.freeze_last_layer_epochs, cfg.model.drop_path_rate) == (3.0, 1, 0.1)


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.base_lr=1e-3", "crops.local_number=2", "train.compile=true",
                             "crops.local_scale=[0.1,0.3]", "model.timm_kwargs.depth=4"])
    assert cfg.optim.base_lr == 0.001 and cfg.crops.local_number == 2 and cfg.train.compile is True
    assert list(cfg.crops.local_scale) == [0.1, 0.3] and cfg.model.timm_kwargs.depth == 4


@pytest.mark.parametrize("override,message", [
    ("optim.bse_lr=1", "unknown config key 'optim.bse_lr' in command-line overrides: did you mean 'optim.base_lr'?"),
    ("trian.epochs=3", "did you mean 'train.epochs'?"),
    ("optim.base_lr=fast", "bad value for config key 'optim.base_lr' in command-line overrides: got 'fast', "
                           "expected float"),
    ("crops.local_number=2.5", "key 'crops.local_number'"),
    ("train.precision=fp8", "expected one of auto, fp32, bf16, fp16"),
    ("crops.global_scale=[0.4]", "needs two numbers"),
    ("train.batch_size=0", "must be positive"),
    ("data.dataset=imagefolder", "needs data.root"),
    ("optim.base_lr", "not of the form key=value"),
])
def test_bad_overrides_fail_with_clear_messages(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_unknown_key_in_recipe_file_names_file_and_nearest_key(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.weight_decy' in recipe .*mine.yaml: "
                                          r"did you mean 'optim.weight_decay'\?"):
        load_config(str(recipe), [])


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="dino_digits_demo"):
        load_config("no_such_recipe", [])


def test_cli_reports_config_errors_before_running(tmp_path):
    import subprocess
    import sys

    from tests.tiny import REPO, subprocess_env

    result = subprocess.run([sys.executable, "-m", "ssd.train", "optim.bse_lr=1", f"output.root={tmp_path}"],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "did you mean 'optim.base_lr'" in result.stderr
    assert not any(tmp_path.iterdir())


def test_saved_config_reproduces_the_run(tmp_path):
    run_training(tiny_overrides(tmp_path, "first", "train.max_steps=3"))
    saved = tmp_path / "first" / "config.yaml"
    values = yaml.safe_load(saved.read_text())
    assert values["train"]["max_steps"] == 3 and values["output"]["run_name"] == "first"
    run_training(["--config", str(saved), "output.run_name=again"])
    assert_bitwise_equal(final_weights(tmp_path / "again"), final_weights(tmp_path / "first"))


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*_digits_demo.yaml")))
def test_every_digits_recipe_builds_its_method(recipe):
    """What `--config <recipe>` builds, for the small recipes (a recipe missing its model section would build the
    schema's ViT-S and fail here). A frozen teacher is swapped for a random one: its source is another run."""
    from ssd.methods import build_method

    cfg = load_config(recipe, [])
    if cfg.model.pretrained:
        pytest.skip("the student starts from another recipe's run; its own test builds that run first")
    overrides = ["teacher.kind=random", "teacher.source=''"] if cfg.teacher.kind == "frozen" else []
    method = build_method(load_config(recipe, overrides))
    assert type(method.eval_backbone()).__name__ in ("ResNet", "VisionTransformer")


def test_an_empty_override_empties_a_text_key():
    """`teacher.source=` is what error messages suggest to clear a path; OmegaConf alone would read it as null."""
    cfg = load_config("salt_stage2_digits_demo", ["teacher.kind=random", "teacher.source="])
    assert cfg.teacher.source == ""
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config("dino_digits_demo", ["train.epochs="])


def test_a_whole_timm_kwargs_override_replaces_earlier_items_of_the_command_line():
    cfg = load_config("dino_digits_demo", ["model.timm_kwargs.depth=2", "model.timm_kwargs={}",
                                           "model.timm_kwargs.stem_width=16", "teacher.timm_kwargs.depth=3",
                                           "teacher.timm_kwargs={img_size: 32}"])
    assert dict(cfg.model.timm_kwargs) == {"stem_width": 16}
    assert dict(cfg.teacher.timm_kwargs) == {"img_size": 32}
