"""A run folder belongs to one run: who may start in it, from which checkpoint, with which config.

`open_run_folder` runs on rank 0 before anything is written. It takes the lock (`run_lock.py`), removes stale
temporary files, picks the checkpoint to resume from, compares the new config with the run's and only then
writes `config.yaml`. What it refuses, it refuses with a `RunFolderError` that names the problem and the fix,
leaving every file as it was (and no empty folder behind).

Config changes on resume, by what they would do to a run:
- harmless (logging, workers, evaluation, checkpoint frequency, where the data lives, one-shot start options):
  accepted and recorded in `config_changes.jsonl`;
- a longer `train.epochs` / `train.max_steps`: accepted and recorded; the schedules are recomputed for the new
  length, so lr, weight decay and teacher momentum follow the new curves from the current step on;
- shapes (model, head, crop sizes and count, batch, accumulation, data set): always refused, the checkpoint
  does not fit them or its step would mean something else;
- everything else changes the meaning of the coming steps (optimisation, schedules, temperatures,
  augmentation, seed, precision, a shorter run): refused unless `train.allow_changes=true`, then recorded.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from ssd.config import flatten_config, save_config, to_dict
from ssd.engine import checkpoint as ckpt
from ssd.engine.run_lock import RunLock, RunLockedError

log = logging.getLogger("ssd")
CHANGES_FILE = "config_changes.jsonl"
SET_ASIDE = "superseded"
ONE_SHOT = {"train.resume_from": "", "train.overwrite": False, "train.allow_changes": False}
HARMLESS = ("log.", "eval.", "output.", "recipe", "data.num_workers", "data.root", "data.on_bad_image",
            "data.max_image_pixels", "checkpoint.", "train.device", "train.compile", "train.memory_check",
            "train.parallel", "train.fsdp_bf16_params",
            "train.resume", "train.init_from", *ONE_SHOT)
LENGTH = ("train.epochs", "train.max_steps")
SHAPE = ("model.", "head.", "method.name", "train.batch_size", "train.grad_accum_steps", "crops.global_size",
         "crops.local_size", "crops.local_number", "data.dataset", "data.split", "data.holdout_fraction")
RUN_OUTPUTS = ("metrics.jsonl", "tb", "knn.json", CHANGES_FILE, SET_ASIDE)


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; nothing in it was changed. The message says what to do."""


@dataclass
class ResumePlan:
    """What rank 0 decided: the checkpoint to resume from (None: step 0) and, on rank 0, its loaded state."""

    path: Path | None = None
    state: dict | None = field(default=None, repr=False)
    lock: RunLock | None = None
    created: bool = False
    # Checkpoints to move to superseded/ once every check has passed: (files, why).
    set_aside: list[tuple[list[Path], str]] = field(default_factory=list)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old value, new value)} for every leaf key that differs."""
    old_flat, new_flat = flatten_config(old), flatten_config(new)
    return {key: (old_flat.get(key), new_flat.get(key)) for key in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(key) != new_flat.get(key)}


def total_steps(train: dict, steps_per_epoch: int) -> int:
    return int(train.get("max_steps") or 0) or int(train.get("epochs", 0)) * steps_per_epoch


def judge_changes(changes: dict, old: dict, new: dict, steps_per_epoch: int | None, step: int,
                  allow_changes: bool) -> None:
    """Raise RunFolderError listing the changes a resumed run may not make. Without `steps_per_epoch` (a
    launcher that has not read the data) a change of length is left to the run's own start."""
    lines, needs_permission = [], []
    for key, (before, after) in changes.items():
        if _matches(key, HARMLESS):
            continue
        if _matches(key, SHAPE):
            lines.append(f"  {key}: {before!r} -> {after!r} (changes the model or what a step is: never on resume)")
        elif _matches(key, LENGTH):
            if steps_per_epoch is None:
                continue
            old_total, new_total = total_steps(old["train"], steps_per_epoch), total_steps(new["train"], steps_per_epoch)
            if new_total <= step:
                lines.append(f"  {key}: {before!r} -> {after!r} (the run is already at step {step}, the new length "
                             f"is {new_total} steps)")
            elif new_total < old_total and not allow_changes:
                needs_permission.append(f"  {key}: {before!r} -> {after!r} (a shorter run: {old_total} -> "
                                        f"{new_total} steps)")
        elif not allow_changes:
            needs_permission.append(f"  {key}: {before!r} -> {after!r}")
    if lines or needs_permission:
        fix = []
        if lines:
            fix.append("start a new run (another output.run_name; model.pretrained=<checkpoint> starts from "
                       "these weights) or resume with the run's own values")
        if needs_permission:
            fix.append("to change optimisation or schedule settings mid-run on purpose (e.g. a lower lr after a "
                       "divergence) add train.allow_changes=true")
        raise RunFolderError("this config differs from the run's in ways a resumed run cannot take:\n"
                             + "\n".join(lines + needs_permission) + "\nTo go on: " + "; ".join(fix) + ".")


