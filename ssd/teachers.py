"""Teachers: what the student learns to match, chosen with one config group (`teacher.kind`).

- `ema`: an exponential moving average of the student (DINO, iBOT, DINOv2, I-JEPA): a copy of the student's
  structure, updated after every optimizer step (`ema_update`).
- `frozen`: weights from a file (`teacher.source`: an ssd run folder, checkpoint or export, an official
  DINO/iBOT/DINOv2/DINOv3 checkpoint, or a timm architecture's weights file with `teacher.arch`), never updated.
- `random`: a seeded random network (`teacher.seed`), never updated (Sarnthein et al. 2023, "Random Teachers are
  Good Teachers"). The student may start independent of it, as a copy, perturbed, or interpolated toward it.

Every teacher is frozen: no gradients, no optimizer state, always in eval mode (no drop-path, BatchNorm on its
running statistics); methods call `keep_eval()` from their `train()`. A frozen or random teacher's weights are
not written into checkpoints again: its `TeacherOrigin` records where they came from with checksums, and resuming
refuses a teacher whose file (or, for a random teacher, whose regenerated weights) no longer match.

A frozen teacher may differ from the student in width and depth: heads map both to the same prototypes (DINO,
iBOT), and latent-prediction methods regress the teacher's features through the predictor, whose output layer
is the learned projection from the student's width to the teacher's.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from ssd.config import ConfigError

log = logging.getLogger("ssd")

KINDS = ("ema", "frozen", "random")
STUDENT_INITS = ("independent", "copy", "perturb", "interpolate")


def frozen_copy(network: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(network)
    teacher.requires_grad_(False)
    return teacher.eval()


def keep_eval(teacher: nn.Module) -> None:
    teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter; buffers copied."""
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise RuntimeError("teacher and student have different parameter lists; they must share a structure")
    torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1.0 - momentum)
    for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers()):
        teacher_buffer.copy_(student_buffer)


