"""Config schema, recipes and overrides.

A run is described by one `Config`: the schema below (dataclasses, so every key is typed and documented in one
place), a YAML recipe from `ssd/configs/` that changes some defaults, and `key=value` overrides from the
command line. OmegaConf does the merging and type conversion; this module adds what users need on top of it:
an unknown key names the nearest valid one, a wrong type names the key, the value and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

RECIPES_DIR = Path(__file__).parent / "configs"
DEFAULT_RECIPE = "dino_digits_demo"


class ConfigError(ValueError):
    """A config key, value or recipe the user gave is wrong; the message says what to do."""


@dataclass
class ModelConfig:
    arch: str = "vit_small_patch16_224"  # any timm model name
    img_size: int = 224  # ViT position-embedding grid; other crop sizes are interpolated (dynamic_img_size)
    patch_size: int = 0  # 0 keeps the timm architecture's own patch size
    drop_path_rate: float = 0.1
    drop_path_uniform: bool = False  # the same rate in every block (DINOv2), not timm's linear rise with depth
    # ViT blocks run their residual branches on the kept samples only (DINOv2's efficient stochastic depth, about
    # drop_path_rate of each block's training compute saved; ssd/models/subset_drop_path.py)
    drop_path_subset: bool = False
    # The student's global and local crops through the ViT blocks together: attention per resolution, norms and
    # MLPs on all tokens at once (DINOv3's choice; ssd/models/packed_crops.py). Same result, fewer kernels
    packed_crops: bool = False
    # Activation checkpointing: each block's activations are recomputed in the backward instead of kept (timm's
    # set_grad_checkpointing), about a block's worth of memory for a third more compute
    grad_checkpointing: bool = False
    num_registers: int = 0  # register tokens (Darcet et al. 2024); 0 for plain DINO
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # passed as-is to timm.create_model
    pretrained: str = ""  # optional weights file to start from (ssd checkpoint/export, official DINO/DINOv2)


@dataclass
class HeadConfig:
    out_dim: int = 65536  # number of prototypes K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    use_bn: bool = False
    norm_last_layer: bool = True


@dataclass
class MethodConfig:
    name: str = "dino"
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # EMA momentum at step 0, rises on a cosine to momentum_teacher_end
    momentum_teacher_end: float = 1.0
    centering: str = "ema"  # ema (DINO's center) | sinkhorn (Sinkhorn-Knopp, DINOv2): for class and patch outputs
    # Masked patch loss (iBOT, DINOv2, DINOv3); ignored by dino.
    patch_out_dim: int = 0  # prototypes of the patch head; 0: head.out_dim
    shared_head: bool = True  # one head for class and patch tokens (iBOT ViT-S), or a separate patch head
    patch_loss_weight: float = 1.0
    patch_teacher_temp: float = 0.07
    warmup_patch_teacher_temp: float = 0.04  # over warmup_teacher_temp_epochs, like the class temperature
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # share of a masked crop's patches
    mask_probability: float = 0.5  # share of global crops that are masked
    mask_min_block: int = 4  # smallest block of patches (BEiT / iBOT)
    # false: each crop decides alone whether and how much it is masked (iBOT; the same masks on any number of
    # processes); true: DINOv2's rule, masking ratios spread evenly over each process's batch
    mask_spread_in_batch: bool = False
    koleo_weight: float = 0.0  # KoLeo on the student's class tokens (DINOv2: 0.1)
    # KoLeo's neighbours within groups of this many images of the global batch (0: the whole batch). DINOv2 and
    # DINOv3 compute it on each GPU's 64 images: their recipes set 64 (ssd/losses/koleo_loss.grouped_koleo_loss)
    koleo_group_size: int = 0
    # Gram anchoring (DINOv3): the student's patch-feature Gram matrix regressed to a Gram teacher's, a snapshot
    # of the EMA teacher taken at gram_start_step and refreshed every gram_refresh_steps. 0 disables it.
    gram_weight: float = 0.0
    gram_start_step: int = 0
    gram_refresh_steps: int = 10000
    # Latent prediction (ijepa; SALT stage 2 is ijepa with teacher.kind=frozen) and masked pixels (mae, SALT
    # stage 1): multi-block masks over the patch grid (I-JEPA's defaults), a narrow ViT predictor / decoder.
    num_targets: int = 4  # target blocks per image
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])  # share of the grid per target block
    target_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])  # height / width of a target block
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])  # the context block, targets removed
    min_context: int = 10  # fewest context patches an image may keep
    predictor_dim: int = 384
    predictor_depth: int = 12
    predictor_heads: int = 12
    latent_loss: str = "smooth_l1"  # smooth_l1 (I-JEPA) | l2 | l1, on layer-normed teacher features
    pixel_norm: bool = True  # mae: each target patch normalised by its own mean and std (MAE's best setting)


@dataclass
class TeacherConfig:
    """What the student matches (ssd/teachers.py). ema: the student's moving average (momentum in method.*);
    frozen: weights from `source`, never updated; random: a seeded random network, never updated."""

    kind: str = "ema"  # ema | frozen | random
    # frozen: an ssd run folder, checkpoint or export (architecture read from it), an official DINO/iBOT/DINOv2/
    # DINOv3 checkpoint, or any weights file of the timm architecture `arch`
    source: str = ""
    arch: str = ""  # frozen/random: the teacher's timm architecture if it differs from model.arch (with timm_kwargs)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # random: the teacher's init; frozen: init of any head the source does not hold
    # Latent-prediction methods (ijepa): the teacher's features after this block (-1: the final output)
    feature_block: int = -1
    # random: the student starts independent of the teacher, as a copy, perturbed (teacher + scale x own init)
    # or interpolated (sqrt(1 - scale^2) x teacher + scale x own init); Random Teachers' locality experiments
    student_init: str = "independent"
    student_init_scale: float = 0.1


@dataclass
class DistillConfig:
    """Distilling a fixed teacher (teacher.kind=frozen|random) into another student: method.name=feature_distill
    (SSLD-style feature matching), masked_kd (MaskedKD / DMAE: both networks on the visible patches only) and
    posthoc_registers (PH-Reg). The methods live in ssd/methods/<name>.py."""

    targets: str = "both"  # pooled | patches | both: which of the teacher's features the student matches
    loss: str = "cosine"  # cosine | smooth_l1 | l2 (regression onto layer-normed teacher features) | cosine_l2 (PH-Reg)
    projection: str = "linear"  # linear | mlp: maps the student's width to the teacher's
    patch_weight: float = 1.0  # weight of the patch-token term next to the pooled term (targets=both)
    # masked_kd: share of each image's patches hidden from the student and the teacher (uniform random per image)
    mask_ratio: float = 0.75
    # masked_kd: [student block, teacher block] pairs whose patch tokens are aligned through one projection each
    # (-1: the final, normed output)
    block_pairs: list[list[int]] = field(default_factory=lambda: [[-1, -1]])
    # Parameter-name patterns (fnmatch, on the student backbone's names) that train; empty: all of them.
    # posthoc_registers trains the new registers and a few chosen parts of a pretrained ViT
    trainable: list[str] = field(default_factory=list)
    tta_views: int = 8  # posthoc_registers: shifted/flipped views averaged into the teacher's denoised targets
    tta_max_shift: int = 0  # posthoc_registers: largest shift in pixels (0: half a patch)
    # multi_distill: the students trained together against one teacher forward, each a mapping with a `name`, any
    # model.* keys that differ from model.* (arch, img_size, patch_size, drop_path_rate, num_registers,
    # timm_kwargs, pretrained) and an optional `lr_multiplier`, e.g.
    # [{name: small, timm_kwargs: {embed_dim: 96}}, {name: conv, arch: convnext_atto, lr_multiplier: 2.0}]
    students: list[dict[str, Any]] = field(default_factory=list)
    # multi_distill: shared (every process trains every student) | split (equal blocks of processes, one per
    # student, each block on the whole global batch; ssd/methods/student_placement.py)
    placement: str = "shared"


@dataclass
class ElasticConfig:
    """POA's elastic student (method.name=poa, ssd/methods/poa.py; Zhang et al. ECCV 2024): every step a
    sub-network of the intact student, its width and depth drawn from these lists (smaller ones more often, as in
    POA), learns from the EMA teacher and from the intact student. `python -m ssd.extract_subnet` then exports
    any of these sizes as a standalone timm model."""

    # Embedding widths, whole attention heads (multiples of the head dimension). Empty: every whole number of heads
    # from half the intact width up
    widths: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # numbers of blocks; empty: from half the intact depth up
    # Share w of the elastic student: (1 - w) x intact loss + w x elastic losses (POA: 1 - lambda = 0.2)
    weight: float = 0.2
    # Weight of the elastic student's same-view match to the intact student, next to its match to the teacher
    from_intact_weight: float = 1.0


@dataclass
class DataConfig:
    dataset: str = "imagefolder"  # digits | cifar10 | imagefolder | folder (unlabeled)
    root: str = ""
    split: str = "train"
    holdout_fraction: float = 0.2  # digits only: share held out as the k-NN test split
    on_bad_image: str = "skip"  # skip (warn, count, use the next image) | fail
    # Images above this many pixels are treated as unreadable (skipped or failed as on_bad_image says) before
    # they are decoded: a 20 KB PNG can decode to 169 megapixels (1.7 GB per worker). ImageNet's largest image is
    # about 20 megapixels; raise it for large photos or remote sensing.
    max_image_pixels: int = 50_000_000
    num_workers: int = -1  # loader processes per training process; -1: the cores of this machine / processes - 1
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class CropsConfig:
    global_number: int = 2  # views per image: 2 for DINO/iBOT/DINOv2/DINOv3, 1 for ijepa and mae
    global_size: int = 224
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_number: int = 8
    local_size: int = 96
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # DINOv3: the Gram teacher also gets each global crop (same box and flip, no colour changes) at this size,
    # larger than global_size, and its patch features are pooled to the student's grid. 0: the student's crops.
    gram_teacher_size: int = 0
    # DINO's photo augmentations, per crop (the defaults are the paper's). Other data may need others: a flipped
    # digit is another shape, and colour changes do nothing on grey images. 0 leaves a step out.
    flip_probability: float = 0.5
    color_jitter_probability: float = 0.8
    grayscale_probability: float = 0.2
    blur_probabilities: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, local
    solarize_probability: float = 0.2  # global crop 2 only
    rotation_degrees: float = 0.0  # each crop turned by a random angle within +-this (0: none, as in DINO)
    # Where the colour steps (jitter, grayscale, blur, solarize) and normalisation run. loader: in the DataLoader
    # workers on 8-bit PIL images, DINO's way. device: the workers only crop and send uint8 pixels plus the drawn
    # parameters, the training device applies the steps in float (same draws; within ~1.5 grey levels per crop;
    # ssd/data/deferred_photometric.py): 2.3x the images per worker core. auto: device on a GPU.
    photometric_on: str = "auto"


@dataclass
class OptimConfig:
    base_lr: float = 0.0005  # lr = base_lr * global_batch / lr_reference_batch
    lr_reference_batch: int = 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float = 3.0  # 0 disables clipping
    # per_param: each tensor by its own norm (official DINO, iBOT) | global: clip_grad_norm_ over all parameters |
    # per_module: each part of the student (backbone, class head, patch head) by its own norm (DINOv2, DINOv3)
    clip_mode: str = "per_param"
    freeze_last_layer_epochs: int = 1
    schedule: str = "cosine"  # cosine (DINO, DINOv2) | constant after warmup (DINOv3): lr, wd, teacher momentum
    lr_scaling: str = "linear"  # linear: base_lr * batch / lr_reference_batch | sqrt: base_lr * sqrt(batch / ref)
    layerwise_decay: float = 1.0  # ViT block i of L gets lr x decay^(L - i) (DINOv2: 0.9; 1.0 disables)
    patch_embed_lr_mult: float = 1.0  # extra lr factor for the patch embedding (DINOv2: 0.2)


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: int = 0  # > 0: train this many optimizer steps instead of `epochs` (schedules follow it)
    batch_size: int = 1024  # global batch per optimizer step, over all processes and accumulation steps
    grad_accum_steps: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    # ddp | fsdp (FSDP2: each transformer block's weights, gradients and optimizer state sharded over the
    # processes; ssd/engine/sharding.py). One process trains unsharded either way
    parallel: str = "ddp"
    fsdp_bf16_params: bool = False  # fsdp: gather parameters as bf16 for compute, reduce gradients in fp32
    compile: bool = False  # torch.compile each transformer block (regional compilation; ssd/engine/compile.py)
    # Measure the memory a step needs before training and refuse a run that cannot fit (with the batch that fits)
    memory_check: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = True  # continue from the newest valid checkpoint in the run folder, if any
    # One-shot choices for this start (never written to the run's config.yaml):
    resume_from: str = ""  # a checkpoint file, or a step number of this run folder, to resume from instead
    overwrite: bool = False  # with resume=false: delete this run folder's checkpoints and logs, start at step 0
    allow_changes: bool = False  # resume even though optimisation/schedule keys changed (e.g. lower lr after NaN)
    # Start a new run from another run's weights (student, teacher, heads, centres; not optimizer or step), e.g.
    # DINOv3's high-resolution adaptation: a checkpoint file or run folder. Ignored when this run resumes.
    init_from: str = ""


@dataclass
class OutputConfig:
    root: str = "checkpoints"
    run_name: str = ""  # empty: <recipe>-<timestamp>


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3  # newest checkpoints kept (the newest usable one is always kept too)
    # A checkpoint whose largest weight exceeds this is marked unusable: trained ViTs and ResNets hold weights of
    # order 1-100, so far larger ones mean the run was already blowing up (a NaN usually follows).
    max_abs_weight: float = 1e4
    # file: one checkpoint_<step>.pt written by process 0 (a sharded run gathers every tensor to it first);
    # sharded: a checkpoint_<step>.dcp/ folder each process writes its own slices into (torch.distributed.checkpoint),
    # so nothing is gathered: what a ViT-g with FSDP needs. auto: sharded with train.parallel=fsdp on several
    # processes, else file. Either kind resumes at any number of processes, with DDP or FSDP, and exports alike.
    format: str = "auto"


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    # Attention maps and patch PCA of images_count fixed training images, at the eval sizes, into TensorBoard
    # every images_every_steps steps and at the end (0: never). A glance tells whether features are forming.
    images_every_steps: int = 0
    images_count: int = 4


@dataclass
class EvalConfig:
    knn: bool = False  # after training: k-NN of frozen teacher features vs. random init vs. raw pixels
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    # During training: the teacher's k-NN (no baselines) at the end of every N-th epoch, into metrics.jsonl and
    # TensorBoard (0: never). It costs one pass over both splits: cap them with knn_limit on large data sets.
    knn_every_epochs: int = 0
    knn_limit: int = 0  # images per split for knn_every_epochs, class-balanced (0: all)
    test_split: str = "test"
    resize_size: int = 256
    crop_size: int = 224
    batch_size: int = 256


@dataclass
class Config:
    recipe: str = ""  # set by load_config: which recipe this run started from
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "method.name": ("dino", "ibot", "dinov2", "dinov3", "ijepa", "mae", "feature_distill", "masked_kd",
                    "posthoc_registers", "poa", "multi_distill"),
    "distill.targets": ("pooled", "patches", "both"),
    "distill.loss": ("cosine", "smooth_l1", "l2", "cosine_l2"),
    "distill.projection": ("linear", "mlp"),
    "distill.placement": ("shared", "split"),
    "method.latent_loss": ("smooth_l1", "l2", "l1"),
    "optim.schedule": ("cosine", "constant"),
    "method.centering": ("ema", "sinkhorn"),
    "teacher.kind": ("ema", "frozen", "random"),
    "teacher.student_init": ("independent", "copy", "perturb", "interpolate"),
    "optim.lr_scaling": ("linear", "sqrt"),
    "data.dataset": ("digits", "cifar10", "imagefolder", "folder"),
    "data.on_bad_image": ("skip", "fail"),
    "optim.clip_mode": ("per_param", "global", "per_module"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.parallel": ("ddp", "fsdp"),
    "checkpoint.format": ("auto", "file", "sharded"),
    "crops.photometric_on": ("auto", "loader", "device"),
}


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items():
        full = f"{prefix}{name}"
        keys.append(full)
        if isinstance(value, DictConfig) and not full.endswith("timm_kwargs"):
            keys.extend(_schema_keys(value, full + "."))
    return keys


def _check_known_keys(keys: list[str], where: str) -> None:
    valid = _schema_keys(OmegaConf.structured(Config))
    for key in keys:
        if key in valid or any(key.startswith(v + ".") for v in valid if v.endswith("timm_kwargs")):
            continue
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else "see ssd/config.py for the valid keys"
        raise ConfigError(f"unknown config key '{key}' in {where}: {hint}")


def flatten_config(values: dict, prefix: str = "") -> dict:
    """{"a.b": leaf} for a nested plain dict; model.timm_kwargs stays one value (its keys are timm's)."""
    flat = {}
    for name, value in values.items():
        full = f"{prefix}{name}"
        if isinstance(value, dict) and value and not full.endswith("timm_kwargs"):
            flat.update(flatten_config(value, full + "."))
        else:
            flat[full] = value
    return flat


def _flat_keys(container: dict) -> list[str]:
    return list(flatten_config(container))


def _merge(base: DictConfig, update: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except (ValidationError, ConfigKeyError) as error:
        key = getattr(error, "full_key", "") or "?"
        value = OmegaConf.select(update, key) if key != "?" else None
        expected = _expected_type(key)
        raise ConfigError(
            f"bad value for config key '{key}' in {where}: got {value!r}, expected {expected}"
        ) from None


def _expected_type(key: str) -> str:
    """The schema's type of `key` as written in the dataclass (annotations are strings here)."""
    node: Any = Config
    annotation = "a value of the schema's type"
    for part in re.sub(r"\[\d+\]", "", key).split("."):  # list items (a[0][1]) have their list's type
        fields = getattr(node, "__dataclass_fields__", {})
        if part not in fields:
            break
        annotation = str(fields[part].type)
        node = globals().get(annotation)
    return annotation


def resolve_recipe(recipe: str | None) -> Path:
    name = recipe or DEFAULT_RECIPE
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return path
        if (RECIPES_DIR / path.name).is_file() and len(path.parts) == 1:
            return RECIPES_DIR / path.name
        raise ConfigError(f"config file {path} does not exist (give a YAML file or a recipe name from "
                          f"{RECIPES_DIR})")
    candidate = RECIPES_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe '{name}' not found: give a YAML file path or one of {', '.join(known)}")


def _load_yaml(path: Path) -> DictConfig:
    try:
        values = OmegaConf.load(path)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except Exception as error:  # yaml.YAMLError and OmegaConf's grammar errors: name the file and the line
        detail = " ".join(str(error).split())[:300]
        raise ConfigError(f"config file {path} is not valid YAML: {detail}") from None
    if not isinstance(values, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys (model:, train:, ...), "
                          f"not a {type(values).__name__}")
    return values


def load_config(recipe: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults <- recipe YAML <- `key=value` overrides, validated; returns a typed DictConfig."""
    recipe_path = resolve_recipe(recipe)
    cfg = OmegaConf.structured(Config)
    recipe_values = _load_yaml(recipe_path)
    # A run's own config.yaml names the recipe it started from: keep that name when it is loaded to resume.
    cfg.recipe = str(recipe_values.pop("recipe", "") or "")
    _check_known_keys(_flat_keys(OmegaConf.to_container(recipe_values)), f"recipe {recipe_path}")
    cfg = _merge(cfg, recipe_values, f"recipe {recipe_path}")
    if not cfg.recipe:
        cfg.recipe = recipe_path.stem
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.base_lr=1e-3)")
    override_values = OmegaConf.from_dotlist(list(overrides))
    _check_known_keys(_flat_keys(OmegaConf.to_container(override_values)), "command-line overrides")
    _empty_strings(override_values, cfg)
    cfg = _merge(cfg, override_values, "command-line overrides")
    # A whole-dict override replaces the recipe's timm_kwargs (and earlier items of the command line) instead of
    # merging into them, so that `model.arch=resnet18 model.timm_kwargs={}` drops a ViT-only `depth`.
    for group in ("model", "teacher"):
        whole = _whole_timm_kwargs(list(overrides), f"{group}.timm_kwargs")
        if whole is not None:
            cfg[group].timm_kwargs = whole
    validate(cfg)
    return cfg


def _whole_timm_kwargs(overrides: list[str], key: str) -> DictConfig | None:
    """What `key` holds after the last `key={...}` of the command line and the `key.name=value` items after it;
    None if no item sets the whole dict."""
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    if key not in keys:
        return None
    last = len(keys) - 1 - keys[::-1].index(key)
    later = [item for item, name in zip(overrides[last + 1:], keys[last + 1:]) if name.startswith(key + ".")]
    return OmegaConf.select(OmegaConf.from_dotlist([overrides[last], *later]), key)


def _empty_strings(override_values: DictConfig, schema: DictConfig) -> None:
    """`key=` on the command line means the empty string for a text key (OmegaConf reads it as null)."""
    for key, value in flatten_config(OmegaConf.to_container(override_values)).items():
        if value is None and isinstance(OmegaConf.select(schema, key), str):
            OmegaConf.update(override_values, key, "")


def validate(cfg: DictConfig) -> None:
    """Reject values that make no sense, before anything runs or is written; each message names the key."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of {', '.join(allowed)}")
    for key in ("crops.global_scale", "crops.local_scale", "optim.betas", "method.mask_ratio", "method.target_scale",
                "method.target_aspect", "method.context_scale"):
        if len(OmegaConf.select(cfg, key)) != 2:
            raise ConfigError(f"config key '{key}' needs two numbers, e.g. {key}=[0.4,1.0]")
    for key, low, high, low_open in RANGES:
        _check_range(key, OmegaConf.select(cfg, key), low, high, low_open)
    for key in ("crops.global_scale", "crops.local_scale"):
        smallest, largest = OmegaConf.select(cfg, key)
        if not 0 < smallest <= largest <= 1:
            raise ConfigError(f"config key '{key}' is [{smallest}, {largest}]; it needs 0 < min <= max <= 1 "
                              f"(fractions of the image area), e.g. {key}=[0.4,1.0]")
    blur = list(cfg.crops.blur_probabilities)
    if len(blur) != 3 or not all(0 <= p <= 1 for p in blur):
        raise ConfigError(f"config key 'crops.blur_probabilities' is {blur}; it needs three probabilities in [0, 1] "
                          "(global crop 1, global crop 2, local crops), e.g. crops.blur_probabilities=[1.0,0.1,0.5]")
    low, high = cfg.method.mask_ratio
    if not 0 <= low <= high < 1:
        raise ConfigError(f"config key 'method.mask_ratio' is [{low}, {high}]; it needs 0 <= min <= max < 1 "
                          "(shares of a crop's patches), e.g. method.mask_ratio=[0.1,0.5]")
    if not 0 <= cfg.distill.mask_ratio < 1:
        raise ConfigError(f"config key 'distill.mask_ratio' is {cfg.distill.mask_ratio}; it needs 0 <= ratio < 1 (the "
                          "share of each image's patches hidden from student and teacher), e.g. distill.mask_ratio=0.75")
    if cfg.train.epochs <= 0 and cfg.train.max_steps <= 0:
        raise ConfigError("set train.epochs or train.max_steps to a positive number")
    if cfg.train.overwrite and cfg.train.resume:
        raise ConfigError("train.overwrite=true deletes the run folder's checkpoints: it needs train.resume=false "
                          "too, to say that starting over is meant")
    _check_patch_multiples(cfg)
    if cfg.log.images_every_steps and not cfg.log.tensorboard:
        raise ConfigError(f"log.images_every_steps={cfg.log.images_every_steps} draws images into TensorBoard, which "
                          "log.tensorboard=false turns off: set log.tensorboard=true or log.images_every_steps=0")
    if cfg.crops.gram_teacher_size and cfg.method.name != "dinov3":
        raise ConfigError(f"crops.gram_teacher_size is for DINOv3's Gram teacher; method.name={cfg.method.name} has "
                          "none: set it to 0")
    _check_teacher(cfg.teacher)
    if cfg.teacher.feature_block != -1 and cfg.method.name != "ijepa":
        raise ConfigError(f"teacher.feature_block picks the features that method.name=ijepa regresses; "
                          f"{cfg.method.name} matches the teacher's head outputs: set teacher.feature_block=-1")
    _check_views(cfg)
    student_specs(cfg)  # its own messages for multi_distill's keys come before the general one below
    _check_settings_are_read(cfg)
    _check_koleo_groups(cfg)
    if cfg.data.dataset != "digits" and not cfg.data.root:
        raise ConfigError(f"data.dataset={cfg.data.dataset} needs data.root=/path/to/images")


SINGLE_VIEW_METHODS = ("ijepa", "mae", "masked_kd", "posthoc_registers")  # one crop per image, no local crops
ANY_VIEWS_METHODS = ("feature_distill",)  # every crop, global or local, goes through teacher and student
MASKED_METHODS = ("ibot", "dinov2", "dinov3", "multi_distill")  # the iBOT-family loss of ssd/methods/ibot.py
# Settings that only some methods read. A changed value under any other method would do nothing, silently (the
# CIFAR-10 CPU recipe once set KoLeo and Sinkhorn-Knopp for DINO, whose loss has neither), so it is refused.
SETTINGS_READ_BY = (
    (MASKED_METHODS, ("method.centering", "method.koleo_weight", "method.patch_out_dim", "method.shared_head",
                      "method.koleo_group_size", "method.patch_loss_weight", "method.patch_teacher_temp",
                      "method.warmup_patch_teacher_temp",
                      "method.mask_ratio", "method.mask_probability", "method.mask_min_block",
                      "method.mask_spread_in_batch")),
    (("dinov3",), ("method.gram_weight", "method.gram_start_step", "method.gram_refresh_steps")),
    (("ijepa", "mae"), ("method.num_targets", "method.target_scale", "method.target_aspect", "method.context_scale",
                        "method.min_context", "method.predictor_dim", "method.predictor_depth",
                        "method.predictor_heads")),
    (("ijepa",), ("method.latent_loss",)),
    (("mae",), ("method.pixel_norm",)),
    (("feature_distill", "masked_kd"), ("distill.targets", "distill.projection")),
    (("feature_distill", "masked_kd", "posthoc_registers"), ("distill.loss",)),
    (("feature_distill",), ("distill.patch_weight",)),
    (("masked_kd",), ("distill.mask_ratio", "distill.block_pairs")),
    (("posthoc_registers",), ("distill.trainable", "distill.tta_views", "distill.tta_max_shift")),
    (("multi_distill",), ("distill.students", "distill.placement")),
    (("poa",), ("elastic.widths", "elastic.depths", "elastic.weight", "elastic.from_intact_weight")),
)
PER_MODULE_CLIP_METHODS = ("dino", "ibot", "dinov2", "dinov3", "poa", "multi_distill")  # have student_networks()
FIXED_TEACHER_METHODS = ("feature_distill", "masked_kd", "posthoc_registers", "multi_distill")  # distillation: teacher.kind frozen/random


def _check_koleo_groups(cfg: DictConfig) -> None:
    group, accum = cfg.method.koleo_group_size, cfg.train.grad_accum_steps
    micro = cfg.train.batch_size // accum
    if group and cfg.method.koleo_weight and micro % group:
        raise ConfigError(f"method.koleo_group_size={group} does not divide the {micro} images of a step's forward "
                          f"(train.batch_size={cfg.train.batch_size} / train.grad_accum_steps={accum}): use a divisor "
                          f"of {micro}, or 0 for the whole batch")


def _check_settings_are_read(cfg: DictConfig) -> None:
    """Refuse changed settings that method.name does not read (SETTINGS_READ_BY), naming the methods that do."""
    name, defaults = cfg.method.name, OmegaConf.structured(Config)
    unread = []
    for methods, keys in SETTINGS_READ_BY:
        if name in methods:
            continue
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if value != OmegaConf.select(defaults, key):
                unread.append((key, value, methods))
    if unread:
        listed = "; ".join(f"{key}={OmegaConf.to_container(value) if OmegaConf.is_config(value) else value} "
                           f"(read by {', '.join(methods)})" for key, value, methods in unread)
        raise ConfigError(f"method.name={name} does not read {listed}: the setting would change nothing. Remove it, "
                          f"or use a method that reads it")


def _check_views(cfg: DictConfig) -> None:
    name, crops = cfg.method.name, cfg.crops
    if name in SINGLE_VIEW_METHODS and (crops.global_number != 1 or crops.local_number):
        raise ConfigError(f"method.name={name} sees one crop per image: set crops.global_number=1 "
                          f"crops.local_number=0 (or start from an {name} recipe, see --list-recipes)")
    if name not in SINGLE_VIEW_METHODS + ANY_VIEWS_METHODS and crops.global_number != 2:
        raise ConfigError(f"method.name={name} matches two global crops of each image: set crops.global_number=2")
    if cfg.optim.clip_mode == "per_module" and name not in PER_MODULE_CLIP_METHODS:
        raise ConfigError(f"optim.clip_mode=per_module clips each part of a DINO-style student (backbone, heads) on "
                          f"its own; method.name={name} has no such parts: use optim.clip_mode=global or per_param "
                          f"(per_module works with {', '.join(PER_MODULE_CLIP_METHODS)})")
    if name == "mae" and cfg.teacher.kind != "ema":
        raise ConfigError("method.name=mae reconstructs pixels and has no teacher: leave teacher.* at its defaults")
    if name in FIXED_TEACHER_METHODS and cfg.teacher.kind == "ema":
        raise ConfigError(f"method.name={name} distils a fixed teacher into the student: set teacher.kind=frozen "
                          "teacher.source=<run folder, checkpoint or weights file> (or teacher.kind=random)")


STUDENT_OWN_KEYS = ("name", "lr_multiplier")
ARCH_SPECIFIC_KEYS = ("patch_size", "num_registers", "timm_kwargs", "pretrained")
STUDENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def student_specs(cfg: DictConfig) -> list[dict]:
    """multi_distill's students, checked: [{"name", "model": model.* with the entry's keys on top (a given
    timm_kwargs replaces model.timm_kwargs whole), "lr_multiplier"}], in the order given. An entry with an arch of
    its own leaves model.*'s architecture-specific keys (patch size, registers, timm_kwargs, weights) behind."""
    entries = OmegaConf.to_container(cfg.distill.students, resolve=True)
    if cfg.method.name != "multi_distill":
        if cfg.distill.placement != "shared":
            raise ConfigError(f"distill.placement places the students of method.name=multi_distill; "
                              f"method.name={cfg.method.name} has one: set distill.placement=shared")
        if entries:
            raise ConfigError(f"distill.students lists the students of method.name=multi_distill; "
                              f"method.name={cfg.method.name} trains model.* alone: set distill.students=[]")
        return []
    if cfg.distill.placement == "split" and cfg.train.parallel == "fsdp":
        # FSDP shards every student over all processes, and each shard's all-gather needs every process to run
        # that student: split runs each student on its own block of processes only.
        raise ConfigError("distill.placement=split runs each student on its own processes, but train.parallel=fsdp "
                          "shards every student over all of them: use distill.placement=shared (each student "
                          "sharded over all processes) or train.parallel=ddp")
    if not entries:
        raise ConfigError("method.name=multi_distill needs distill.students, e.g. distill.students='[{name: small}, "
                          "{name: conv, arch: convnext_atto}]' (each entry: a name, model.* keys that differ, an "
                          "optional lr_multiplier)")
    model_keys = [f.name for f in dataclasses.fields(ModelConfig)]
    specs, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"distill.students[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is {entry!r}; each student is a mapping such as {{name: small, arch: "
                              "vit_small_patch16_224}")
        name = str(entry.get("name", ""))
        if not STUDENT_NAME.fullmatch(name):
            raise ConfigError(f"{where} needs a name of letters, digits and _ starting with a letter (it names the "
                              f"student in logs, checkpoints and `ssd.export --which`); got {entry.get('name')!r}")
        if name in seen or name in ("teacher", "student"):
            raise ConfigError(f"{where}: the name {name!r} is " + ("taken by an earlier student" if name in seen else
                              "reserved (it means the run's default network)") + "; give each student its own name")
        seen.add(name)
        unknown = sorted(set(entry) - set(model_keys) - set(STUDENT_OWN_KEYS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], model_keys + list(STUDENT_OWN_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where} ({name}) has unknown key(s) {', '.join(unknown)}{hint}; a student takes "
                              f"{', '.join(STUDENT_OWN_KEYS + tuple(model_keys))}")
        lr_multiplier = entry.get("lr_multiplier", 1.0)
        if not isinstance(lr_multiplier, (int, float)) or lr_multiplier <= 0:
            raise ConfigError(f"{where} ({name}) has lr_multiplier={lr_multiplier!r}; it must be a positive number")
        model = to_dict(cfg.model)
        if "arch" in entry and entry["arch"] != model["arch"]:  # model.*'s architecture-specific keys stay behind
            defaults = dataclasses.asdict(ModelConfig())
            model.update({key: defaults[key] for key in ARCH_SPECIFIC_KEYS})
        model.update({key: value for key, value in entry.items() if key in model_keys})
        try:
            model = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(ModelConfig), model))
        except (ValidationError, ConfigKeyError) as error:
            raise ConfigError(f"{where} ({name}): {' '.join(str(error).split())[:200]}") from None
        specs.append({"name": name, "model": model, "lr_multiplier": float(lr_multiplier)})
    return specs