def record_changes(run_dir: Path, changes: dict, step: int) -> None:
    if not changes:
        return
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "step": step,
             "changes": {key: [before, after] for key, (before, after) in changes.items()}}
    with open(run_dir / CHANGES_FILE, "a") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
    for key, (before, after) in changes.items():
        log.info("config change on resume at step %d: %s %r -> %r", step, key, before, after)
    if any(_matches(key, LENGTH) for key in changes):
        log.warning("the run's length changed: lr, weight decay and teacher momentum now follow the schedules of "
                    "the new length from step %d on", step)


def _set_aside(run_dir: Path, paths: list[Path], why: str) -> None:
    """Move checkpoints the run would otherwise overwrite into <run>/superseded/ (nothing is deleted)."""
    if not paths:
        return
    target = run_dir / SET_ASIDE
    target.mkdir(exist_ok=True)
    for path in paths:
        destination = target / path.name
        if destination.exists():
            destination = target / f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}"
        path.rename(destination)
        log.warning("moved %s to %s (%s)", path.name, destination, why)


def _resolve_resume_from(run_dir: Path, value: str) -> Path:
    if value.isdigit():  # a step: its file, or its sharded folder
        path = ckpt.checkpoint_path(run_dir, int(value))
        path = path if path.exists() else ckpt.checkpoint_path(run_dir, int(value), sharded=True)
    else:
        path = Path(value).expanduser()
    if not ckpt.is_checkpoint(path):
        available = ", ".join(p.name for p in ckpt.list_checkpoints(run_dir)) or "none"
        raise RunFolderError(f"train.resume_from={value}: no checkpoint file {path} (checkpoints in {run_dir}: "
                             f"{available})")
    return path


def _load(path: Path) -> dict:
    try:
        return ckpt.load_checkpoint(path)
    except ckpt.CheckpointError as error:
        raise RunFolderError(str(error)) from None


def choose_checkpoint(run_dir: Path, cfg, plan: ResumePlan) -> None:
    """Set `plan.path` / `plan.state` to the checkpoint this start resumes from (None: step 0), or refuse; files
    the run would overwrite later are listed in `plan.set_aside`, not moved yet."""
    checkpoints = ckpt.list_checkpoints(run_dir)
    if cfg.train.resume_from:
        plan.path = _resolve_resume_from(run_dir, str(cfg.train.resume_from))
        plan.state = _load(plan.path)
        newer = [p for p in checkpoints if ckpt.step_of(p) > int(plan.state["step"])]
        plan.set_aside.append((newer, f"resuming from {plan.path.name}, an earlier step"))
        return
    if not checkpoints:
        return
    if not cfg.train.resume:
        _refuse_start_over(run_dir, checkpoints)
    unreadable: list[tuple[Path, str]] = []
    found = ckpt.load_latest_checkpoint(run_dir, unreadable)
    if found is None:
        reasons = "\n".join(f"  {reason}" for _, reason in unreadable)
        raise RunFolderError(
            f"run folder {run_dir} has {len(checkpoints)} checkpoint file(s) and none is readable:\n{reasons}\n"
            "They are kept. To go on: restore a good copy, resume from another file with train.resume_from=<path>, "
            "or start over with train.resume=false train.overwrite=true (deletes them)."
        )
    path, state = found
    health = state.get("health", {})
    if not health.get("usable", True):
        usable = ckpt.newest_usable_checkpoint(run_dir)
        advice = (f"resume from {usable.name} instead: " + ckpt.resume_command(run_dir, usable, cfg)
                  if usable else "no usable checkpoint is left; start a new run with a lower optim.base_lr")
        raise RunFolderError(
            f"the newest checkpoint {path.name} holds weights up to {health.get('max_abs_weight', '?'):.3g} "
            f"(a run that was blowing up); resuming it would diverge again. {advice}"
        )
    plan.set_aside.append(([p for p, _ in unreadable], "unreadable; the run resumes from an older checkpoint"))
    plan.path, plan.state = path, state