def update_teacher(kind: str, teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """The teacher's step after the student's: EMA for `ema`, nothing for fixed teachers."""
    if kind == "ema":
        ema_update(teacher, student, momentum)


class EvaluatesTrainedNetwork:
    """For methods with a `teacher` and a `student` (each holding `.backbone`) and `self.cfg`: evaluation and
    export read the EMA teacher, or the student when the teacher is fixed (frozen or random: the student is what
    the run trains)."""

    @property
    def eval_network(self) -> str:
        return "teacher" if self.cfg.teacher.kind == "ema" else "student"

    def eval_backbone(self) -> nn.Module:
        return getattr(self, self.eval_network).backbone


# ---- fixed (frozen / random) teachers ----------------------------------------------------------------------

class TeacherChangedError(ConfigError):
    """A resumed run's fixed teacher is not the one the run started with."""


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file; of a sharded checkpoint folder, that of its files' names and bytes in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def own_tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """What `state_dict` would hold (parameters and persistent buffers), read past a fixed teacher's hooks."""
    tensors = {prefix + name: parameter for name, parameter in module.named_parameters()}
    for owner_name, owner in module.named_modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                tensors[prefix + (f"{owner_name}." if owner_name else "") + name] = buffer
    return tensors


def weights_sha256(module: nn.Module) -> str:
    """A checksum of a module's tensors (names, shapes, dtypes and bytes), independent of how they are stored."""
    digest = hashlib.sha256()
    for name, tensor in sorted(own_tensors(module).items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class TeacherOrigin(nn.Module):
    """Where a fixed teacher came from, kept in checkpoints instead of its weights (`_extra_state` of this
    module). Loading a checkpoint compares the record with the teacher this run built and refuses a mismatch."""

    def __init__(self, record: dict):
        super().__init__()
        self.record = dict(record)

    def get_extra_state(self) -> dict:
        return dict(self.record)

    def set_extra_state(self, state: dict) -> None:
        saved = dict(state)
        if saved.get("kind") != self.record.get("kind"):
            raise TeacherChangedError(f"the checkpoint was written with a {saved.get('kind')} teacher, this run "
                                      f"builds a {self.record.get('kind')} one: resume with the run's own config")
        key = "file_sha256" if saved.get("kind") == "frozen" else "weights_sha256"
        if saved.get(key) == self.record.get(key):
            return
        if saved.get("kind") == "frozen":
            raise TeacherChangedError(
                f"the frozen teacher changed since this run started: it was {saved.get('file')} with sha256 "
                f"{saved.get(key)}, now teacher.source={self.record.get('source')} gives {self.record.get('file')} "
                f"with sha256 {self.record.get(key)}. A run must keep the teacher it started with: put the original "
                "file back (or point teacher.source at it), or start a new run (output.run_name=...)")
        raise TeacherChangedError(
            f"the random teacher ({saved.get('arch')}, teacher.seed={saved.get('seed')}) no longer comes out the "
            "same: its weights' checksum differs from the one this run started with (another teacher.seed, "
            "architecture, or torch/timm version). Resume with the same versions and config, or start a new run")


def _fix_in_place(teacher: nn.Module) -> None:
    teacher.requires_grad_(False)
    teacher.eval()


def store_origin_instead(method: nn.Module, origin: TeacherOrigin | None, *names: str) -> None:
    """Keep the fixed teacher's weights (the submodules `names` of `method`, e.g. "teacher") out of the method's
    state dict and record `origin` in their place; loading a state dict leaves them as built. No-op for an EMA
    teacher (origin None), whose weights are training state."""
    if origin is None:
        return
    method.teacher_origin = origin

    def drop_teacher_keys(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if any(k.startswith(f"{prefix}{name}.") for name in names)]:
            del state_dict[key]

    def fill_teacher_keys(module, state_dict, prefix, *args):
        # The teacher's own tensors stand in for the keys the checkpoint lacks (and win over a stored copy).
        for name in names:
            state_dict.update(own_tensors(getattr(module, name), f"{prefix}{name}."))

    method.register_state_dict_post_hook(drop_teacher_keys)
    method.register_load_state_dict_pre_hook(fill_teacher_keys)


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def teacher_model_values(cfg) -> dict | None:
    """The teacher's model config as a dict: `teacher.arch` (+ `teacher.timm_kwargs`) over the student's
    model section, or None for "the same architecture as the student"."""
    from ssd.config import to_dict

    if not cfg.teacher.arch:
        return None
    values = {**to_dict(cfg.model), "arch": cfg.teacher.arch, "pretrained": "", "num_registers": 0}
    values["timm_kwargs"] = dict(cfg.teacher.timm_kwargs or {})
    return values


def build_teacher(cfg, student: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, TeacherOrigin | None]:
    """The method's teacher for `teacher.kind`, and the record a fixed teacher keeps in checkpoints.

    `wrap(backbone)` builds the network the method needs around a teacher backbone (heads, mask token), with
    the backbone's own width; a fixed teacher's non-backbone parts come from the source when it is an ssd
    checkpoint holding them, else from `teacher.seed`."""
    kind = cfg.teacher.kind
    if kind == "ema":
        return frozen_copy(student), None
    from ssd.checkpoint_import import model_config
    from ssd.config import to_dict
    from ssd.models.backbone import build_backbone

    values = teacher_model_values(cfg)
    model_cfg = model_config(values or to_dict(cfg.model))
    if kind == "random":
        teacher = _seeded(cfg.teacher.seed, lambda: wrap(build_backbone(model_cfg)))
        record = {"kind": "random", "arch": model_cfg.arch, "seed": int(cfg.teacher.seed),
                  "weights_sha256": weights_sha256(teacher)}
        _init_student(student, teacher, cfg.teacher.student_init, cfg.teacher.student_init_scale)
    else:
        teacher, record = _frozen_teacher(cfg, values, wrap)
    _fix_in_place(teacher)
    return teacher, TeacherOrigin(record)


def _frozen_teacher(cfg, values: dict | None, wrap) -> tuple[nn.Module, dict]:
    from ssd.checkpoint_import import WeightsError, load_backbone_for_eval, read_weights
    from ssd.config import to_dict

    source = cfg.teacher.source
    if not source:
        raise ConfigError("teacher.kind=frozen needs teacher.source: an ssd run folder, checkpoint or export, an "
                          "official DINO/iBOT/DINOv2/DINOv3 checkpoint, or a weights file with teacher.arch=<timm name>")
    try:
        backbone, info = load_backbone_for_eval(source, model_values=values or to_dict(cfg.model))
        path, content = read_weights(info["file"])
    except WeightsError as error:
        raise ConfigError(f"teacher.source={source}: {error}") from None
    teacher = _seeded(cfg.teacher.seed, lambda: wrap(backbone))
    parts = _load_non_backbone_parts(teacher, content)
    log.info("frozen teacher: %s from %s%s", info["model"]["arch"], path,
             f" (with its {', '.join(parts)})" if parts else "")
    record = {"kind": "frozen", "source": str(source), "file": str(Path(path).resolve()),
              "file_sha256": file_sha256(path), "arch": info["model"]["arch"]}
    return teacher, record


def _load_non_backbone_parts(teacher: nn.Module, content: dict) -> list[str]:
    """Heads and mask token of an ssd checkpoint's teacher, where they fit this teacher's (same names and shapes)."""
    if content.get("format") != "ssd.checkpoint":
        return []
    saved = {k[len("teacher."):]: v for k, v in content["method"].items() if k.startswith("teacher.")}
    loaded = []
    for name, module in teacher.named_children():
        if name == "backbone" or module is None:
            continue
        own = module.state_dict()
        theirs = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")}
        if own and set(own) == set(theirs) and all(own[k].shape == theirs[k].shape for k in own):
            module.load_state_dict(theirs)
            loaded.append(name)
    for name, parameter in teacher.named_parameters(recurse=False):
        if name in saved and saved[name].shape == parameter.shape:
            parameter.data.copy_(saved[name])
            loaded.append(name)
    return loaded


@torch.no_grad()
def _init_student(student: nn.Module, teacher: nn.Module, how: str, scale: float) -> None:
    """Random Teachers' locality: the student starts from its own init (`independent`), the teacher's weights
    (`copy`), the teacher plus `scale` x an independent init (`perturb`), or the variance-preserving mix
    sqrt(1 - scale^2) x teacher + scale x an independent init (`interpolate`)."""
    if how == "independent":
        return
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    if set(student_state) != set(teacher_state) or any(student_state[k].shape != teacher_state[k].shape
                                                       for k in student_state):
        raise ConfigError(f"teacher.student_init={how} needs the student to have the teacher's architecture; "
                          "set teacher.arch empty (the student's model) or teacher.student_init=independent")
    for name, tensor in student_state.items():
        start = teacher_state[name].to(tensor.dtype)
        if how == "perturb" and tensor.is_floating_point():
            start = start + scale * tensor
        elif how == "interpolate" and tensor.is_floating_point():
            start = (1.0 - scale**2) ** 0.5 * start + scale * tensor
        tensor.copy_(start)