def _check_teacher(teacher) -> None:
    if teacher.kind == "frozen" and not teacher.source:
        raise ConfigError("teacher.kind=frozen needs teacher.source=...: an ssd run folder, checkpoint or export, an "
                          "official DINO/iBOT/DINOv2/DINOv3 checkpoint, or a weights file with teacher.arch=<timm name>")
    if teacher.kind != "frozen" and teacher.source:
        raise ConfigError(f"teacher.source is read by teacher.kind=frozen only (this run's is {teacher.kind}): set "
                          "teacher.kind=frozen, or teacher.source= (empty)")
    if teacher.kind == "ema" and teacher.arch:
        raise ConfigError("an ema teacher is the student's average, so it has the student's architecture: leave "
                          "teacher.arch empty, or choose teacher.kind=frozen/random")
    if teacher.kind != "random" and teacher.student_init != "independent":
        raise ConfigError(f"teacher.student_init={teacher.student_init} is for random teachers: set "
                          "teacher.kind=random or teacher.student_init=independent")


# (key, lowest, highest, lowest excluded): numeric keys with a meaningful range.
INF = float("inf")
RANGES = [
    ("train.batch_size", 1, INF, False), ("train.grad_accum_steps", 1, INF, False),
    ("train.epochs", 0, INF, False), ("train.max_steps", 0, INF, False),
    ("checkpoint.every_steps", 1, INF, False), ("checkpoint.keep", 0, INF, False),
    ("checkpoint.max_abs_weight", 0, INF, True), ("log.every_steps", 1, INF, False),
    ("log.images_every_steps", 0, INF, False), ("log.images_count", 1, INF, False),
    ("optim.base_lr", 0, INF, True), ("optim.min_lr", 0, INF, False), ("optim.lr_reference_batch", 1, INF, False),
    ("optim.warmup_epochs", 0, INF, False), ("optim.weight_decay", 0, INF, False),
    ("optim.weight_decay_end", 0, INF, False), ("optim.clip_grad", 0, INF, False),
    ("optim.freeze_last_layer_epochs", 0, INF, False),
    ("method.student_temp", 0, INF, True), ("method.teacher_temp", 0, INF, True),
    ("method.warmup_teacher_temp", 0, INF, True), ("method.warmup_teacher_temp_epochs", 0, INF, False),
    ("method.center_momentum", 0, 1, False), ("method.momentum_teacher", 0, 1, False),
    ("method.momentum_teacher_end", 0, 1, False), ("method.patch_out_dim", 0, INF, False),
    ("method.patch_loss_weight", 0, INF, False), ("method.patch_teacher_temp", 0, INF, True),
    ("method.warmup_patch_teacher_temp", 0, INF, True), ("method.mask_probability", 0, 1, False),
    ("method.mask_min_block", 1, INF, False), ("method.koleo_weight", 0, INF, False), ("method.koleo_group_size", 0, INF, False),
    ("method.gram_weight", 0, INF, False), ("method.gram_start_step", 0, INF, False),
    ("method.gram_refresh_steps", 1, INF, False), ("crops.gram_teacher_size", 0, INF, False),
    ("optim.layerwise_decay", 0, 1, True), ("optim.patch_embed_lr_mult", 0, INF, False),
    ("model.img_size", 1, INF, False), ("model.patch_size", 0, INF, False), ("model.drop_path_rate", 0, 1, False),
    ("model.num_registers", 0, INF, False), ("head.out_dim", 1, INF, False), ("head.hidden_dim", 1, INF, False),
    ("head.bottleneck_dim", 1, INF, False), ("head.nlayers", 1, INF, False),
    ("crops.global_size", 1, INF, False), ("crops.local_size", 1, INF, False), ("crops.local_number", 0, INF, False),
    ("crops.flip_probability", 0, 1, False), ("crops.color_jitter_probability", 0, 1, False),
    ("crops.grayscale_probability", 0, 1, False), ("crops.solarize_probability", 0, 1, False),
    ("crops.rotation_degrees", 0, 180, False),
    ("data.num_workers", -1, INF, False), ("data.holdout_fraction", 0, 1, True),
    ("data.max_image_pixels", 1, INF, False), ("eval.batch_size", 1, INF, False),
    ("eval.knn_temperature", 0, INF, True), ("eval.resize_size", 1, INF, False), ("eval.crop_size", 1, INF, False),
    ("eval.knn_every_epochs", 0, INF, False), ("eval.knn_limit", 0, INF, False),
    ("crops.global_number", 1, 2, False), ("method.num_targets", 1, INF, False),
    ("method.min_context", 1, INF, False), ("method.predictor_dim", 4, INF, False),
    ("method.predictor_depth", 1, INF, False), ("method.predictor_heads", 1, INF, False),
    ("teacher.seed", 0, INF, False), ("teacher.feature_block", -1, INF, False),
    ("teacher.student_init_scale", 0, 1, False),
    ("distill.patch_weight", 0, INF, False), ("distill.tta_views", 1, INF, False), ("distill.tta_max_shift", 0, INF, False),
]


