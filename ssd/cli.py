"""How commands end: a mistake the user can fix is one block of text and exit status 2, never a traceback.

`SSD_DEBUG=1` shows the traceback anyway. Errors not listed in `user_errors` are bugs and keep their traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2


def user_errors(include_checkpoints: bool = True) -> tuple[type[BaseException], ...]:
    """Errors a user causes and fixes: config, data, weights, run folder (and unreadable checkpoints, except
    while training, where a checkpoint that cannot be written means a full or broken disk)."""
    from ssd.checkpoint_import import WeightsError
    from ssd.config import ConfigError
    from ssd.data import DatasetError, UnreadableImageError
    from ssd.engine.checkpoint import CheckpointError
    from ssd.engine.run_folder import RunFolderError

    errors = (ConfigError, DatasetError, UnreadableImageError, RunFolderError, WeightsError)
    return (*errors, CheckpointError) if include_checkpoints else errors


def report_error(message: str, code: int) -> int:
    """Print a user-facing error without its traceback (call inside the `except` block)."""
    if os.environ.get("SSD_DEBUG"):
        raise  # noqa: PLE0704 - re-raises the exception being handled
    print(message, file=sys.stderr)
    return code


def run_command(main: Callable, argv: list[str] | None = None) -> int:
    """Console-script entry: run `main(argv)`; 0 on success, 2 with one message for a user's mistake."""
    try:
        result = main(argv)
    except user_errors() as error:
        return report_error(f"error: {error}", EXIT_USAGE)
    return result if isinstance(result, int) else 0
