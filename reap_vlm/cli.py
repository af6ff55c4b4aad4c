"""The one entry point every stage script goes through: parse -> validate -> run -> exit code.

Known errors print one line on stderr and exit with their code; a BugError or any other
exception keeps its traceback (it is a bug, not a user mistake)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, ReapError
from .settings import STAGES, Settings, load


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(stage: str, run: Callable[[Settings], int], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Resolve the stage's settings, call `run(settings)` and turn the outcome into an exit code."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        settings = load(STAGES[stage], argv, prog=prog)
        code = run(settings)
        return EXIT_OK if code is None else int(code)
    except ReapError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the file system said no: full disk, read-only folder, missing permission
        where = f" {err.filename}" if err.filename else ""
        print(
            f"error: {stage} could not read or write{where}: {err.strerror or err}. Check the path, free space "
            "and permissions; nothing partial was left at the target path.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        reason = str(err) or "SIGINT"
        print(
            f"error: {stage} interrupted ({reason}): nothing partial was left at the target path. Run the same "
            "command again (reap: add --resume to continue from the last accumulator checkpoint).",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