def _check_range(key: str, value, low: float, high: float, low_open: bool) -> None:
    too_low = value <= low if low_open else value < low
    if not (too_low or value > high):
        return
    lower = f"> {low:g}" if low_open else f">= {low:g}"
    if low in (0, 1) and (low_open or low == 1):
        lower = f"positive ({lower})"
    needed = f"{lower} and <= {high:g}" if high != INF else lower
    hint = ""
    if key.startswith("method.") and key.endswith("temp"):
        hint = " (a softmax temperature divides the logits: 0 or below gives inf/NaN)"
    raise ConfigError(f"config key '{key}' is {value}; it must be {needed}{hint}")


def patch_size_of_config(model) -> int | None:
    """The ViT patch size a model config asks for: model.patch_size, or the one in the timm name (vit_*_patch16_*);
    None for architectures without patches."""
    if model.patch_size:
        return int(model.patch_size)
    match = re.search(r"patch(\d+)", model.arch)
    return int(match.group(1)) if match else None


def _check_patch_multiples(cfg: DictConfig) -> None:
    patch = patch_size_of_config(cfg.model)
    if not patch:
        return
    sizes = ["crops.global_size"] + (["crops.local_size"] if cfg.crops.local_number else [])
    sizes += ["crops.gram_teacher_size"] if cfg.crops.gram_teacher_size else []
    sizes += ["eval.crop_size"] if cfg.eval.knn or cfg.eval.knn_every_epochs else []
    for key in sizes:
        size = OmegaConf.select(cfg, key)
        if size % patch:
            fitting = max(patch, size // patch * patch)
            raise ConfigError(f"config key '{key}' is {size}, not a multiple of the patch size {patch} of "
                              f"{cfg.model.arch}: use {fitting} or {fitting + patch}")


def check_world_size(cfg: DictConfig, processes: int) -> None:
    """The global batch must split evenly over processes and accumulation steps."""
    accum = cfg.train.grad_accum_steps
    if processes < 1:
        raise ConfigError(f"a run needs at least one process, got {processes}")
    if cfg.train.batch_size % (processes * accum):
        per = processes * accum
        lower, higher = max(per, cfg.train.batch_size // per * per), (cfg.train.batch_size // per + 1) * per
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by {processes} process(es) x "
            f"train.grad_accum_steps={accum}: use train.batch_size={lower} or {higher}"
        )


def save_config(cfg: DictConfig, path: str | Path) -> None:
    from ssd.files import write_text_atomic

    write_text_atomic(path, OmegaConf.to_yaml(cfg))


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def config_from_dict(values: dict) -> DictConfig:
    """Rebuild a typed config from a checkpoint's plain dict (unknown keys still fail loudly)."""
    _check_known_keys(_flat_keys(values), "checkpoint config")
    return _merge(OmegaConf.structured(Config), OmegaConf.create(values), "checkpoint config")


__all__ = [
    "Config", "ConfigError", "load_config", "save_config", "to_dict", "config_from_dict", "resolve_recipe",
    "validate", "check_world_size", "patch_size_of_config",
]
