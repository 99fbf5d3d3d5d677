"""Small files written whole or not at all (config.yaml, JSON reports, an export's config.json).

The text goes to a hidden temporary file in the same folder, which then replaces the target in one rename: a
crash, a full disk or a kill never leaves a half-written file under the real name, and a reader sees either the
old content or the new. The file gets the permissions the umask allows (like any new file of the run).
"""

from __future__ import annotations

import os
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
