"""Checkpoint files: atomic writes, keep-last-K, newest-valid lookup, safe loading.

A checkpoint is a dict: {"format": "ssd.checkpoint", "version": 1, "config": plain dict, "step", "epoch",
"method": state dict ("student.*", "teacher.*", loss buffers), "optimizer", "scaler", "rng", "sampler"}.
Files are `<run_dir>/checkpoint_<step:08d>.pt`. A write goes to a temporary file in the same folder, is flushed
and fsynced, then renamed over the final name, so a crash or a full disk never leaves a half-written checkpoint
under a valid name and never touches the previous ones.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import torch

FORMAT = "ssd.checkpoint"
VERSION = 1
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{8})\.pt$")
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save_checkpoint(path: str | Path, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"no space left to write checkpoint {path}: free disk space or set output.root to a larger "
                "file system, then resume; earlier checkpoints are untouched"
            ) from error
        raise CheckpointError(f"could not write checkpoint {path}: {error}") from error
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load with `weights_only=True`: tensors and plain containers only, never arbitrary pickled code."""
    path = Path(path)
    if path.is_dir():
        newest = find_latest_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"no valid checkpoint_*.pt in run folder {path}")
        path = newest
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
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


def load_latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint and its state (each file is read once)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            log.warning("skipping unreadable checkpoint: %s", error)
    return None


def prune_checkpoints(run_dir: str | Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints (never `protect`, the last known-good one)."""
    for path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if protect is not None and path == protect:
            continue
        path.unlink(missing_ok=True)