def _refuse_start_over(run_dir: Path, checkpoints: list[Path]) -> None:
    raise RunFolderError(
        f"run folder {run_dir} already holds {len(checkpoints)} checkpoint(s) (newest {checkpoints[-1].name}) "
        "and train.resume=false would start over on top of them. Resume (train.resume=true), choose another "
        "output.run_name, or add train.overwrite=true to delete them and start from step 0."
    )


def _changes_against_run(cfg, run_dir: Path, state: dict | None, steps_per_epoch: int | None, step: int) -> dict:
    """The config changes from the run's config (checked; RunFolderError for those a resume cannot take)."""
    new = to_dict(saved_form(cfg))
    old = _reference_config(run_dir, state)
    if old is None:
        return {}
    changes = config_changes(to_dict(saved_form(OmegaConf.create(old))), new)
    judge_changes(changes, old, new, steps_per_epoch, step, cfg.train.allow_changes)
    return changes


def check_resume_config(cfg, run_dir: Path) -> None:
    """What a launcher can check before submitting a job into a run folder that holds checkpoints."""
    checkpoints = ckpt.list_checkpoints(run_dir)
    if checkpoints and not cfg.train.resume and not cfg.train.overwrite and not cfg.train.resume_from:
        _refuse_start_over(run_dir, checkpoints)
    if checkpoints and not cfg.train.overwrite:
        _changes_against_run(cfg, run_dir, None, None, 0)


def _start_over(run_dir: Path) -> None:
    removed = [p for p in ckpt.list_checkpoints(run_dir)] + [run_dir / name for name in RUN_OUTPUTS]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log.warning("train.overwrite=true: deleted the checkpoints and logs of %s, starting from step 0", run_dir)


def _reference_config(run_dir: Path, state: dict | None) -> dict | None:
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            return OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        except Exception as error:  # an edited or damaged config.yaml: fall back on the checkpoint's copy
            log.warning("cannot read %s (%s); comparing with the checkpoint's config", saved, error)
    return state.get("config") if state else None


def saved_form(cfg):
    """The config as the run folder keeps it: one-shot start options reset."""
    kept = cfg.copy()
    for key, default in ONE_SHOT.items():
        OmegaConf.update(kept, key, default)
    return kept


def open_run_folder(cfg, run_dir: Path, steps_per_epoch: int, dataset_size: int) -> ResumePlan:
    """Rank 0: lock the folder, choose the checkpoint, check and record config changes, write config.yaml."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(f"cannot create run folder {run_dir}: {error.strerror}; set output.root to a "
                             "writable folder") from None
    plan = ResumePlan(created=created)
    try:
        plan.lock = RunLock(run_dir).acquire()
        ckpt.remove_stale_temporaries(run_dir)
        if cfg.train.overwrite:
            _start_over(run_dir)
        choose_checkpoint(run_dir, cfg, plan)
        if plan.state is not None:
            step = int(plan.state["step"])
            record_changes(run_dir, _changes_against_run(cfg, run_dir, plan.state, steps_per_epoch, step), step)
            recorded = plan.state.get("data", {}).get("images")
            if recorded is not None and recorded != dataset_size:
                log.warning("the data set now has %d images; checkpoint %s was written with %d. The data order "
                            "from here on differs from the original run's (the resume is not exact)",
                            dataset_size, plan.path.name, recorded)
        for paths, why in plan.set_aside:  # only now: a refused start changes no file
            _set_aside(run_dir, paths, why)
        save_config(saved_form(cfg), run_dir / "config.yaml")
    except RunLockedError as error:
        undo_start(plan, run_dir)
        raise RunFolderError(str(error)) from None
    except BaseException:
        undo_start(plan, run_dir)
        raise
    return plan


def undo_start(plan: ResumePlan, run_dir: Path) -> None:
    """Release the lock and remove the run folder if this start created it (a failed start leaves none)."""
    plan.release()
    if plan.created:
        shutil.rmtree(run_dir, ignore_errors=True)
