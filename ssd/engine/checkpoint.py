"""Checkpoint files: atomic writes, keep-last-K, newest-valid lookup, safe loading.

A checkpoint is a dict: {"format": "ssd.checkpoint", "version": 1, "config": plain dict, "step", "epoch",
"method": state dict ("student.*", "teacher.*", loss buffers), "optimizer", "scaler", "rng", "sampler"}.
Files are `<run_dir>/checkpoint_<step:08d>.pt`. A write goes to a temporary file in the same folder, is flushed
and fsynced, then renamed over the final name, so a crash or a full disk never leaves a half-written checkpoint
under a valid name and never touches the previous ones. A sharded run writes folders `checkpoint_<step:08d>.dcp/`
instead (`ssd.engine.sharded_checkpoint`), published the same way; both kinds are listed, chosen and pruned alike,
and `load_checkpoint` of a folder returns the same dict without the tensors of "method" and "optimizer".
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint import CheckpointException

from ssd.engine import sharded_checkpoint
from ssd.files import fsync_path, nearly_full

FORMAT = "ssd.checkpoint"
VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{8})\.(pt|dcp)$")
TEMPORARY_MARK = ".tmp-"  # .checkpoint_<step>.pt.tmp-<pid>, .checkpoint_<step>.dcp.tmp-partial: a write in progress
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


def checkpoint_path(run_dir: str | Path, step: int, sharded: bool = False) -> Path:
    return Path(run_dir) / f"checkpoint_{step:08d}{sharded_checkpoint.SUFFIX if sharded else '.pt'}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run (files and sharded folders), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name)
             and (p.is_dir() if p.name.endswith(sharded_checkpoint.SUFFIX) else p.is_file())]
    return sorted(found, key=lambda p: (step_of(p), p.stat().st_mtime))


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file or sharded checkpoint folder (not a run folder)."""
    return path.is_file() or sharded_checkpoint.is_sharded_checkpoint(path)


def _no_space(error: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space. torch.save reports a full disk as a RuntimeError from its zip
    writer, with the OSError(ENOSPC) only in the exception's context, and DCP keeps each process's exception in
    `failures`, so walk those, then ask the disk."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = [f[0] if isinstance(f, tuple) else f for f in (getattr(seen, "failures", None) or {}).values()]
        if any(isinstance(f, BaseException) and _no_space(f, folder) for f in failures):
            return True
        seen = seen.__cause__ or seen.__context__
    return nearly_full(folder)


def save_checkpoint(path: str | Path, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # also KeyboardInterrupt: never leave the hidden temporary file behind
        temporary.unlink(missing_ok=True)
        if not isinstance(error, Exception):
            raise
        raise _write_error(error, path) from error
    fsync_path(path.parent)
    return path


def save_sharded(path: Path, method, optimizer, state: dict) -> Path:
    """`sharded_checkpoint.save` (every process), with save_checkpoint's errors."""
    try:
        return sharded_checkpoint.save(path, method, optimizer, state, save_checkpoint)
    except (Exception, CheckpointException) as error:  # DCP's exception is a BaseException
        raise _write_error(error, path) from error


def _write_error(error: BaseException, path: Path) -> CheckpointError:
    if _no_space(error, path.parent):
        return CheckpointError(
            f"no space left to write checkpoint {path}: free space on that disk or set output.root to a "
            "larger file system, then resume; earlier checkpoints are untouched"
        )
    detail = str(error).strip().splitlines()
    return CheckpointError(f"could not write checkpoint {path}: {type(error).__name__}: {' '.join(detail[:3])[:400]}")


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete temporary checkpoint files left by a process killed while writing (call with the run lock held)."""
    stale = [p for p in Path(run_dir).glob(f".checkpoint_*{TEMPORARY_MARK}*")]
    for path in stale:
        log.warning("removing %s, a checkpoint that was being written when its process died", path)
        _remove(path)
    return stale


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def step_of(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def weights_health(tensors, max_abs_weight: float) -> dict:
    """Whether weights can be trained on from: all finite and none beyond `max_abs_weight`."""
    floats = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not floats:
        return {"finite": True, "max_abs_weight": 0.0, "usable": True}
    # One max-norm per tensor in a few fused kernels and a single host sync (NaN propagates through the max).
    largest = float(torch.stack([norm.float() for norm in torch._foreach_norm(floats, float("inf"))]).max())
    finite = math.isfinite(largest)
    return {"finite": finite, "max_abs_weight": largest, "usable": finite and largest <= max_abs_weight}


def newest_usable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest readable checkpoint whose weights were healthy when saved (see `weights_health`)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            # mmap: only the small pickle is read; the tensors stay on disk.
            state = torch.load(path / sharded_checkpoint.STATE_FILE if path.is_dir() else path, map_location="cpu",
                               weights_only=True, mmap=True)
        except Exception:
            continue
        if isinstance(state, dict) and state.get("format") == FORMAT and state.get("health", {}).get("usable", True):
            return path
    return None


def resume_command(run_dir: Path, path: Path, cfg) -> str:
    lower_lr = float(cfg.optim.base_lr) / 2
    return (f"python -m ssd.train --config {Path(run_dir) / 'config.yaml'} train.resume_from={path} "
            f"optim.base_lr={lower_lr:g} train.allow_changes=true  (or another fix: longer warmup, fp32)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", whole: bool = False) -> dict:
    """Load with `weights_only=True`: tensors and plain containers only, never arbitrary pickled code. A sharded
    folder gives its state without "method" and "optimizer" (`sharded_checkpoint.load_into` reads them into a
    run), or with them as whole CPU tensors, a single file's layout, where `whole`."""
    path = Path(path)
    if path.is_dir() and not sharded_checkpoint.is_sharded_checkpoint(path):
        newest = find_latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"no valid checkpoint_*.pt in run folder {path}")
        path = newest
    if not is_checkpoint(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.is_dir():
            sharded_checkpoint.read_index(path)  # every slice present and whole
            state = torch.load(path / sharded_checkpoint.STATE_FILE, map_location=map_location, weights_only=True)
            if whole:
                state.update(sharded_checkpoint.load_whole_state(path, state))
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated, corrupt or unsafe files
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0][:300]}); "
            "it is truncated, corrupt, or holds objects other than tensors (refused for safety)"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ssd checkpoint (no format='{FORMAT}' entry)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state['version']}; this ssd reads <= {VERSION}")
    return state


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest checkpoint whose file loads; corrupt newer files are reported and skipped (and kept)."""
    found = load_latest_checkpoint(run_dir)
    return found[0] if found else None


def load_latest_checkpoint(run_dir: str | Path, skipped: list | None = None) -> tuple[Path, dict] | None:
    """The newest readable checkpoint and its state (each file is read once); the newer unreadable ones are
    reported and, when `skipped` is given, appended to it as (path, reason)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            log.warning("skipping unreadable checkpoint: %s", error)
            if skipped is not None:
                skipped.append((path, str(error)))
    return None


def prune_checkpoints(run_dir: str | Path, keep: int, protect: list[Path] = ()) -> None:
    """Delete all but the newest `keep` checkpoints, never one in `protect` (the one just written, and the newest
    usable one: after a blow-up the newest files may all hold diverged weights)."""
    protected = {Path(p).resolve() for p in protect}
    for path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if path.resolve() not in protected:
            _remove(path)
