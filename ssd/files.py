"""Small files written whole or not at all (config.yaml, JSON reports, an export's config.json).

The text goes to a hidden temporary file in the same folder, which then replaces the target in one rename: a
crash, a full disk or a kill never leaves a half-written file under the real name, and a reader sees either the
old content or the new. The file gets the permissions the umask allows (like any new file of the run).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's entry to disk (a folder: the names in it, so a rename survives a crash);
    best effort, as some file systems refuse fsync on folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def nearly_full(folder: str | Path) -> bool:
    """Whether the disk holding `folder` has under 1 MiB left: a failed write there ran out of space."""
    try:
        return shutil.disk_usage(folder).free < 1024 * 1024
    except OSError:
        return False
